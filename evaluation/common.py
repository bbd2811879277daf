"""What every stage shares: the server subprocess and its client, seeding, the machine line.

The stages speak to the server through the project's client library (``mcdropout_client``),
as any application would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from mcdropout_client import Client
from tools.launcher import launch_service

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

    Started and stopped by tools/launcher.py: the server loads every model of ``repository``
    before it writes its port file, so the target it yields is ready; it is always stopped
    (SIGTERM, then SIGKILL after a bounded wait) when the block ends.

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
    flags = ["--metrics-port", "-1", "--device", "cpu", *extra_flags]
    # tools/launcher.py: no MCD_* variables of the caller's shell, stopped by PID.
    with launch_service(
        repository, workdir, flags, start_timeout_s=SERVER_START_TIMEOUT_S
    ) as server:
        log.info("server pid %d serving %s on %s", server.pid, repository, server.target)
        yield server.target


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


def connect(target: str) -> Client:
    """The evaluation's client of a server at ``target``: every call's deadline is
    ``PREDICT_TIMEOUT_S`` (T = 10,000 on a few hundred rows takes a while on 2 cores)."""
    return Client(target, timeout=PREDICT_TIMEOUT_S)
