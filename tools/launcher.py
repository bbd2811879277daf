"""Start servers as child processes and stop exactly those, by PID.

One launcher for everything that runs the real server (tests, bench, evaluation, CI):
:func:`launch_service` starts ``python -m service`` on 127.0.0.1 with port 0 and a
``--port-file``, waits until it is ready (the port file names this process's PID, and gRPC
health answers SERVING), and :meth:`ChildProcess.stop` ends it: SIGTERM, a bounded wait, then
SIGKILL. :class:`ChildProcess` is the same for any other server command (the benchmark's naive
server, MLServer).

Every child runs in its own session, so its process group id is its PID: the final SIGKILL
goes to that group, which holds only what this child started (MLServer's workers, say), never
another server that happens to run on the machine. Nothing here looks processes up by name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "ROOT",
    "ChildProcess",
    "LaunchError",
    "ServiceProcess",
    "launch_service",
    "read_port_file",
    "service_command",
    "start_service",
]

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
#: Bounds on every wait, so that no caller can hang on a server.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
_POLL_S = 0.05


class LaunchError(RuntimeError):
    """A server exited while starting or was not ready in time; the message ends with the tail
    of its log."""


def child_environment(
    drop_prefixes: Sequence[str] = ("MCD_",), extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment without the variables that would change a child's settings
    (``MCD_*`` by default), unbuffered Python output, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(tuple(drop_prefixes))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ChildProcess:
    """A server subprocess in its own session, logging to a file.

    Args:
        name: what messages call it.
        command: the command line.
        log_path: stdout and stderr go here.
        cwd: working directory (the repository root by default).
        env: the environment (default :func:`child_environment`).
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        log_path: Path,
        cwd: Path = ROOT,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        with log_path.open("wb") as log_file:
            self.process: subprocess.Popen[bytes] = subprocess.Popen(
                self.command,
                cwd=cwd,
                env=dict(child_environment() if env is None else env),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, whose id is its PID
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def failed(self, reason: str) -> LaunchError:
        """An error naming the process, ``reason`` and the tail of its log."""
        return LaunchError(f"{self.name} (pid {self.pid}): {reason}; log tail:\n{self.log_tail()}")

    def wait_until(self, ready: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll ``ready`` until it is true.

        Raises:
            LaunchError: the process exited first, or ``timeout_s`` passed (the process is
                left running: the caller stops it).
        """
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.process.poll() is not None:
                raise self.failed(f"exited with {self.process.returncode} while starting")
            if time.monotonic() > deadline:
                raise self.failed(f"not ready after {timeout_s:g} s")
            time.sleep(_POLL_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL this process's group.

        Returns:
            The exit code (negative: the signal that ended it, e.g. -9 after SIGKILL).
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %g s: killing it",
                            self.name, self.pid, timeout_s)  # fmt: skip
        # What the child left behind in its own group (workers); the group is gone (ESRCH)
        # when there is nothing left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.process.wait(timeout_s)

    def __enter__(self) -> ChildProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def read_port_file(path: Path) -> dict[str, int]:
    """``{"grpc_port": N, "http_port": H, "metrics_port": M, "pid": P}`` as the server writes it
    (once serving, atomically; a port is -1 when its server is off)."""
    raw: dict[str, Any] = json.loads(path.read_text())
    return {key: int(value) for key, value in raw.items()}


def service_command(
    repository: Path, port_file: Path, flags: Sequence[str] = (), python: str = sys.executable
) -> list[str]:
    """``python -m service`` on 127.0.0.1 with port 0 for gRPC, HTTP and metrics; later
    ``flags`` win over these (argparse keeps the last value)."""
    return [
        python, "-m", "service", "--model-repository", str(repository), "--host", "127.0.0.1",
        "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        "--port-file", str(port_file), *flags,
    ]  # fmt: skip


def _health_serving(target: str, timeout_s: float) -> bool:
    """Whether gRPC health (the whole server, service "") answers SERVING."""
    import grpc  # noqa: PLC0415 (only callers that start a server need grpc)
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

    with grpc.insecure_channel(target) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


class ServiceProcess(ChildProcess):
    """A server that writes its ports to a port file once it serves: ``python -m service``
    (:func:`start_service`), or the benchmark's own servers.

    Attributes:
        grpc_port: the bound gRPC port on 127.0.0.1 (0 until :meth:`port_file_ready`).
        http_port: the bound KServe v2 HTTP port (-1 when off or not reported).
        metrics_port: the bound metrics port (-1 when metrics are off or not reported).
        port_file: where the server writes its ports.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        port_file: Path,
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        port_file.unlink(missing_ok=True)  # a stale file must not pass for this server's
        self.port_file = port_file
        self.grpc_port = 0
        self.http_port = -1
        self.metrics_port = -1
        super().__init__(name, command, log_path=log_path, env=env)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """The base URL of the KServe v2 HTTP server (``http://127.0.0.1:PORT``)."""
        return f"http://127.0.0.1:{self.http_port}"

    def port_file_ready(self) -> bool:
        """Whether the port file is there (then its ports are read in).

        Raises:
            LaunchError: another process wrote it (its ``pid`` is not this child's).
        """
        if not self.port_file.exists():
            return False
        ports = read_port_file(self.port_file)
        if ports.get("pid") != self.pid:
            raise self.failed(f"{self.port_file} was written by pid {ports.get('pid')}")
        self.grpc_port = ports["grpc_port"]
        self.http_port = ports.get("http_port", -1)
        self.metrics_port = ports.get("metrics_port", -1)
        return True


def start_service(
    repository: Path,
    workdir: Path,
    flags: Sequence[str] = (),
    *,
    name: str = "python -m service",
    stem: str = "server",
    env: Mapping[str, str] | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
) -> ServiceProcess:
    """Start ``python -m service`` on 127.0.0.1 port 0 and wait until it is ready: its port
    file (``WORKDIR/STEM-ports.json``) names its PID, and gRPC health says SERVING.

    Args:
        repository: the model repository.
        workdir: holds the port file and the log (``WORKDIR/STEM.log``).
        flags: more ``python -m service`` flags (they win over the launcher's own).
        name: what messages call the server.
        stem: file name stem of its port file and log (several servers can share a workdir).
        env: the server's environment (default :func:`child_environment`: no ``MCD_*``).
        start_timeout_s: bound on the wait (models load before the port file is written).

    Returns:
        The running server; stop it with ``stop()`` (or use :func:`launch_service`).

    Raises:
        LaunchError: the server exited or was not ready in time (it is stopped first).
    """
    port_file = workdir / f"{stem}-ports.json"
    command = service_command(repository, port_file, flags)
    server = ServiceProcess(
        name, command, port_file=port_file, log_path=workdir / f"{stem}.log", env=env
    )
    try:
        server.wait_until(server.port_file_ready, start_timeout_s)
        deadline = time.monotonic() + start_timeout_s
        server.wait_until(
            lambda: _health_serving(server.target, max(0.1, deadline - time.monotonic())),
            start_timeout_s,
        )
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def launch_service(
    repository: Path, workdir: Path, flags: Sequence[str] = (), **options: Any
) -> Iterator[ServiceProcess]:
    """:func:`start_service` for the duration of a ``with`` block; stopped (by PID) at its end,
    whatever happens inside."""
    server = start_service(repository, workdir, flags, **options)
    try:
        yield server
    finally:
        server.stop()
