"""Benchmarks of the MC dropout server; results in docs/benchmarks.md.

``python -m bench.run [--quick]`` runs them all:

* ``bench.engine``: in process, one model version, PyTorch and ONNX Runtime baselines against
  the engine the server builds (``service.engine.runtime.build_engine``).
* ``bench.flops``: the machine's matrix-multiply FLOP/s and the FLOPs the models need.
* ``bench.service``: the gRPC server end to end (when present).
* ``bench.report``: renders the markdown report.
"""
