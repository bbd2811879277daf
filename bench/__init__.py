"""Benchmarks of the MC dropout server; results in docs/benchmarks.md.

``python -m bench.run [--quick]`` runs them all:

* ``bench.engine``: in process, one model version, PyTorch and ONNX Runtime baselines against
  the engine the server builds (``service.engine.runtime.build_engine``).
* ``bench.real``: realistic models (``bench.realistic``: MobileNetV3-Small, EfficientNet-B0,
  BERTs, ResNet-50, ViT-B/16 with random weights) against PyTorch and one deterministic pass
  (``bench.anchors``), on the CPU here and on a GPU in ``bench.gpu`` (``bench.gpu_real``).
* ``bench.flops``: the machine's matrix-multiply FLOP/s and the FLOPs the models need.
* ``bench.service``: the gRPC server end to end (when present).
* ``bench.report``: renders the markdown report.
"""
