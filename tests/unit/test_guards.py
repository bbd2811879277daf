"""The protocol layer's guards, without a server: bounded messages, rate-limited logs, the gate
of a stop, tolerant decoding, the interceptor's admission (tokens, stopping), the connection
cut, the metrics endpoint's paths and the grpc options of the settings."""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import grpc
import pytest

from service import errors, metrics
from service.gen.inference import grpc_service_pb2 as oip
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.protocol.auth import BearerTokens
from service.protocol.decoding import Undecodable, tolerant
from service.protocol.grpc_server import server_options
from service.protocol.interceptor import StatusInterceptor
from service.protocol.sockets import cut_connections
from service.protocol.status import (
    MAX_MESSAGE_BYTES,
    Gate,
    LogEvery,
    bounded,
    observe,
    status_of,
)
from service.settings import Settings

# -- messages -----------------------------------------------------------------------------------


def test_quote_cuts_a_long_value_and_says_how_much() -> None:
    assert errors.quote("nope") == "'nope'"
    shown = errors.quote("m" * 1_000_000)
    assert shown.startswith("'" + "m" * errors.MAX_QUOTED_CHARS + "'…")
    assert shown.endswith(f"(+{1_000_000 - errors.MAX_QUOTED_CHARS} characters)")
    assert len(shown) < 2 * errors.MAX_QUOTED_CHARS
    assert len(errors.quote(list(range(10_000)))) < 2 * errors.MAX_QUOTED_CHARS
    assert errors.quote("\x00\n") == repr("\x00\n")  # control characters escaped


def test_error_messages_quote_client_values() -> None:
    assert len(errors.ModelNotFound("x" * 100_000).message) < 200
    assert len(errors.VersionNotFound("x" * 100_000, "9" * 100_000, ["1"]).message) < 300


