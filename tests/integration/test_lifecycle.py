"""Model lifecycle through the real server: one bad model never stops it, readiness without a
ready model, and versions loaded, swapped and unloaded under continuous load on both APIs with
no failed request.

Each test builds its own repository of hand-made graphs (``tests.handmade``: ``y = Dropout(x) @
W + offset``; zero inputs answer exactly ``offset``, which tells the copy that served).
"""

from __future__ import annotations

import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.gen.inference import grpc_service_pb2 as oip
from service.gen.inference import grpc_service_pb2_grpc as oip_grpc
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.protocol.codec import decode_tensor, encode_tensor
from tests import handmade
from tests.support.server import SERVER_FLAGS, RunningServer, start_server, stop_server
from tools.launcher import ServiceProcess, service_command

Code = grpc.StatusCode
HealthStatus = health_pb2.HealthCheckResponse
ZEROS = np.zeros((2, handmade.FEATURES), np.float32)
#: Longest wait for the server to pick up a change (a loose bound, not a timing assertion).
WAIT_S = 60.0


def publish(root: Path, name: str, version: int, offset: float, **graph: Any) -> Path:
    return handmade.publish(
        root, name, version, handmade.graph(offset, **graph), handmade.config(name)
    )


def publish_probe_failure(root: Path, name: str) -> Path:
    """A version whose config.json names a width the graph cannot take: the checks pass (the
    graph's width is symbolic), the load-time probe raises inside ONNX Runtime."""
    return handmade.publish(
        root, name, 1, handmade.graph(0.0, feature_dim="n"), handmade.config(name, features=7)
    )


def predict(
    stub: pb_grpc.MCDropoutServiceStub, model: str, x: np.ndarray[Any, Any]
) -> pb.PredictResponse:
    request = pb.PredictRequest(
        model=model,
        num_samples=4,
        inputs=[pb.NamedTensor(name="x", tensor=encode_tensor(x))],
    )
    response: pb.PredictResponse = stub.Predict(request, timeout=30)
    return response


def health(channel: grpc.Channel, service: str) -> int | None:
    """The health status of ``service``; None for NOT_FOUND."""
    try:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    except grpc.RpcError as error:
        if error.code() == Code.NOT_FOUND:
            return None
        raise
    status: int = response.status
    return status


