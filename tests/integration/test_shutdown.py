"""Graceful shutdown with a drain period: after SIGTERM the server reports NOT_SERVING (gRPC
health) and not ready (HTTP /v2/health/ready 503) but keeps answering on both protocols for the
drain period (so that health-checking clients and load balancers move
away before it stops accepting), a second SIGTERM ends the drain early, and it exits 0."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mcdropout_client import Client, ClientError, DeadlineExceededError, UnavailableError
from tests.integration.conftest import ExportedModels, start_server

#: Far longer than the test needs: the test ends the drain with a second SIGTERM, so the drain
#: never runs out while the test checks that the server still serves.
DRAIN_S = 120
WAIT_S = 30  # a bound on every wait below, never reached by a working server


def wait_for_status(stub: health_pb2_grpc.HealthStub, service: str, status: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        if response.status == status:
            return
        assert time.monotonic() < deadline, f"health of {service!r} stayed {response.status}"
        time.sleep(0.02)


def http_status(url: str, body: object = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data), timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_sigterm_drains_then_stops_and_a_second_sigterm_ends_the_drain(
    test_models: ExportedModels, tmp_path: Path
) -> None:
    running = start_server(
        test_models.repository, tmp_path, "--drain-period-s", str(DRAIN_S), "--grace-period-s", "5"
    )
    rows = {"x": np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)}
    try:
        with Client(running.target) as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            assert client.predict("tiny_cls", rows, num_samples=20).num_samples == 20

            running.process.send_signal(signal.SIGTERM)
            for service in ("", "mcdropout.v1.MCDropoutService", "tiny_cls"):
                wait_for_status(health, service, health_pb2.HealthCheckResponse.NOT_SERVING)
            # HTTP readiness follows: 503, while liveness stays 200.
            assert http_status(running.http_url + "/v2/health/ready") == 503
            assert http_status(running.http_url + "/v2/health/live") == 200
            # Draining: NOT_SERVING, yet still answering on both protocols (a client that has
            # not looked at health yet loses nothing), and the process is still there.
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 6],
                                "data": rows["x"].tolist()}]}  # fmt: skip
            for _ in range(5):
                answer = client.predict("tiny_cls", rows, num_samples=20)
                assert answer.mean.shape == (3, 4)
                assert http_status(running.http_url + "/v2/models/tiny_cls/infer", body) == 200
            assert running.process.poll() is None

            running.process.send_signal(signal.SIGTERM)  # ends the drain; then the grace
            code = running.process.wait(WAIT_S)
        assert code == 0, running.log()
        log = running.log()
        assert "draining 120.0 s" in log
        assert "second stop signal: ending the drain now" in log
        # Stopped: the port no longer answers.
        with Client(running.target) as client, pytest.raises(ClientError) as error:
            client.predict("tiny_cls", rows, num_samples=20, timeout=2)
        assert isinstance(error.value, UnavailableError | DeadlineExceededError)
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
