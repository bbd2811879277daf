"""Python client of the MC dropout service: numpy in, numpy out.

::

    from service.client import Client

    with Client("127.0.0.1:8001", timeout=10) as client:
        result = client.predict("digits", images)  # images: float32 (B, 1, 8, 8)
        result.predicted_label, result.mean, result.std, result.mutual_information

:class:`AsyncClient` has the same API for asyncio. Every failed RPC raises
:class:`ClientError`, which carries the gRPC status code; only UNAVAILABLE is retried.
``python -m service.client`` is the command line (``--help``). Imports grpc, grpc_health,
numpy and the generated messages only: never onnxruntime or torch.
"""

from service.client.aio import AsyncClient
from service.client.errors import ClientError
from service.client.sync import Client
from service.client.types import (
    DropoutLayer,
    ModelInfo,
    ModelSummary,
    OutputPrediction,
    Prediction,
    TensorInfo,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "DropoutLayer",
    "ModelInfo",
    "ModelSummary",
    "OutputPrediction",
    "Prediction",
    "TensorInfo",
]
