"""The one mapping from the error tree to gRPC status codes, and the per-request metrics.

Unary RPCs reach it through ``service.protocol.grpc_server.StatusInterceptor``; streams answer each
message separately (a failed message must not close the stream), so their handlers call
:func:`observe_failure` and :func:`record_request` themselves, per message. Either way a
client sees the same code and message for the same error, and the metrics and the log are
fed the same way.
"""

from __future__ import annotations

import logging

import grpc

from service import metrics
from service.errors import ServiceError

__all__ = ["GENERIC_INTERNAL", "observe_failure", "record_request", "status_of"]

log = logging.getLogger(__name__)

GENERIC_INTERNAL = "internal error (see the server log)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message of an exception raised by a handler."""
    if isinstance(exc, ServiceError):
        code = grpc.StatusCode[exc.code]
        return code, exc.message if exc.public else GENERIC_INTERNAL
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL


def observe_failure(method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """:func:`status_of`, logging the traceback of anything that is not a client's error."""
    if not isinstance(exc, ServiceError) or not exc.public:
        log.error("%s failed", method, exc_info=exc)
    return status_of(exc)


def record_request(model: str, method: str, code: str, seconds: float) -> None:
    """Record one answered request: its latency, and an error count when ``code`` is not OK.

    Args:
        model: the bounded model label (``DataPlane.model_label``), "" for none.
        method: the RPC name.
        code: the canonical status name, e.g. ``"OK"`` or ``"INVALID_ARGUMENT"``.
        seconds: time from receiving the request to its answer.
    """
    metrics.REQUEST_SECONDS.labels(model=model, method=method, code=code).observe(seconds)
    if code != "OK":
        metrics.ERRORS.labels(model=model, method=method, code=code).inc()
