"""What every stage shares: the server subprocess and its client, seeding, the machine line.

The stages speak to the server through the project's client library (``mcdropout_client``),
as any application would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from mcdropout_client import Client

__all__ = [
    "ROOT",
    "connect",
    "machine_description",
    "quiet_export_logs",
    "running_server",
    "seed_everything",
    "serving",
]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
FloatArray = npt.NDArray[np.float64]

#: Seconds the server gets to load every model version (each is checked at load time).
SERVER_START_TIMEOUT_S = 300.0
#: gRPC deadline of one Predict call.
PREDICT_TIMEOUT_S = 300.0


def seed_everything(seed: int) -> torch.Generator:
    """Seeds random, numpy's legacy global state and torch; returns a torch generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def quiet_export_logs() -> None:
    """The ONNX exporter is chatty (warnings, INFO lines per export): keep the progress readable."""
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("torch", "onnxscript", "onnx_ir", "export"):
        logging.getLogger(name).setLevel(logging.ERROR)


def machine_description() -> str:
    """'CPU model, N cores, OS, Python, torch': the machine line of the report."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{cpu}, {cores} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, no GPU used"
    )


@contextlib.contextmanager
def running_server(
    repository: Path, workdir: Path, extra_flags: Sequence[str] = ()
) -> Iterator[str]:
    """Runs ``python -m service`` on 127.0.0.1 (free port) for the duration of the block.

    The server loads every model of ``repository`` before it writes its port file, so the
    target it yields is ready. It is always stopped (SIGTERM, then kill) when the block ends.

    Args:
        repository: the model repository to serve.
        workdir: holds the port file and ``server.log``.
        extra_flags: more ``python -m service`` flags.

    Yields:
        The gRPC target, ``127.0.0.1:PORT``.

    Raises:
        RuntimeError: the server exited or did not serve within ``SERVER_START_TIMEOUT_S``; the
            message carries the end of its log.
    """
    port_file = workdir / "ports.json"
    log_path = workdir / "server.log"
    port_file.unlink(missing_ok=True)
    # The evaluation's own settings, not whatever MCD_* variables the caller's shell has.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCD_")}
    env["PYTHONUNBUFFERED"] = "1"
    command = [
        sys.executable, "-m", "service", "--model-repository", str(repository),
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "-1",
        "--port-file", str(port_file), "--device", "cpu", *extra_flags,
    ]  # fmt: skip
    with log_path.open("wb") as server_log:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-4000:]
                raise RuntimeError(f"the server did not start (log {log_path}):\n{tail}")
            time.sleep(0.1)
        ports = json.loads(port_file.read_text())
        log.info(
            "server pid %d serving %s on 127.0.0.1:%d", process.pid, repository, ports["grpc_port"]
        )
        yield f"127.0.0.1:{ports['grpc_port']}"
    finally:
        _stop(process)


@contextlib.contextmanager
def serving(
    repository: Path,
    workdir: Path,
    expected: set[str],
    extra_flags: Sequence[str] = (),
    attempts: int = 3,
) -> Iterator[Client]:
    """A server on ``repository`` that serves every model of ``expected``, and a client.

    The server refuses a version when its load-time probe (8 copies of one random row) sees
    identical outputs. A valid model with very small dropout rates (p = 0.005 on a 13-50-1
    network: no unit dropped in a copy with probability 0.73) fails that probe now and then,
    so a start that misses a model is retried, up to ``attempts`` starts in all.

    Raises:
        RuntimeError: a model was still missing after the last attempt; the message carries
            the server's reason.
    """
    reasons: list[str] = []
    for attempt in range(1, attempts + 1):
        with (
            running_server(repository, workdir, extra_flags) as target,
            connect(target) as client,
        ):
            missing = expected - {m.name for m in client.list_models() if m.ready}
            if not missing:
                yield client
                return
            log_text = (workdir / "server.log").read_text(errors="replace")
            reasons = [line for line in log_text.splitlines() if "not serving" in line]
        log.warning(
            "start %d of %d: the server does not serve %s (%s); restarting it",
            attempt, attempts, sorted(missing), "; ".join(reasons) or "no reason logged",
        )  # fmt: skip
    raise RuntimeError(f"models not served after {attempts} starts: {'; '.join(reasons)}")


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout_s)


def connect(target: str) -> Client:
    """The evaluation's client of a server at ``target``: every call's deadline is
    ``PREDICT_TIMEOUT_S`` (T = 10,000 on a few hundred rows takes a while on 2 cores)."""
    return Client(target, timeout=PREDICT_TIMEOUT_S)
