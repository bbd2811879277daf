"""The one exception of the client: every failed RPC raises :class:`ClientError`.

::

    ClientError(code, message)      any failed RPC: the server's status code and message,
                                    or UNAVAILABLE / DEADLINE_EXCEEDED raised by gRPC itself
    ValueError / TypeError          bad arguments, caught before anything is sent
                                    (wrong dtype, unknown input name, T < 1, timeout <= 0)
"""

from __future__ import annotations

import grpc

__all__ = ["ClientError"]


class ClientError(Exception):
    """A failed RPC, with the gRPC status code and the server's message.

    Attributes:
        code: the status code (``grpc.StatusCode.NOT_FOUND``, ...).
        message: the server's message (for INTERNAL a generic one: details stay in its log).
        details: gRPC's debug string, when there is one (for logs, not for users).
    """

    def __init__(self, code: grpc.StatusCode, message: str, details: str | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.details = details

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ClientError:
        """Wrap a ``grpc.RpcError`` (sync or ``grpc.aio``), keeping its code and message."""
        code_of = getattr(error, "code", None)
        code = code_of() if callable(code_of) else None
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        details_of = getattr(error, "details", None)
        message = details_of() if callable(details_of) else None
        debug_of = getattr(error, "debug_error_string", None)
        debug = debug_of() if callable(debug_of) else None
        return cls(code, str(message or code.name), str(debug) if debug else None)