@pytest.mark.parametrize("char", ["a", "é", "😀"])
def test_every_status_message_is_bounded_in_utf8_bytes(char: str) -> None:
    code, message = status_of(errors.InvalidInput(char * 100_000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message.encode()) <= MAX_MESSAGE_BYTES
    assert message.endswith("bytes)")
    assert bounded("short") == "short"


def test_unauthenticated_is_in_the_error_tree() -> None:
    assert status_of(errors.Unauthenticated("no")) == (grpc.StatusCode.UNAUTHENTICATED, "no")


# -- rate-limited log ---------------------------------------------------------------------------


def test_log_every_writes_one_line_per_interval_counting_the_rest() -> None:
    now = [0.0]
    stream = io.StringIO()
    logger = logging.getLogger("test_guards.log_every")
    logger.addHandler(logging.StreamHandler(stream))
    logger.propagate = False
    limited = LogEvery(logger, interval_s=10.0, clock=lambda: now[0])
    written = []
    for t in range(25):
        now[0] = float(t)
        written.append(limited.event(f"event {t}"))
    assert written.count(True) == 3  # at 0, 10 and 20 s
    lines = stream.getvalue().splitlines()
    assert lines[0] == "event 0 (1 such event(s))"
    assert lines[1] == "event 10 (10 such event(s) in the last 10 s)"


# -- the gate -----------------------------------------------------------------------------------


def test_a_closed_gate_refuses_new_requests_and_waits_for_the_running_ones() -> None:
    gate = Gate()
    release = asyncio.Event()
    ran = []

    async def handler() -> str:
        ran.append(1)
        await release.wait()
        return "done"

    async def scenario() -> None:
        running = asyncio.create_task(observe("Predict", "m", lambda: None, handler, gate=gate))
        await asyncio.sleep(0.01)
        assert gate.running == 1
        gate.close()
        refused = await observe("Predict", "m", lambda: None, handler, gate=gate)
        assert refused.status == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in refused.message
        assert len(ran) == 1  # the refused request never ran
        assert not await gate.wait_idle(0.01)  # the first one still runs
        release.set()
        assert await gate.wait_idle(5)
        assert await gate.wait_idle(0)  # idle: true at once, even without time to wait
        assert (await running).response == "done"
        assert gate.running == 0

    asyncio.run(scenario())


# -- tolerant decoding -------------------------------------------------------------------------


def test_tolerant_decoding_turns_a_decode_error_into_a_value() -> None:
    decode = tolerant(pb.PredictRequest.FromString)
    assert decode is not None
    assert decode(pb.PredictRequest(model="m").SerializeToString()).model == "m"
    bad = decode(b"\xff\xff")
    assert bad == Undecodable("mcdropout.v1.PredictRequest", 2)
    assert bad.error().code == "INVALID_ARGUMENT"
    assert tolerant(None) is None
    assert tolerant(decode) is decode


# -- the interceptor ----------------------------------------------------------------------------


class Context:
    """A servicer context: metadata in, the abort's status out."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def time_remaining(self) -> float | None:
        return 30.0

    def cancelled(self) -> bool:
        return False

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


def details(path: str, token: str | None) -> Any:
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    return MagicMock(method=path, invocation_metadata=metadata)


async def _unary(request: Any, context: Any) -> str:
    return "answer"


async def _stream(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[str]:
    async for _ in requests:
        yield "answer"


def handler_of(kind: str) -> grpc.RpcMethodHandler:
    if kind == "unary":
        return grpc.unary_unary_rpc_method_handler(
            _unary, request_deserializer=oip.ModelReadyRequest.FromString
        )
    return grpc.stream_stream_rpc_method_handler(
        _stream, request_deserializer=oip.ModelInferRequest.FromString
    )


async def run_call(
    interceptor: StatusInterceptor, path: str, token: str | None, kind: str, payload: bytes
) -> tuple[Any, Context]:
    original = handler_of(kind)

    async def continuation(_: Any) -> grpc.RpcMethodHandler:
        return original

    handler = await interceptor.intercept_service(continuation, details(path, token))
    context = Context()
    request = handler.request_deserializer(payload)
    result: Any = None
    try:
        if kind == "unary":
            result = await handler.unary_unary(request, context)
        else:

            async def requests() -> AsyncIterator[Any]:
                yield request

            # grpc.aio takes an async generator or a coroutine (that writes through context)
            answers = handler.stream_stream(requests(), context)
            if inspect.isasyncgen(answers):
                result = [r async for r in answers]
            else:
                result = await answers
    except grpc.aio.AbortError:
        pass
    return result, context


READY = "/inference.GRPCInferenceService/ModelReady"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HEALTH = "/grpc.health.v1.Health/Check"


@pytest.fixture
def tokens(tmp_path: Path) -> BearerTokens:
    path = tmp_path / "tokens"
    path.write_text("good-token\n")
    return BearerTokens(path)


def errors_recorded(method: str, code: str) -> float:
    labels = {"model": "", "method": method, "code": code}
    return metrics.REGISTRY.get_sample_value("mcd_request_errors_total", labels) or 0.0


@pytest.mark.parametrize(
    ("path", "kind", "recorded"),
    [(READY, "unary", "ModelReady"), (STREAM, "stream", "ModelStreamInfer"),
     (REFLECTION, "stream", None)],
)  # fmt: skip
def test_a_call_without_an_accepted_token_is_unauthenticated(
    tokens: BearerTokens, path: str, kind: str, recorded: str | None
) -> None:
    interceptor = StatusInterceptor(lambda name: name, tokens=tokens)
    payload = oip.ModelReadyRequest(name="m").SerializeToString() if kind == "unary" else b""
    for token in (None, "wrong-token"):
        before = errors_recorded(recorded, "UNAUTHENTICATED") if recorded else 0.0
        result, context = asyncio.run(run_call(interceptor, path, token, kind, payload))
        assert context.aborted is not None
        assert context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
        assert result is None
        if recorded:
            assert errors_recorded(recorded, "UNAUTHENTICATED") == before + 1
    result, context = asyncio.run(run_call(interceptor, path, "good-token", kind, payload))
    assert context.aborted is None
    assert result in ("answer", ["answer"])


def test_health_needs_no_token_and_still_answers_while_stopping(tokens: BearerTokens) -> None:
    gate = Gate()
    gate.close()
    interceptor = StatusInterceptor(lambda name: name, gate=gate, tokens=tokens)
    payload = oip.ModelReadyRequest().SerializeToString()
    result, context = asyncio.run(run_call(interceptor, HEALTH, None, "unary", payload))
    assert context.aborted is None
    assert result == "answer"


@pytest.mark.parametrize(("path", "kind"), [(READY, "unary"), (STREAM, "stream"),
                                            (REFLECTION, "stream")])  # fmt: skip
def test_once_stopping_every_new_call_is_unavailable(path: str, kind: str) -> None:
    gate = Gate()
    gate.close()
    interceptor = StatusInterceptor(lambda name: name, gate=gate)
    _, context = asyncio.run(run_call(interceptor, path, None, kind, b""))
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("path", [READY, HEALTH])
def test_an_undecodable_unary_request_is_invalid_and_counted(path: str) -> None:
    interceptor = StatusInterceptor(lambda name: name)
    before = errors_recorded("ModelReady", "INVALID_ARGUMENT")
    _, context = asyncio.run(run_call(interceptor, path, None, "unary", b"\xff\xff"))
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid inference.ModelReadyRequest message (2 bytes)" in context.aborted[1]
    counted = errors_recorded("ModelReady", "INVALID_ARGUMENT") - before
    assert counted == (1 if path == READY else 0)  # health is not in the API metrics


def test_an_undecodable_message_ends_a_reflection_stream_invalid() -> None:
    interceptor = StatusInterceptor(lambda name: name)
    _, context = asyncio.run(run_call(interceptor, REFLECTION, None, "stream", b"\xff\xff"))
    assert context.aborted is not None
    assert context.aborted[0] == grpc.StatusCode.INVALID_ARGUMENT


# -- the connection cut -------------------------------------------------------------------------


def test_cut_connections_refuses_new_ones_and_ends_the_accepted_ones() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    other = socket.create_server(("127.0.0.1", 0))  # another port: left alone
    try:
        assert cut_connections([port]) == 1
        client.settimeout(5)
        assert client.recv(1) == b""  # the server's side is shut down: end of stream
        with pytest.raises(ConnectionRefusedError):  # the listener no longer accepts
            socket.create_connection(("127.0.0.1", port), timeout=5)
        assert other.getsockname()[1] > 0
        other_client = socket.create_connection(other.getsockname())
        other_client.close()
    finally:
        for s in (listener, client, accepted, other):
            s.close()


# -- metrics endpoint ---------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "status"), [("/metrics", "200 OK"), ("/", "404 Not Found"),
                                              ("/metricsx", "404 Not Found"),
                                              ("/health", "404 Not Found")])  # fmt: skip
def test_the_metrics_app_serves_metrics_only_on_its_path(path: str, status: str) -> None:
    started: list[str] = []
    body = b"".join(
        metrics.metrics_app()(
            {"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""},
            lambda s, headers: started.append(s),
        )
    )
    assert started == [status]
    assert (b"mcd_request_duration_seconds" in body) == (status == "200 OK")


# -- grpc options -------------------------------------------------------------------------------


def test_the_connection_limits_reach_the_grpc_options() -> None:
    settings = Settings(
        max_concurrent_streams=7, max_connections=9, keepalive_time_s=30, keepalive_timeout_s=5,
        keepalive_min_ping_interval_s=2.5, keepalive_permit_without_calls=False,
        max_connection_age_s=600, max_connection_age_grace_s=15,
    )  # fmt: skip
    options = dict(server_options(settings))
    assert options["grpc.max_concurrent_streams"] == 7
    assert options["grpc.max_allowed_incoming_connections"] == 9
    assert options["grpc.keepalive_time_ms"] == 30_000
    assert options["grpc.keepalive_timeout_ms"] == 5000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 2500
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 15_000
    unlimited = dict(server_options(Settings(max_connection_age_s=0)))
    assert "grpc.max_connection_age_ms" not in unlimited


class LateContext(Context):
    """A call whose deadline passes while its answer is being sent, as under overload."""

    def __init__(self, remaining_s: list[float]) -> None:
        super().__init__()
        self.remaining_s = remaining_s

    def time_remaining(self) -> float | None:
        return self.remaining_s.pop(0) if len(self.remaining_s) > 1 else self.remaining_s[0]

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise RuntimeError("Failed execute_batch")  # what grpcio raises for a dead call


@pytest.mark.parametrize(("remaining_s", "raised"), [
    ([0.0], asyncio.CancelledError),  # gone before the answer: nothing is sent
    ([5.0, 0.0], asyncio.CancelledError),  # gone while it was sent: grpcio's failure swallowed
    ([5.0, 5.0], RuntimeError),  # a failure of a live call is not hidden
])  # fmt: skip
def test_an_answer_to_a_call_past_its_deadline_ends_it_cancelled_not_logged(
    remaining_s: list[float], raised: type[BaseException]
) -> None:
    interceptor = StatusInterceptor(lambda name: name)

    async def continuation(_: Any) -> grpc.RpcMethodHandler:
        async def fails(request: Any, context: Any) -> None:
            raise errors.ResourceExhausted("queue full")

        return grpc.unary_unary_rpc_method_handler(
            fails, request_deserializer=oip.ModelReadyRequest.FromString
        )

    async def scenario() -> None:
        handler = await interceptor.intercept_service(continuation, details(READY, None))
        request = oip.ModelReadyRequest(name="m")
        await handler.unary_unary(request, LateContext(remaining_s))

    with pytest.raises(raised):
        asyncio.run(scenario())
