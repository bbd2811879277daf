"""Every Prometheus metric of the service, in one registry, created once at import.

Names use the ``mcd_`` prefix and base units (seconds, counts); labels are few and bounded:
``model`` is a loaded model's name (requests for unknown models are labelled ``_unknown``),
``version`` the version that answered ("" when none did), ``method`` the RPC name (an HTTP
route is labelled with the name of its gRPC twin: ``ModelInfer``, ``ServerReady``, ...),
``code`` the canonical status name.

Beside them, the process collectors of prometheus_client (``process_cpu_seconds_total``,
``process_resident_memory_bytes``, ``process_open_fds``, ``process_max_fds``,
``process_start_time_seconds``, ``python_gc_*``, ``python_info``) and, once
:func:`watch_gpu_memory` is called on a CUDA host, the GPU's memory
(``mcd_gpu_memory_used_bytes``, ``mcd_gpu_memory_total_bytes``, and this process's share
``mcd_gpu_process_memory_used_bytes`` where the driver tells it), read through NVML at each
scrape.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "BATCH_REQUESTS",
    "BATCH_ROWS",
    "COMPUTE_SECONDS",
    "ERRORS",
    "IN_FLIGHT",
    "MODEL_INFO",
    "MODEL_LOADS",
    "MODEL_READY",
    "MODEL_UNLOADS",
    "QUEUE_DEPTH",
    "QUEUE_SECONDS",
    "REGISTRY",
    "REQUEST_ROWS",
    "REQUEST_SAMPLES",
    "REQUEST_SECONDS",
    "UNKNOWN_MODEL",
    "GpuMemoryCollector",
    "exposition",
    "metrics_app",
    "serve",
    "watch_gpu_memory",
]

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
# The process's CPU, memory, open files and start time, the interpreter's GC and version, as
# prometheus_client's default registry has them (this registry is the service's own).
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
UNKNOWN_MODEL = "_unknown"

# Latency buckets from 0.5 ms to 60 s: MC dropout answers range from a few ms (small T) to
# seconds (T = 10,000 on a CPU).
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
_SAMPLE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_REQUEST_COUNT_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)

REQUEST_SECONDS = Histogram(
    "mcd_request_duration_seconds",
    "Time from receiving a request (gRPC or HTTP) to sending its answer, by model, the version "
    "that answered (empty when none did), method and status code.",
    ("model", "version", "method", "code"),
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
COMPUTE_SECONDS = Histogram(
    "mcd_compute_duration_seconds",
    "Time spent in one engine run: the T stochastic passes of every row of a batch (all "
    "session runs and the statistics), excluding queueing.",
    ("model", "version"),
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
QUEUE_SECONDS = Histogram(
    "mcd_queue_duration_seconds",
    "Time from a request's admission to the start of the engine run that serves it (the "
    "batching delay plus the wait for a compute worker), by model and version.",
    ("model", "version"),
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
REQUEST_SAMPLES = Histogram(
    "mcd_request_samples",
    "Number of stochastic passes T per Predict request.",
    ("model",),
    buckets=_SAMPLE_BUCKETS,
    registry=REGISTRY,
)
REQUEST_ROWS = Histogram(
    "mcd_request_rows",
    "Number of input rows B per Predict request.",
    ("model",),
    buckets=_ROW_BUCKETS,
    registry=REGISTRY,
)
BATCH_ROWS = Histogram(
    "mcd_batch_rows",
    "Rows per engine run: the rows of every request merged into the run.",
    ("model",),
    buckets=_ROW_BUCKETS,
    registry=REGISTRY,
)
BATCH_REQUESTS = Histogram(
    "mcd_batch_requests",
    "Requests merged into one engine run (1 when batching is off or nothing else was waiting).",
    ("model",),
    buckets=_REQUEST_COUNT_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "mcd_requests_in_flight",
    "RPCs received and not yet answered.",
    ("method",),
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "mcd_queue_depth",
    "Predict requests admitted and not finished: waiting in a batch queue or running.",
    registry=REGISTRY,
)
ERRORS = Counter(
    "mcd_request_errors",
    "RPCs answered with a status other than OK, by model, method and status code.",
    ("model", "method", "code"),
    registry=REGISTRY,
)
MODEL_INFO = Info(
    "mcd_model",
    "One series per loaded model version: execution provider, opset, task.",
    ("model", "version"),
    registry=REGISTRY,
)
MODEL_LOADS = Counter(
    "mcd_model_loads",
    "Model version loads (start-up, repository poll, explicit load), by model and outcome: "
    "success (the version serves) or failure (the reason is in the log, ListModels and "
    "GetModelMetadata; a previous copy of the version serves on).",
    ("model", "outcome"),
    registry=REGISTRY,
)
MODEL_UNLOADS = Counter(
    "mcd_model_unloads",
    "Model versions taken out of service (folder removed, or unloaded on request), by model.",
    ("model",),
    registry=REGISTRY,
)
MODEL_READY = Gauge(
    "mcd_model_ready",
    "1 while some version of the model serves, 0 while the model is known but none does "
    "(every version failed to load, or it was unloaded on request).",
    ("model",),
    registry=REGISTRY,
)


def exposition() -> bytes:
    """The current metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)


StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
METRICS_PATH = "/metrics"
_NOT_FOUND = b"not found: the metrics are at /metrics\n"


def metrics_app(registry: CollectorRegistry = REGISTRY) -> WsgiApp:
    """The WSGI app of the metrics port: the exposition on ``/metrics`` only, 404 elsewhere
    (so a probe or a scrape pointed at the wrong path fails instead of passing)."""
    exposition_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == METRICS_PATH:
            body: Iterable[bytes] = exposition_app(environ, start_response)
            return body
        start_response(
            "404 Not Found",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(_NOT_FOUND))),
            ],
        )
        return [_NOT_FOUND]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per scrape; the threads never outlive the process."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No access log: scrapes every few seconds would fill it."""


def serve(host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Start the /metrics HTTP server on its own thread.

    Returns:
        The server (``server.server_port`` is the bound port, useful with port 0) and its
        thread. Stop it with ``server.shutdown()``.
    """
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_Server):
        address_family = family

    server = make_server(str(address[0]), port, metrics_app(), Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread


class GpuMemoryCollector(Collector):
    """The memory of one CUDA device, read through NVML at each scrape.

    Yields nothing when NVML cannot be used (no driver, no such device): a CPU host simply has
    no GPU series.

    Args:
        device_id: the CUDA device index (``--gpu-device-id``).
        nvml: the NVML bindings (``pynvml`` of nvidia-ml-py, the ``cuda`` extra; a parameter
            for tests).
    """

    def __init__(self, device_id: int, nvml: Any = None) -> None:
        self._device_id = device_id
        self._nvml = nvml
        self._handle: Any = None
        self._failed = False

    def _device(self) -> Any:
        if self._handle is None and not self._failed:
            try:
                if self._nvml is None:
                    import pynvml  # noqa: PLC0415 (only on CUDA hosts)

                    self._nvml = pynvml
                self._nvml.nvmlInit()
                self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self._device_id)
            except Exception as exc:  # no library, no driver, no device: no GPU series
                self._failed = True
                log.warning("GPU memory metrics off: NVML is not usable (%s)", exc)
        return self._handle

    def collect(self) -> Iterator[GaugeMetricFamily]:
        handle = self._device()
        if handle is None:
            return
        device = str(self._device_id)
        try:
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception as exc:  # a scrape must not fail for the GPU's sake
            log.warning("reading GPU memory through NVML failed: %s", exc)
            return
        for name, text, value in (
            ("mcd_gpu_memory_used_bytes", "GPU memory in use on the device (every process).",
             memory.used),
            ("mcd_gpu_memory_total_bytes", "GPU memory of the device.", memory.total),
        ):  # fmt: skip
            family = GaugeMetricFamily(name, text, labels=("device",))
            family.add_metric((device,), float(value))
            yield family
        # The driver lists processes by host PID: in a container without the host's PID
        # namespace this process is not found, and only the device's total is known.
        own = [p.usedGpuMemory for p in processes if p.pid == os.getpid() and p.usedGpuMemory]
        if own:
            family = GaugeMetricFamily(
                "mcd_gpu_process_memory_used_bytes",
                "GPU memory in use by this server process.",
                labels=("device",),
            )
            family.add_metric((device,), float(sum(own)))
            yield family


_gpu_collector: GpuMemoryCollector | None = None


def watch_gpu_memory(device_id: int) -> None:
    """Report the memory of CUDA device ``device_id`` from now on (once per process; the app
    calls it when a model runs on CUDA)."""
    global _gpu_collector  # noqa: PLW0603 (one collector per registry)
    if _gpu_collector is None:
        _gpu_collector = GpuMemoryCollector(device_id)
        REGISTRY.register(_gpu_collector)
