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
    CredentialsError (not sent to clients: a TLS or token file that cannot be used)

The core raises these without knowing about gRPC or HTTP; ``service.protocol.status`` maps them
to ``grpc.StatusCode`` and to HTTP statuses in one place. Codes are the canonical status names
shared by gRPC and the Open Inference Protocol, so the core stays protocol-neutral. Any other
exception reaching the protocol layer is a bug: it is logged with its traceback and the client
gets INTERNAL with a generic message, so internals never leak.

A message never carries a client's string whole: :func:`quote` cuts every echoed value (a
1 MiB model name would otherwise travel back in the status trailer, which clients refuse above
16 KiB), and ``service.protocol.status`` bounds the whole message as a last guard.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "MAX_QUOTED_CHARS",
    "Cancelled",
    "CredentialsError",
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
    "quote",
]

#: Characters of a client's value that an error message shows (the rest is counted, not shown).
MAX_QUOTED_CHARS = 64


def quote(value: object, max_chars: int = MAX_QUOTED_CHARS) -> str:
    """A client's value as an error message shows it: ``repr``, cut to ``max_chars``.

    The one way a client's string (a model name, an input name, a datatype) goes into a
    message, so that an answer never grows with what the client sent.

    Args:
        value: the value (usually a str; anything else is shown through ``repr``).
        max_chars: characters of the value shown.

    Returns:
        ``'name'`` for a short value, ``'aaaa…' (+1048512 characters)`` for a long one.
    """
    if isinstance(value, str | bytes) and len(value) > max_chars:
        return f"{value[:max_chars]!r}… (+{len(value) - max_chars} characters)"
    text = repr(value)
    if len(text) > max_chars + 2:  # a long list or other repr: cut the text itself
        return f"{text[:max_chars]}… (+{len(text) - max_chars} characters)"
    return text


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
        super().__init__(f"model {quote(model)} not found")
        self.model = model


class VersionNotFound(NotFound):
    def __init__(self, model: str, version: str, available: list[str]) -> None:
        super().__init__(
            f"version {quote(version)} of model {quote(model)} not found (available: "
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
        super().__init__(f"model {quote(model)} version {quote(version)} is not ready")


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


class CredentialsError(Exception):
    """A TLS certificate, key or CA file, or a token file, cannot be used: unreadable,
    malformed, empty, or a key that does not match its certificate. At start-up the server
    refuses to start; when a changed file is refused, the previous credentials stay in use."""
