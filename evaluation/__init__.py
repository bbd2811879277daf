"""The evaluation of the MC dropout service: ``python -m evaluation [--quick]``.

Everything is measured through a running server over gRPC, from data bundled in installed
packages: Boston housing regression (Gal & Ghahramani's protocol), digits calibration and
out-of-distribution detection, and the convergence of the answers with T. The results and
figures go to docs/evaluation.md and docs/evaluation/*.png.
"""
