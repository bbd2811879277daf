"""The one mapping from the error tree to gRPC status codes and HTTP statuses, and the one
bookkeeping of a request: in-flight gauge, latency and error metrics, the log of unexpected
failures.

Every request goes through :func:`observe`, once: unary RPCs from
``service.protocol.interceptor.StatusInterceptor``, each message of a stream from its handler
(a failed message must not close the stream). Either way a client sees the same code and
message for the same error, and the metrics and the log are fed the same way: a call cut off by
its deadline counts as DEADLINE_EXCEEDED, one cancelled by the client as CANCELLED. A
:class:`Gate` counts the requests running and, once the server stops, refuses new ones with
UNAVAILABLE (the code clients retry), before grpcio's own stop could cancel them. The KServe
v2 HTTP layer (``service.protocol.http``) goes through the same :func:`observe` and answers the
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
from service.errors import ServiceError, Unavailable

__all__ = [
    "GENERIC_INTERNAL",
    "HTTP_STATUS",
    "MAX_MESSAGE_BYTES",
    "SHUTTING_DOWN",
    "Gate",
    "LogEvery",
    "Outcome",
    "bounded",
    "http_status",
    "observe",
    "observe_failure",
    "record_request",
    "status_of",
]

log = logging.getLogger(__name__)

GENERIC_INTERNAL = "internal error (see the server log)"
SHUTTING_DOWN = "the server is shutting down; retry (another replica will answer)"
#: The longest status message sent, in UTF-8 bytes. The message travels percent-encoded in the
#: ``grpc-message`` trailer (up to 3 bytes per byte) and clients refuse trailers above 16 KiB by
#: default: 2 KiB keeps every answer far below, whatever the message echoes.
MAX_MESSAGE_BYTES = 2048

_T = TypeVar("_T")


def bounded(message: str, max_bytes: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut to ``max_bytes`` of UTF-8 (on a character boundary), marked as cut.

    The last guard behind ``service.errors.quote``: a message built from many client values
    (a list of a thousand unknown input names) still fits in a status trailer.
    """
    encoded = message.encode("utf-8", "replace")
    if len(encoded) <= max_bytes:
        return message
    cut = encoded[: max_bytes - 64].decode("utf-8", "ignore")
    return f"{cut}… (message cut: {len(encoded)} bytes)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message of an exception raised by a handler."""
    if isinstance(exc, ServiceError):
        code = grpc.StatusCode[exc.code]
        return code, bounded(exc.message) if exc.public else GENERIC_INTERNAL
    return grpc.StatusCode.INTERNAL, GENERIC_INTERNAL


class LogEvery:
    """One log line per ``interval_s`` at most for a kind of event a client can repeat at will
    (undecodable messages, wrong tokens): a flood of bad requests cannot flood the log. Each
    line says how many events it stands for.

    Args:
        logger: where the lines go (WARNING).
        interval_s: the shortest time between two lines.
        clock: monotonic seconds (a parameter for tests).
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._events = 0

    def event(self, message: str) -> bool:
        """Count one event; log ``message`` (the latest event) when the interval has passed.

        Returns:
            Whether a line was written.
        """
        self._events += 1
        now = self._clock()
        if self._last is not None and now - self._last < self._interval_s:
            return False
        since = "" if self._last is None else f" in the last {now - self._last:.0f} s"
        self._logger.warning("%s (%d such event(s)%s)", message, self._events, since)
        self._last = now
        self._events = 0
        return True


class Gate:
    """Admits requests until the server stops, and counts the ones running.

    Every request (a unary call, a message of a stream) enters through :func:`observe`. Once
    :meth:`close` is called, new requests are answered UNAVAILABLE at once, and
    :meth:`wait_idle` returns when the running ones are done.
    """

    def __init__(self) -> None:
        self._closed = False
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def running(self) -> int:
        """Requests admitted and not answered yet."""
        return self._running

    def close(self) -> None:
        """Refuse every new request (UNAVAILABLE) from now on."""
        self._closed = True

    def enter(self) -> None:
        self._running += 1
        self._idle.clear()

    def leave(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request runs, at most ``timeout_s``.

        Returns:
            Whether every request finished in time.
        """
        if self._running == 0:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


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
    gate: Gate | None = None,
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
        gate: the server's gate: the request is counted while it runs, or refused with
            UNAVAILABLE (and not run) when the server is stopping. None: always run.
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

    if gate is not None:
        if gate.closed:
            status, message = status_of(Unavailable(SHUTTING_DOWN))
            record(status.name)
            return Outcome(None, status, message)
        gate.enter()
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
    finally:
        if gate is not None:
            gate.leave()
    record("OK", "" if version_of is None else version_of(response))
    return Outcome(response)
