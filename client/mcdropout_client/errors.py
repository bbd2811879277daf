"""The client's exceptions: one tree, one class per family of gRPC status codes.

::

    ClientError                      every failed call; .code (grpc.StatusCode), .details
      InvalidArgumentError           INVALID_ARGUMENT, OUT_OF_RANGE: fix the request
      NotFoundError                  NOT_FOUND: unknown model, version or health service
      ResourceExhaustedError         RESOURCE_EXHAUSTED: too many rows or samples, queue full
      UnavailableError               UNAVAILABLE: unreachable, loading or shutting down
      DeadlineExceededError          DEADLINE_EXCEEDED: the deadline passed
      CallCancelledError             CANCELLED: the call was cancelled
      AccessDeniedError              the credentials were refused
        UnauthenticatedError         UNAUTHENTICATED: no or an invalid token
        PermissionDeniedError        PERMISSION_DENIED: valid, but not allowed
      ServerError                    INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED, or an
                                     answer the client cannot decode
    ValueError / TypeError           bad arguments, caught before anything is sent
    RuntimeError                     a call on a closed client

The remaining codes (ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED, OK) raise plain
:class:`ClientError`; the server sends none of them. Only :class:`UnavailableError` is
retried (see ``max_retries``).
"""

from __future__ import annotations

import grpc

__all__ = [
    "AccessDeniedError",
    "CallCancelledError",
    "ClientError",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "ServerError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_for",
    "from_rpc_error",
]

Code = grpc.StatusCode


class ClientError(Exception):
    """A failed call, with the gRPC status code and the server's message.

    Catch a subclass for one family of codes, or this class for all of them.

    Attributes:
        code: the status code (``grpc.StatusCode.NOT_FOUND``, ...).
        details: the status message: the server's (for INTERNAL a generic one, the details
            stay in its log), or gRPC's own for failures of the connection.
        debug_error_string: gRPC's debug string when there is one (for logs, not for users).
    """

    def __init__(
        self, code: grpc.StatusCode, details: str, debug_error_string: str | None = None
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.debug_error_string = debug_error_string


class InvalidArgumentError(ClientError):
    """INVALID_ARGUMENT or OUT_OF_RANGE: the request does not fit the model or the API."""


class NotFoundError(ClientError):
    """NOT_FOUND: no such model or version, or no such health service."""


class ResourceExhaustedError(ClientError):
    """RESOURCE_EXHAUSTED: a limit of the server (rows, rows x T, returned samples, message
    size) or its queue is full; send less, or later."""


class UnavailableError(ClientError):
    """UNAVAILABLE: the server cannot be reached, is still loading models or shutting down.
    Retried with back-off (``max_retries``) before it is raised."""


class DeadlineExceededError(ClientError):
    """DEADLINE_EXCEEDED: the call's deadline passed (the work may have run)."""


class CallCancelledError(ClientError):
    """CANCELLED: the call was cancelled (by the caller, or the server while stopping)."""


class AccessDeniedError(ClientError):
    """The server refused the credentials: UNAUTHENTICATED or PERMISSION_DENIED."""


class UnauthenticatedError(AccessDeniedError):
    """UNAUTHENTICATED: no token, or one the server does not accept."""


class PermissionDeniedError(AccessDeniedError):
    """PERMISSION_DENIED: the caller is known but not allowed to make this call."""


class ServerError(ClientError):
    """INTERNAL, UNKNOWN, DATA_LOSS or UNIMPLEMENTED: a fault of the server (or an answer the
    client cannot decode, reported as INTERNAL)."""


_CLASS_OF: dict[grpc.StatusCode, type[ClientError]] = {
    Code.INVALID_ARGUMENT: InvalidArgumentError,
    Code.OUT_OF_RANGE: InvalidArgumentError,
    Code.NOT_FOUND: NotFoundError,
    Code.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    Code.UNAVAILABLE: UnavailableError,
    Code.DEADLINE_EXCEEDED: DeadlineExceededError,
    Code.CANCELLED: CallCancelledError,
    Code.UNAUTHENTICATED: UnauthenticatedError,
    Code.PERMISSION_DENIED: PermissionDeniedError,
    Code.INTERNAL: ServerError,
    Code.UNKNOWN: ServerError,
    Code.DATA_LOSS: ServerError,
    Code.UNIMPLEMENTED: ServerError,
}


def error_for(
    code: grpc.StatusCode, details: str, debug_error_string: str | None = None
) -> ClientError:
    """The exception of the family of ``code`` (plain :class:`ClientError` for the others)."""
    return _CLASS_OF.get(code, ClientError)(code, details, debug_error_string)


def from_rpc_error(error: grpc.RpcError) -> ClientError:
    """Wrap a ``grpc.RpcError`` (sync or ``grpc.aio``), keeping its code and message.

    An error without a status code (not a call's failure) becomes UNKNOWN.
    """
    code_of = getattr(error, "code", None)
    code = code_of() if callable(code_of) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_of = getattr(error, "details", None)
    details = details_of() if callable(details_of) else None
    debug_of = getattr(error, "debug_error_string", None)
    debug = debug_of() if callable(debug_of) else None
    return error_for(code, str(details or code.name), str(debug) if debug else None)
