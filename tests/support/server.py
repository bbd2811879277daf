"""The real server for tests: ``python -m service`` on 127.0.0.1 port 0 through
tools/launcher.py (ready = port file with its PID + gRPC health SERVING; stopped by PID), with
limits the tests can reach cheaply."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tools.launcher import STOP_TIMEOUT_S, ServiceProcess, start_service

__all__ = ["SERVER_FLAGS", "RunningServer", "running_server", "start_server", "stop_server"]

#: A server started for a test (``.target``, ``.grpc_port``, ``.metrics_port``, ``.process``,
#: ``.log()``).
RunningServer = ServiceProcess

# Limits chosen so the tests can reach every one of them cheaply.
SERVER_FLAGS = [
    "--max-batch-rows", "64",
    "--max-row-samples", "400000",
    "--max-returned-samples", "1000000",
    "--max-message-bytes", str(1024 * 1024),
    # A small budget forces large-T requests through many chunks of the tile.
    "--tile-memory-bytes", str(4 * 1024 * 1024),
    "--compute-workers", "2",
    # No drain on shutdown (tests that need one pass --drain-period-s again; the last wins).
    "--drain-period-s", "0",
    # MCD_TEST_DEVICE=gpu runs every test server on the GPU (tests/gpu; refused without CUDA).
    "--device", os.environ.get("MCD_TEST_DEVICE", "cpu"),
]  # fmt: skip
START_TIMEOUT_S = 60.0


def start_server(repository: Path, workdir: Path, *extra: str) -> RunningServer:
    """Start the server on ``repository`` with SERVER_FLAGS and ``extra`` (which win), and
    wait until it serves; its port file and ``server.log`` go to ``workdir``.

    Raises:
        tools.launcher.LaunchError: it exited or did not serve in time (with its log tail).
    """
    return start_service(
        repository, workdir, [*SERVER_FLAGS, *extra], start_timeout_s=START_TIMEOUT_S
    )


def stop_server(server: RunningServer, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code (0 after a graceful
    stop, -9 when it had to be killed)."""
    return server.stop(timeout_s)


@contextlib.contextmanager
def running_server(repository: Path, workdir: Path, *extra: str) -> Iterator[RunningServer]:
    """A server for the ``with`` block that must exit 0 on SIGTERM at its end."""
    server = start_server(repository, workdir, *extra)
    try:
        yield server
    finally:
        code = stop_server(server)
    assert code == 0, f"server exited with {code} on SIGTERM:\n{server.log()}"