def scrape(server: RunningServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as r:
        body: bytes = r.read()
    return body.decode()


def series(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


@pytest.fixture
def stopped(tmp_path: Path) -> Iterator[list[RunningServer]]:
    """Servers started by a test, stopped (and checked to exit 0) after it."""
    servers: list[RunningServer] = []
    yield servers
    for server in servers:
        code = stop_server(server)
        assert code == 0, f"server exited with {code}:\n{server.log()}"


# -- one bad model never stops the server ------------------------------------------------------


def test_one_bad_model_never_stops_the_server(tmp_path: Path, stopped: list[RunningServer]) -> None:
    """Fails on a server whose start-up load lets a probe's exception out: it exits."""
    repository = tmp_path / "repository"
    publish(repository, "good", 1, 4.0)
    publish_probe_failure(repository, "probe_fails")
    broken = publish(repository, "bad_config", 1, 1.0)
    (broken / "config.json").write_text('{"task": "regression", "inputs": "x"}')
    server = start_server(repository, tmp_path)
    stopped.append(server)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.MCDropoutServiceStub(channel)
        answer = predict(stub, "good", ZEROS)
        np.testing.assert_array_equal(decode_tensor(answer.outputs[0].mean, "mean"), 4.0)

        assert health(channel, "") == HealthStatus.SERVING
        assert health(channel, "good") == HealthStatus.SERVING
        assert health(channel, "probe_fails") == HealthStatus.NOT_SERVING
        assert health(channel, "bad_config") == HealthStatus.NOT_SERVING
        assert health(channel, "no_such_model") is None

        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert set(models) == {"good", "probe_fails", "bad_config"}
        assert models["good"].ready
        assert not models["probe_fails"].ready
        assert list(models["probe_fails"].versions) == []
        assert "probe_fails/1: the load-time probe" in models["probe_fails"].reason
        assert "ONNXRuntimeError" in models["probe_fails"].reason
        assert "needs inputs[]" in models["bad_config"].reason
        [status] = models["probe_fails"].version_status
        assert (status.version, status.state) == ("1", pb.VERSION_STATE_UNAVAILABLE)

        with pytest.raises(grpc.RpcError) as error:
            stub.GetModelMetadata(pb.GetModelMetadataRequest(model="probe_fails"))
        assert error.value.code() == Code.UNAVAILABLE
        assert "probe_fails/1: the load-time probe" in (error.value.details() or "")
        with pytest.raises(grpc.RpcError) as error:
            predict(stub, "probe_fails", np.zeros((1, 7), np.float32))
        assert error.value.code() == Code.UNAVAILABLE

        inference = oip_grpc.GRPCInferenceServiceStub(channel)
        assert inference.ServerReady(oip.ServerReadyRequest()).ready
        assert not inference.ModelReady(oip.ModelReadyRequest(name="probe_fails")).ready
        assert inference.ModelReady(oip.ModelReadyRequest(name="good")).ready
        with pytest.raises(grpc.RpcError) as error:
            inference.ModelMetadata(oip.ModelMetadataRequest(name="probe_fails"))
        assert error.value.code() == Code.UNAVAILABLE
        assert "load-time probe" in (error.value.details() or "")
    assert "not serving" in server.log()
    assert "probe_fails/1: the load-time probe" in server.log()


def start_unready(repository: Path, workdir: Path, *extra: str) -> RunningServer:
    """Start the server and wait for its port file only (it is written once the models are
    loaded), not for health SERVING."""
    port_file = workdir / "server-ports.json"
    server = ServiceProcess(
        "python -m service",
        service_command(repository, port_file, [*SERVER_FLAGS, *extra]),
        port_file=port_file,
        log_path=workdir / "server.log",
    )
    try:
        server.wait_until(server.port_file_ready, WAIT_S)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.mark.parametrize("allow_empty_start", [False, True])
def test_a_server_without_a_ready_model_is_not_ready_unless_allowed(
    tmp_path: Path, stopped: list[RunningServer], allow_empty_start: bool
) -> None:
    repository = tmp_path / "repository"
    publish_probe_failure(repository, "probe_fails")
    flags = ["--allow-empty-start"] if allow_empty_start else []
    server = start_unready(repository, tmp_path, *flags)
    stopped.append(server)
    expected = HealthStatus.SERVING if allow_empty_start else HealthStatus.NOT_SERVING
    with grpc.insecure_channel(server.target) as channel:
        assert health(channel, "") == expected
        assert health(channel, "mcdropout.v1.MCDropoutService") == expected
        assert health(channel, "probe_fails") == HealthStatus.NOT_SERVING
        inference = oip_grpc.GRPCInferenceServiceStub(channel)
        assert inference.ServerReady(oip.ServerReadyRequest()).ready is allow_empty_start
        assert inference.ServerLive(oip.ServerLiveRequest()).live


# -- hot swaps under continuous load -----------------------------------------------------------


@dataclass
class Caller:
    """One client calling the newest version of ``live`` in a loop, recording what answered."""

    name: str
    call: Callable[[], tuple[str, float]]
    answers: list[tuple[int, str, float]] = field(default_factory=list)  # (phase, version, y)
    failures: list[str] = field(default_factory=list)

    def run(self, stop: threading.Event, phase: list[int]) -> None:
        while not stop.is_set():
            current = phase[0]
            try:
                version, value = self.call()
            except Exception as error:  # every failure is a test failure, recorded
                self.failures.append(f"phase {current}: {error!r}")
                continue
            self.answers.append((current, version, value))

    def seen(self, phase: int, version: str, value: float) -> bool:
        """Whether a call started in ``phase`` was answered by this copy."""
        return any(a == (phase, version, value) for a in self.answers[-5:])


def predict_caller(channel: grpc.Channel) -> Callable[[], tuple[str, float]]:
    stub = pb_grpc.MCDropoutServiceStub(channel)

    def call() -> tuple[str, float]:
        answer = predict(stub, "live", ZEROS)
        return answer.version, _single(decode_tensor(answer.outputs[0].mean, "mean"))

    return call


def infer_request() -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="live")
    request.inputs.add(name="x", datatype="FP32", shape=ZEROS.shape)
    request.raw_input_contents.append(ZEROS.tobytes())
    request.parameters["mc_samples"].int64_param = 4
    request.outputs.add(name="y_mean")
    return request


def infer_caller(channel: grpc.Channel) -> Callable[[], tuple[str, float]]:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)

    def call() -> tuple[str, float]:
        response = stub.ModelInfer(infer_request(), timeout=30)
        return response.model_version, _single(np.frombuffer(response.raw_output_contents[0]))

    return call


