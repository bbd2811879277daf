"""The hostile-request battery against the real server: malformed requests of both APIs with
the code each must get (and a good request after each, which must succeed), a seeded fuzz of
mutated messages, overload with short deadlines, and SIGTERM under load.

What no client may cause: UNKNOWN, INTERNAL (a client's mistake is never the server's error),
CANCELLED from the server, a status message that grows with the request, an ERROR line or a
traceback in the server's log, a crash, or memory that keeps growing.

Scale: ``MCD_TEST_FUZZ_MESSAGES`` (default 3000) mutated messages; docs/reliability.md has the
figures of a larger run.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.gen.inference import grpc_service_pb2 as oip
from service.protocol.status import MAX_MESSAGE_BYTES
from tests.integration import hostile
from tests.integration.conftest import ExportedModels
from tests.integration.hostile import INFER, PREDICT, Code
from tests.support.server import RunningServer, start_server, stop_server

FUZZ_MESSAGES = int(os.environ.get("MCD_TEST_FUZZ_MESSAGES", "3000"))
FUZZ_SEED = 20240614
#: What a fuzzed message may get: its answer, or the code of a client's mistake or of a limit.
FUZZ_CODES = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED,
              Code.DEADLINE_EXCEEDED}  # fmt: skip
#: The server's memory may grow this much over the fuzz (allocator caches, metrics series):
#: bounded, where an unbounded allocation would be gigabytes.
RSS_GROWTH_BYTES = 256 * 1024 * 1024

GOOD_PREDICT = hostile.predict(num_samples=5).SerializeToString()
GOOD_INFER = hostile.with_parameter(hostile.infer(), "mc_samples", int64_param=5)


def slim_repository(test_models: ExportedModels, folder: Path) -> Path:
    """The two tiny models of the test repository (quick to load), by symbolic links."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tiny_cls", "tiny_reg"):
        (folder / name).symlink_to(test_models.repository / name, target_is_directory=True)
    return folder


