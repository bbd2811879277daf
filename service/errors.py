"""The one error tree of the service. Each class names the status code it maps to.

::

    ServiceError                      INTERNAL (message replaced by a generic one on the wire)
    ├── InvalidInput                  INVALID_ARGUMENT  bad dtype, rank, shape, bytes, NaN, T
    ├── NotFound                      NOT_FOUND
    │   ├── ModelNotFound
    │   └── VersionNotFound
    ├── ResourceExhausted             RESOURCE_EXHAUSTED  request above a limit, queue full
    ├── Unavailable                   UNAVAILABLE
    │   └── ModelNotReady
    ├── DeadlineExceeded              DEADLINE_EXCEEDED
    ├── Cancelled                     CANCELLED
    ├── Unauthenticated               UNAUTHENTICATED  missing or wrong bearer token
    └── InternalError                 INTERNAL

    ModelLoadError (not sent to clients: a model version that cannot be served)

The core raises these without knowing about gRPC; ``service.protocol.grpc_server`` maps them to
``grpc.StatusCode`` in one place. Codes are the canonical status names shared by gRPC and the
Open Inference Protocol, so the core stays protocol-neutral. Any other exception reaching the
protocol layer is a bug: it is logged with its traceback and the client gets INTERNAL with a
generic message, so internals never leak.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "InternalError",
    "InvalidInput",
    "ModelLoadError",
    "ModelNotFound",
    "ModelNotReady",
    "NotFound",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "VersionNotFound",
]


class ServiceError(Exception):
    """Base of every error a client can receive."""

    code: ClassVar[str] = "INTERNAL"
    #: Whether the message may be sent to the client as it is.
    public: ClassVar[bool] = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ServiceError):
    """The request is malformed: wrong dtype, rank, shape, byte length, values or T."""

    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    """The model or version does not exist."""

    code = "NOT_FOUND"


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} not found")
        self.model = model


class VersionNotFound(NotFound):
    def __init__(self, model: str, version: str, available: list[str]) -> None:
        super().__init__(
            f"version {version!r} of model {model!r} not found (available: "
            f"{', '.join(available) or 'none'})"
        )
        self.model = model
        self.version = version


class ResourceExhausted(ServiceError):
    """The request is larger than a configured limit, or the queue is full."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    """The server cannot answer now (starting, shutting down); retrying later may work."""

    code = "UNAVAILABLE"


class ModelNotReady(Unavailable):
    def __init__(self, model: str, version: str) -> None:
        super().__init__(f"model {model!r} version {version} is not ready")


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before its answer was ready."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    """The client cancelled the request."""

    code = "CANCELLED"


class Unauthenticated(ServiceError):
    """The call carries no bearer token, or one the server does not accept."""

    code = "UNAUTHENTICATED"


class InternalError(ServiceError):
    """A failure inside the server; the details go to the log, never to the client."""

    code = "INTERNAL"
    public = False


class ModelLoadError(Exception):
    """A model version in the repository cannot be served (bad config, graph, provider)."""
