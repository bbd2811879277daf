"""The one mapping from the error tree to gRPC status codes and HTTP statuses, and the one
bookkeeping of a request: in-flight gauge, latency and error metrics, the log of unexpected
failures.

Every request goes through :func:`observe`, once: unary RPCs from
``service.protocol.grpc_server.StatusInterceptor``, each message of a stream from its handler
(a failed message must not close the stream). Either way a client sees the same code and
message for the same error, and the metrics and the log are fed the same way: a call cut off by
its deadline counts as DEADLINE_EXCEEDED, one cancelled by the client as CANCELLED. The KServe v2
HTTP layer (``service.protocol.http``) goes through the same :func:`observe` and answers the
HTTP status of the same canonical code (:data:`HTTP_STATUS`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

from service import metrics
from service.errors import ServiceError

__all__ = [
    "GENERIC_INTERNAL",
    "HTTP_STATUS",
    "Outcome",
    "http_status",
    "observe",
    "observe_failure",
    "record_request",
    "status_of",
]

log = logging.getLogger(__name__)

GENERIC_INTERNAL = "internal error (see the server log)"

_T = TypeVar("_T")


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message of an exception raised by a handler."""
    if isinstance(exc, ServiceError):
        code = grpc.StatusCode[exc.code]
        return code, exc.message if exc.public else GENERIC_INTERNAL
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL


#: The HTTP status of each canonical code: the mapping of google.rpc.Code (the one gRPC-HTTP
#: gateways use), as the Open Inference Protocol's REST form asks for 4xx for a client's error
#: and 5xx for the server's. 499 is the de facto "client closed request".
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}


def http_status(code: grpc.StatusCode) -> int:
    """The HTTP status of a canonical status code."""
    return HTTP_STATUS[code.name]


def observe_failure(method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """:func:`status_of`, logging the traceback of anything that is not a client's error."""
    if not isinstance(exc, ServiceError) or not exc.public:
        log.error("%s failed", method, exc_info=exc)
    return status_of(exc)


def record_request(model: str, method: str, code: str, seconds: float, version: str = "") -> None:
    """Record one answered request: its latency, and an error count when ``code`` is not OK.

    Args:
        model: the bounded model label (``DataPlane.model_label``), "" for none.
        method: the RPC name.
        code: the canonical status name, e.g. ``"OK"`` or ``"INVALID_ARGUMENT"``.
        seconds: time from receiving the request to its answer.
        version: the version that answered ("" when none did: bounded by the versions
            served).
    """
    metrics.REQUEST_SECONDS.labels(model=model, version=version, method=method, code=code).observe(
        seconds
    )
    if code != "OK":
        metrics.ERRORS.labels(model=model, method=method, code=code).inc()


@dataclass(frozen=True)
class Outcome(Generic[_T]):
    """How one request ended: its response, or the status and message to answer.

    Attributes:
        response: the handler's response; None when it failed.
        status: OK, or the failure's status.
        message: the client-safe message of a failure ("" when OK).
    """

    response: _T | None
    status: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""


async def observe(
    method: str,
    model: str,
    time_remaining: Callable[[], float | None],
    call: Callable[[], Awaitable[_T]],
    *,
    version_of: Callable[[_T], str] | None = None,
) -> Outcome[_T]:
    """Run one request with the bookkeeping every request gets.

    Records the request before returning, so that a client that scrapes the metrics right
    after its answer always sees its request counted.

    Args:
        method: the RPC name (metrics label).
        model: the bounded model label; "" for none.
        time_remaining: seconds left until the request's deadline (None: no deadline); read
            when the call is cancelled, to tell a passed deadline from a client's cancel.
        call: the handler.
        version_of: the version that answered, read from a response (the latency's
            ``version`` label); None: "".

    Returns:
        The response, or the status and message of the failure (logged when it is not a
        client's error).

    Raises:
        asyncio.CancelledError: the call was cancelled (recorded as DEADLINE_EXCEEDED when
            its deadline had passed, else CANCELLED).
    """
    started = time.perf_counter()
    in_flight = metrics.IN_FLIGHT.labels(method=method)
    in_flight.inc()

    def record(code: str, version: str = "") -> None:
        in_flight.dec()
        record_request(model, method, code, time.perf_counter() - started, version)

    try:
        response = await call()
    except asyncio.CancelledError:
        remaining = time_remaining()
        record("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED")
        raise
    except Exception as exc:
        status, message = observe_failure(method, exc)
        record(status.name)
        return Outcome(None, status, message)
    record("OK", "" if version_of is None else version_of(response))
    return Outcome(response)