def stream_caller(channel: grpc.Channel) -> Callable[[], tuple[str, float]]:
    """One ModelStreamInfer stream per call of 4 messages; an error message is a failure."""
    stub = oip_grpc.GRPCInferenceServiceStub(channel)

    def call() -> tuple[str, float]:
        answers = list(stub.ModelStreamInfer(iter([infer_request()] * 4), timeout=30))
        errors = [a.error_message for a in answers if a.error_message]
        assert not errors, errors
        assert len(answers) == 4
        pairs = {
            (a.infer_response.model_version,
             _single(np.frombuffer(a.infer_response.raw_output_contents[0])))
            for a in answers
        }  # fmt: skip
        return sorted(pairs)[-1]

    return call


def _single(values: Any) -> float:
    array = np.asarray(values, dtype=np.float64)
    assert np.all(array == array.flat[0]), array
    return float(array.flat[0])


def test_hot_swaps_under_continuous_load_fail_no_request(
    tmp_path: Path, stopped: list[RunningServer]
) -> None:
    """Several callers on both APIs call the newest version of ``live`` throughout: a new
    version appears, the newest is replaced in place, a broken newer version appears, the
    oldest folder is removed. Not one call fails; each change reaches every caller."""
    repository = tmp_path / "repository"
    publish(repository, "live", 1, 1.0)
    server = start_server(repository, tmp_path, "--repository-poll-s", "0.1")
    stopped.append(server)
    channels = [grpc.insecure_channel(server.target) for _ in range(4)]
    callers = [
        Caller("Predict-1", predict_caller(channels[0])),
        Caller("Predict-2", predict_caller(channels[1])),
        Caller("ModelInfer-1", infer_caller(channels[2])),
        Caller("ModelInfer-2", infer_caller(channels[3])),
        Caller("ModelStreamInfer", stream_caller(channels[0])),
    ]
    stop = threading.Event()
    phase = [0]
    threads = [threading.Thread(target=c.run, args=(stop, phase), daemon=True) for c in callers]

    def reached(version: str, value: float) -> None:
        """Wait until every caller got answers from this copy, then start the next phase."""
        wait_until(lambda: all(c.seen(phase[0], version, value) for c in callers), server)
        phase[0] += 1

    def listed() -> dict[str, pb.ModelSummary]:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.MCDropoutServiceStub(channel)
            return {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}

    try:
        for thread in threads:
            thread.start()
        reached("1", 1.0)
        publish(repository, "live", 2, 2.0)  # a new version, published by rename
        reached("2", 2.0)
        handmade.replace_files(repository / "live" / "2", handmade.graph(3.0),
                               handmade.config("live"))  # fmt: skip
        reached("2", 3.0)  # the same version, changed files: swapped in
        # A broken newer version: its probe fails inside ONNX Runtime.
        handmade.publish(repository, "live", 3, handmade.graph(0.0, feature_dim="n"),
                         handmade.config("live", features=7))  # fmt: skip
        wait_until(lambda: [s.state for s in listed()["live"].version_status][:1]
                   == [pb.VERSION_STATE_UNAVAILABLE], server)  # fmt: skip
        reached("2", 3.0)  # the broken newer version left the current one serving
        shutil.rmtree(repository / "live" / "1")
        wait_until(lambda: list(listed()["live"].versions) == ["2"], server)
        reached("2", 3.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        for channel in channels:
            channel.close()

    failures = [f"{c.name}: {f}" for c in callers for f in c.failures]
    assert not failures, f"{len(failures)} failed calls: {failures[:5]}\n{server.log()[-4000:]}"
    for caller in callers:  # every caller called through every phase
        assert {a[0] for a in caller.answers} >= set(range(phase[0])), caller.name
    summary = listed()["live"]
    assert summary.ready
    assert "live/3: the load-time probe" in summary.version_status[0].reason
    with grpc.insecure_channel(server.target) as channel:
        assert health(channel, "live") == HealthStatus.SERVING
        assert health(channel, "") == HealthStatus.SERVING
    metrics = scrape(server)
    info = {"model": "live", "provider": "CPUExecutionProvider"}
    assert series(metrics, "mcd_model_info", version="1", **info) is None
    assert series(metrics, "mcd_model_info", version="2", **info) == 1
    assert series(metrics, "mcd_model_loads_total", model="live", outcome="success") == 3
    assert series(metrics, "mcd_model_loads_total", model="live", outcome="failure") == 1
    assert series(metrics, "mcd_model_unloads_total", model="live") == 1
    assert series(metrics, "mcd_model_ready", model="live") == 1
    log = server.log()
    assert "reloaded live version 2" in log
    assert "released the previous copy of live version 2" in log
    assert "released unloaded live version 1" in log


def wait_until(condition: Callable[[], bool], server: RunningServer) -> None:
    """Wait for ``condition`` (a loose bound of WAIT_S: a hung server fails, a slow one not)."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"the server never got there:\n{server.log()[-4000:]}"
        time.sleep(0.05)