def call(
    channel: grpc.Channel, path: str, payload: bytes, timeout_s: float = 30
) -> tuple[Code, str]:
    """Send raw bytes; the status code and message."""
    try:
        channel.unary_unary(path)(payload, timeout=timeout_s)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return Code.OK, ""


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def scrape(server: RunningServer) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """One sample of the exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def assert_clean_log(server: RunningServer) -> None:
    """No ERROR line and no traceback: nothing a client sent was an internal failure."""
    log = server.log()
    assert "Traceback" not in log, log[-5000:]
    assert " ERROR " not in log, log[-5000:]


@pytest.fixture(scope="module")
def battery(
    test_models: ExportedModels, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("battery")
    running = start_server(slim_repository(test_models, workdir / "repository"), workdir)
    yield running
    code = stop_server(running)
    assert code == 0, running.log()


@pytest.fixture(scope="module")
def channel(battery: RunningServer) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(battery.target, options=options) as ch:
        yield ch


KINDS = hostile.kinds()


def test_the_battery_covers_both_apis_with_at_least_40_kinds() -> None:
    assert len(KINDS) >= 40
    assert len({k.name for k in KINDS}) == len(KINDS)
    assert sum(k.path.startswith(hostile.MCD) for k in KINDS) >= 20
    assert sum(k.path.startswith(hostile.OIP) for k in KINDS) >= 20


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_a_malformed_request_gets_its_code_and_the_next_good_one_succeeds(
    channel: grpc.Channel, kind: hostile.Kind
) -> None:
    code, message = call(channel, kind.path, kind.payload)
    assert code == kind.code, message[:500]
    assert kind.fragment in message, message[:500]
    assert len(message.encode()) <= MAX_MESSAGE_BYTES
    assert call(channel, PREDICT, GOOD_PREDICT) == (Code.OK, "")
    assert call(channel, INFER, GOOD_INFER) == (Code.OK, "")


def test_an_undecodable_stream_message_is_answered_in_the_stream_which_goes_on(
    channel: grpc.Channel,
) -> None:
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    answers = [
        oip.ModelStreamInferResponse.FromString(raw)
        for raw in stream(iter([GOOD_INFER, b"\xff\xff\xff", GOOD_INFER]), timeout=30)
    ]
    assert [bool(a.error_message) for a in answers] == [False, True, False]
    assert answers[1].error_message.startswith(
        "INVALID_ARGUMENT: the request is not a valid inference.ModelInferRequest message"
    )
    assert answers[2].infer_response.outputs


def test_undecodable_reflection_requests_are_invalid(channel: grpc.Channel) -> None:
    stream = channel.stream_stream(hostile.REFLECTION)
    with pytest.raises(grpc.RpcError) as info:
        list(stream(iter([b"\xff\xff"]), timeout=10))
    assert info.value.code() == Code.INVALID_ARGUMENT


def test_health_watch_streams_through_the_interceptor(channel: grpc.Channel) -> None:
    """Watch (a unary-stream handler that writes through its context) still streams when the
    interceptor re-registers it for tolerant decoding."""
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="tiny_cls"), timeout=10
    )
    first = next(iter(watch))
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    stream = channel.unary_stream("/grpc.health.v1.Health/Watch")
    with pytest.raises(grpc.RpcError) as info:
        list(stream(b"\xff\xff", timeout=10))
    assert info.value.code() == Code.INVALID_ARGUMENT


def test_undecodable_requests_are_counted_and_logged_at_most_once_in_a_while(
    battery: RunningServer, channel: grpc.Channel
) -> None:
    labels = {"model": "", "method": "ModelInfer", "code": "INVALID_ARGUMENT"}
    before = sample(scrape(battery), "mcd_request_errors_total", **labels)
    for _ in range(50):
        assert call(channel, INFER, b"\xff\xff")[0] == Code.INVALID_ARGUMENT
    after = sample(scrape(battery), "mcd_request_errors_total", **labels)
    assert after - before == 50
    lines = [line for line in battery.log().splitlines() if "undecodable request" in line]
    assert 1 <= len(lines) <= 10, lines  # rate-limited, where grpcio logged 50 tracebacks
    assert_clean_log(battery)


def test_fuzzed_messages_get_client_codes_and_the_memory_stays_bounded(
    battery: RunningServer, channel: grpc.Channel
) -> None:
    messages = hostile.fuzzed(FUZZ_SEED, FUZZ_MESSAGES)
    # Warm up first: the answers' sizes, metrics series and allocator pools settle.
    for path, payload in messages[:200]:
        call(channel, path, payload)
    rss_before = rss_bytes(battery.process.pid)
    codes: Counter[Code] = Counter()
    window = 32  # calls in flight at once
    for start in range(0, len(messages), window):
        futures = [
            channel.unary_unary(path).future(payload, timeout=30)
            for path, payload in messages[start : start + window]
        ]
        for future in futures:
            try:
                future.result()
                codes[Code.OK] += 1
            except grpc.RpcError as error:
                codes[error.code()] += 1
    rss_after = rss_bytes(battery.process.pid)
    print(f"fuzz: {len(messages)} messages (seed {FUZZ_SEED}):",
          {c.name: n for c, n in codes.most_common()},
          f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")  # fmt: skip
    assert set(codes) <= FUZZ_CODES, codes
    assert sum(codes.values()) == len(messages)
    assert codes[Code.INVALID_ARGUMENT] > len(messages) // 10  # the mutations did break things
    assert rss_after - rss_before < RSS_GROWTH_BYTES, (rss_before, rss_after)
    assert battery.process.poll() is None
    assert call(channel, PREDICT, GOOD_PREDICT) == (Code.OK, "")
    assert_clean_log(battery)


def test_overload_with_short_deadlines_gets_only_ok_exhausted_or_deadline(
    battery: RunningServer, channel: grpc.Channel
) -> None:
    """400 heavy requests at once against an admission limit of 66 (2 workers + 64 queued),
    each with a 0.5 s deadline: some run, the rest are refused or run out of time."""
    heavy = hostile.predict(x=np.ones((64, 6), np.float32), num_samples=6000).SerializeToString()
    futures = [channel.unary_unary(PREDICT).future(heavy, timeout=0.5) for _ in range(400)]
    codes: Counter[Code] = Counter()
    for future in futures:
        try:
            future.result()
            codes[Code.OK] += 1
        except grpc.RpcError as error:
            codes[error.code()] += 1
    print("overload: 400 requests at once, 0.5 s deadlines:",
          {c.name: n for c, n in codes.most_common()})  # fmt: skip
    assert set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED}, codes
    assert codes[Code.RESOURCE_EXHAUSTED] > 0, codes  # it was an overload
    # Afterwards: nothing left in flight or queued, and the server answers.
    deadline = time.monotonic() + 30
    while True:
        text = scrape(battery)
        in_flight = sample(text, "mcd_requests_in_flight", method="Predict")
        if in_flight == 0 and "mcd_queue_depth 0.0" in text:
            break
        assert time.monotonic() < deadline, (in_flight, text)
        time.sleep(0.1)
    assert call(channel, PREDICT, GOOD_PREDICT) == (Code.OK, "")
    assert_clean_log(battery)


def test_the_metrics_port_answers_metrics_only_on_metrics(battery: RunningServer) -> None:
    assert "mcd_request_duration_seconds" in scrape(battery)
    for path in ("/", "/healthz", "/metrics/x", "/favicon.ico"):
        url = f"http://127.0.0.1:{battery.metrics_port}{path}"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=10)
        assert info.value.code == 404, path


# -- SIGTERM under load ---------------------------------------------------------------------------

CALLERS = 24
DRAIN_S = 0.5


def _hammer(target: str, stop: threading.Event, codes: Counter[Code], lock: threading.Lock) -> None:
    """Predict until told to stop, on its own connection; every answer's code is counted."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per caller
    with grpc.insecure_channel(target, options=options) as channel:
        predict = channel.unary_unary(PREDICT)
        while not stop.is_set():
            try:
                predict(GOOD_PREDICT, timeout=10)
                code = Code.OK
            except grpc.RpcError as error:
                code = error.code()
            with lock:
                codes[code] += 1
            if code == Code.UNAVAILABLE:
                time.sleep(0.005)  # a client's retry backoff, kept short to stay close


