"""Every Prometheus metric of the service, in one registry, created once at import.

Names use the ``mcd_`` prefix and base units (seconds, counts); labels are few and bounded:
``model`` is a loaded model's name (requests for unknown models are labelled ``_unknown``),
``method`` the RPC name, ``code`` the canonical status name.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    make_wsgi_app,
)

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
    "exposition",
    "metrics_app",
    "serve",
]

REGISTRY = CollectorRegistry(auto_describe=True)
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
    "Time from receiving an RPC to sending its answer, by model, method and status code.",
    ("model", "method", "code"),
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
    "batching delay plus the wait for a compute worker).",
    ("model",),
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
