"""Monte Carlo dropout uncertainty service.

The serving path imports onnxruntime, grpcio, protobuf, prometheus-client and numpy only:
never torch (see ``export/`` for PyTorch -> ONNX).
"""

__version__ = "0.1.0"
