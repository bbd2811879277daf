"""Composition root: builds the data plane, the gRPC server, the KServe v2 HTTP server and the
metrics endpoint, and runs them, all on one event loop (the metrics server on its own thread).

Start-up order matters for orchestrators: the gRPC and HTTP ports open first with health
NOT_SERVING (HTTP ``/v2/health/ready`` 503), models load off the event loop (a model that fails
is left out, not ready, with its reason; never the others), then health turns SERVING once a
model serves (or with ``--allow-empty-start``); with ``--repository-poll-s`` models are then
loaded, swapped and unloaded while serving (``service.core.lifecycle``) and health follows.
Shutdown (SIGTERM/SIGINT) turns health NOT_SERVING and HTTP readiness 503, keeps serving for
the drain period (clients that check health and load balancers move away), stops accepting RPCs
and connections, lets in-flight requests finish within the grace period, then exits 0.

What an operator must fix before the server can start (a port in use, the model repository
gone) is raised as :class:`StartupError`, whose message is one line naming the flag; whatever
had started is stopped first.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from service import metrics
from service.core.dataplane import DataPlane
from service.errors import ModelLoadError
from service.protocol.auth import http_authenticator
from service.protocol.grpc_server import GrpcServer
from service.protocol.http import Authenticator, HttpServer
from service.settings import Settings

__all__ = ["App", "StartupError"]

log = logging.getLogger(__name__)

_CUDA = "CUDAExecutionProvider"


class StartupError(Exception):
    """The server cannot start as configured; the message is one line for the operator (it
    names the flag and the value to change)."""


class App:
    """The running server. Use ``await app.start()`` / ``await app.stop()``, or ``await
    app.serve()`` to run until SIGTERM/SIGINT."""

    def __init__(self, settings: Settings, authenticate: Authenticator | None = None) -> None:
        """Args:
        settings: the server settings.
        authenticate: the HTTP layer's token check (``service.protocol.http.Authenticator``);
            None: the tokens of ``--auth-token-file`` when set (as on the gRPC port), else
            none.
        """
        self.settings = settings
        self.plane = DataPlane(settings)
        self.grpc = GrpcServer(settings, self.plane)
        # The HTTP port serves the gRPC port's certificates and checks the same tokens.
        if authenticate is None and self.grpc.tokens is not None:
            authenticate = http_authenticator(self.grpc.tokens)
        self.http = HttpServer(settings, self.plane, authenticate, self.grpc.certificates)
        self._metrics_server: WSGIServer | None = None
        self._metrics_thread: threading.Thread | None = None
        self.grpc_port = 0
        self.http_port = -1
        self.metrics_port = -1
        self._stopping = asyncio.Event()
        self._end_drain = asyncio.Event()

    async def start(self) -> None:
        """Bind both ports, load the models, turn health SERVING (once a model serves), write
        the port file.

        Raises:
            StartupError: a port cannot be bound, or the model repository is not a folder
                (what had started is stopped).
        """
        s = self.settings
        try:
            if s.metrics_port >= 0:
                try:
                    self._metrics_server, self._metrics_thread = metrics.serve(
                        s.host, s.metrics_port
                    )
                except OSError as exc:
                    raise _bind_error("--metrics-port", s.host, s.metrics_port, exc) from None
                self.metrics_port = self._metrics_server.server_port
            try:
                self.grpc_port = await self.grpc.start()
            except (OSError, RuntimeError) as exc:  # grpcio raises RuntimeError("Failed to bind")
                raise _bind_error("--grpc-port", s.host, s.grpc_port, exc) from None
            if s.http_port >= 0:
                try:
                    self.http_port = await self.http.start()
                except OSError as exc:
                    raise _bind_error("--http-port", s.host, s.http_port, exc) from None
            log.info(
                "gRPC on %s:%d, HTTP on %s:%s, metrics on %s:%s; loading models from %s",
                s.host, self.grpc_port, s.host, self.http_port, s.host, self.metrics_port,
                s.model_repository,
            )  # fmt: skip
            # Health follows every change the model lifecycle makes (loads, swaps, unloads);
            # HTTP readiness reads the plane at each request.
            self.plane.add_listener(self.grpc.update_health)
            self.plane.add_listener(self._watch_gpu)
            try:
                await self.plane.start()
            except ModelLoadError as exc:  # the repository itself, not one model: nothing to serve
                raise StartupError(f"--model-repository: {exc}") from None
        except StartupError:
            # Nothing was served yet: close at once, no drain, no grace.
            await self.grpc.stop(0.0)
            await self.http.stop()
            await self.plane.close()
            self._close_metrics()
            raise
        await self.grpc.update_health()
        names = self.plane.model_names()
        log.info("serving %d model(s): %s", len(names), ", ".join(names))
        if not names:
            log.warning(
                "no model is ready in %s: the server is %s%s",
                s.model_repository,
                "ready anyway (--allow-empty-start)" if s.allow_empty_start else
                "up but NOT ready (health NOT_SERVING, ServerReady false) until one loads",
                f"; polling every {s.repository_poll_s:g} s" if s.repository_poll_s > 0 else "",
            )  # fmt: skip
        if s.port_file is not None:
            _write_port_file(s.port_file, self.grpc_port, self.http_port, self.metrics_port)

    async def _watch_gpu(self) -> None:
        """Once a model runs on CUDA, export the GPU's memory (NVML) from then on."""
        if any(self.plane.metadata(name).provider == _CUDA for name in self.plane.model_names()):
            metrics.watch_gpu_memory(self.settings.gpu_device_id)

    async def stop(self) -> None:
        s = self.settings
        log.info(
            "shutting down: health NOT_SERVING, draining %.1f s, then finishing in-flight "
            "requests (grace %.1f s)",
            s.drain_period_s, s.grace_period_s,
        )  # fmt: skip
        # Both protocols drain together (gRPC health NOT_SERVING, HTTP readiness 503), then
        # stop accepting and let what is in flight finish.
        self.http.begin_shutdown()
        await asyncio.gather(
            self.grpc.stop(s.grace_period_s, s.drain_period_s, self._end_drain),
            self.http.stop(s.drain_period_s, self._end_drain),
        )
        await self.plane.close()
        self._close_metrics()
        log.info("stopped")

    def _close_metrics(self) -> None:
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()

    def request_stop(self) -> None:
        """First call: stop gracefully (drain, then grace). A second call (another SIGTERM or
        Ctrl-C) cuts the drain short; in-flight requests still get the grace period."""
        if self._stopping.is_set():
            if not self._end_drain.is_set():
                log.info("second stop signal: ending the drain now")
            self._end_drain.set()
        self._stopping.set()

    async def serve(self) -> None:
        """Start, run until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        await self._stopping.wait()
        await self.stop()


def _bind_error(flag: str, host: str, port: int, exc: Exception) -> StartupError:
    if isinstance(exc, OSError) and exc.errno != errno.EADDRINUSE:
        return StartupError(f"{flag} {port}: cannot bind {host}:{port} ({exc.strerror})")
    # grpcio does not say why a bind failed; a port in use is by far the common reason.
    return StartupError(f"{flag} {port} is in use on {host} (choose another port, or 0 for any)")


def _write_port_file(path: Path, grpc_port: int, http_port: int, metrics_port: int) -> None:
    """Write the bound ports (-1 for a server that is off), and this process's PID (so that a
    script can stop exactly this server), atomically, so a reader never sees half a file."""
    pid = os.getpid()
    tmp = path.with_name(path.name + f".{pid}.tmp")
    ports = {"grpc_port": grpc_port, "http_port": http_port, "metrics_port": metrics_port}
    tmp.write_text(json.dumps({**ports, "pid": pid}))
    tmp.replace(path)