def test_sigterm_under_load_answers_no_call_cancelled(
    test_models: ExportedModels, tmp_path: Path
) -> None:
    """Callers keep calling through the drain, the stop and the exit: every call is answered
    OK (served) or UNAVAILABLE (refused while stopping, or no server any more), never
    CANCELLED, and the server exits 0."""
    running = start_server(
        slim_repository(test_models, tmp_path / "repository"), tmp_path,
        "--drain-period-s", str(DRAIN_S), "--grace-period-s", "5",
    )  # fmt: skip
    codes: Counter[Code] = Counter()
    lock = threading.Lock()
    stop = threading.Event()
    callers = [
        threading.Thread(target=_hammer, args=(running.target, stop, codes, lock))
        for _ in range(CALLERS)
    ]
    try:
        for caller in callers:
            caller.start()
        time.sleep(1.0)
        with lock:
            served_before = codes[Code.OK]
        running.process.send_signal(signal.SIGTERM)
        exit_code = running.process.wait(30)
        time.sleep(0.3)  # calls made after the exit: refused connections
    finally:
        stop.set()
        for caller in callers:
            caller.join(30)
        if running.process.poll() is None:
            running.process.kill()
    print("SIGTERM under load:", {c.name: n for c, n in codes.items()})
    assert exit_code == 0, running.log()
    assert served_before > 0
    assert set(codes) <= {Code.OK, Code.UNAVAILABLE}, codes
    assert codes[Code.UNAVAILABLE] > 0, codes
    assert re.search(r"closed \d+ client connection\(s\)", running.log())
