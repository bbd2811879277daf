"""deploy/healthcheck.py, the container's HEALTHCHECK, against the real server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.protocol.grpc_server import SERVICE_NAME
from tests.deploy.conftest import DEPLOY, free_port
from tests.support.server import RunningServer

PROBE = DEPLOY / "healthcheck.py"


def probe(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MCD_")} | env
    return subprocess.run(
        [sys.executable, str(PROBE), "--timeout-s", "5", *args],
        capture_output=True, text=True, timeout=30, env=environ, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("service", ["", SERVICE_NAME, "tiny_cls"])
def test_serving(deploy_server: RunningServer, service: str) -> None:
    result = probe("--service", service, MCD_HOST="0.0.0.0", MCD_GRPC_PORT=str(deploy_server.grpc_port))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("SERVING")


def test_unknown_service_is_unhealthy(deploy_server: RunningServer) -> None:
    result = probe("--service", "no_such_model", "--target", deploy_server.target)
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr


def test_no_server_is_unhealthy() -> None:
    result = probe(MCD_HOST="127.0.0.1", MCD_GRPC_PORT=str(free_port()))
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_the_probe_asks_the_health_port_when_one_is_set(deploy_server: RunningServer) -> None:
    """With MCD_HEALTH_PORT (the plaintext health-only port of a TLS server) the probe asks it,
    not MCD_GRPC_PORT: here the gRPC port variable names a port nobody listens on."""
    dead = str(free_port())
    live = str(deploy_server.grpc_port)
    result = probe(MCD_HOST="0.0.0.0", MCD_GRPC_PORT=dead, MCD_HEALTH_PORT=live)
    assert result.returncode == 0, result.stderr
    result = probe(MCD_HOST="0.0.0.0", MCD_GRPC_PORT=dead, MCD_HEALTH_PORT="-1")
    assert result.returncode == 1
