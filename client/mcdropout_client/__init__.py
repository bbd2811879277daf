"""Python client of the MC dropout uncertainty service: numpy in, numpy out.

::

    from mcdropout_client import Client

    with Client("127.0.0.1:8001", timeout=10) as client:
        result = client.predict("digits", images)  # images: float32 (B, 1, 8, 8)
        result.predicted_label, result.mean, result.std, result.mutual_information

:class:`AsyncClient` has the same API for asyncio; both share one core
(``mcdropout_client._core``) and differ only in their transport. Every failed call raises a
:class:`ClientError` subclass (``errors``), which carries the gRPC status code; only
UNAVAILABLE is retried. ``python -m mcdropout_client`` (or the ``mcdropout`` script) is the
command line; :mod:`mcdropout_client.oip` helps users of an Open Inference Protocol client.

A distribution of its own (``pip install ./client``): it needs grpcio,
grpcio-health-checking, protobuf and numpy, never the server or onnxruntime.
"""

from mcdropout_client._aio import AsyncClient
from mcdropout_client._core import DEFAULT_TARGET, SERVICE_NAME, RetryPolicy
from mcdropout_client._sync import Client
from mcdropout_client.errors import (
    AccessDeniedError,
    CallCancelledError,
    ClientError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    ServerError,
    UnauthenticatedError,
    UnavailableError,
)
from mcdropout_client.types import (
    DropoutLayer,
    HealthStatus,
    Interval,
    ModelInfo,
    ModelSummary,
    OutputPrediction,
    Prediction,
    TensorInfo,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET",
    "SERVICE_NAME",
    "AccessDeniedError",
    "AsyncClient",
    "CallCancelledError",
    "Client",
    "ClientError",
    "DeadlineExceededError",
    "DropoutLayer",
    "HealthStatus",
    "Interval",
    "InvalidArgumentError",
    "ModelInfo",
    "ModelSummary",
    "NotFoundError",
    "OutputPrediction",
    "PermissionDeniedError",
    "Prediction",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServerError",
    "TensorInfo",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
]
