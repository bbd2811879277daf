"""Composition root: builds the core, the gRPC server and the metrics endpoint, and runs them.

Start-up order matters for orchestrators: the gRPC port opens first with health NOT_SERVING,
models load off the event loop, then health turns SERVING. Shutdown (SIGTERM/SIGINT) turns
health NOT_SERVING, keeps serving for the drain period (clients that check health and load
balancers move away), stops accepting RPCs, lets in-flight ones finish within the grace
period, then exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from service import metrics
from service.core.dataplane import InferenceCore, load_registry
from service.protocol.grpc_server import GrpcServer
from service.settings import Settings

__all__ = ["App"]

log = logging.getLogger(__name__)


class App:
    """The running server. Use ``await app.start()`` / ``await app.stop()``, or ``await
    app.serve()`` to run until SIGTERM/SIGINT."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.core = InferenceCore(settings)
        self.grpc = GrpcServer(settings, self.core)
        self._metrics_server: WSGIServer | None = None
        self._metrics_thread: threading.Thread | None = None
        self.grpc_port = 0
        self.metrics_port = -1
        self._stopping = asyncio.Event()
        self._end_drain = asyncio.Event()

    async def start(self) -> None:
        s = self.settings
        if s.metrics_port >= 0:
            self._metrics_server, self._metrics_thread = metrics.serve(s.host, s.metrics_port)
            self.metrics_port = self._metrics_server.server_port
        self.grpc_port = await self.grpc.start()
        log.info(
            "gRPC on %s:%d, metrics on %s:%s; loading models from %s",
            s.host, self.grpc_port, s.host, self.metrics_port, s.model_repository,
        )  # fmt: skip
        registry = await asyncio.get_running_loop().run_in_executor(None, load_registry, s)
        self.core.set_registry(registry)
        await self.grpc.set_serving()
        if not registry.names():
            log.warning(
                "no model loaded from %s: the server is up but serves nothing", s.model_repository
            )
        log.info("serving %d model(s): %s", len(registry.names()), ", ".join(registry.names()))
        if s.port_file is not None:
            _write_port_file(s.port_file, self.grpc_port, self.metrics_port)

    async def stop(self) -> None:
        s = self.settings
        log.info(
            "shutting down: health NOT_SERVING, draining %.1f s, then finishing in-flight "
            "requests (grace %.1f s)",
            s.drain_period_s, s.grace_period_s,
        )  # fmt: skip
        await self.grpc.stop(s.grace_period_s, s.drain_period_s, self._end_drain)
        await self.core.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("stopped")

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


def _write_port_file(path: Path, grpc_port: int, metrics_port: int) -> None:
    """Write the bound ports, and this process's PID (so that a script can stop exactly this
    server), atomically, so a reader never sees half a file."""
    pid = os.getpid()
    tmp = path.with_name(path.name + f".{pid}.tmp")
    tmp.write_text(json.dumps({"grpc_port": grpc_port, "metrics_port": metrics_port, "pid": pid}))
    tmp.replace(path)
