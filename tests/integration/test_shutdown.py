"""Graceful shutdown with a drain period: after SIGTERM the server reports NOT_SERVING but
keeps answering for the drain period (so that health-checking clients and load balancers move
away before it stops accepting), a second SIGTERM ends the drain early, and it exits 0."""

from __future__ import annotations

import signal
import time
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
            # Draining: NOT_SERVING, yet still answering (a client that has not looked at health
            # yet loses nothing), and the process is still there.
            for _ in range(5):
                answer = client.predict("tiny_cls", rows, num_samples=20)
                assert answer.mean.shape == (3, 4)
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
