"""One typed settings object, built once at start-up from flags and ``MCD_*`` variables.

Precedence: command-line flag > environment variable ``MCD_<FIELD>`` > default. Nothing reads
the environment at import time; :func:`load_settings` is called by ``service.__main__`` and the
result is passed down.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args

__all__ = ["ENV_PREFIX", "Device", "EngineKind", "Settings", "SettingsError", "load_settings"]

ENV_PREFIX = "MCD_"

Device = Literal["auto", "cpu", "gpu"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
OptLevel = Literal["disable", "basic", "extended", "all"]
EngineKind = Literal["auto", "split-graph", "split-sessions", "tiled"]
ConvAlgoSearch = Literal["heuristic", "exhaustive", "default"]

MiB = 1024 * 1024


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the setting and the value."""


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Settings:
    """Every knob of the server. Each field is also a flag (``--grpc-port``) and a variable
    (``MCD_GRPC_PORT``)."""

    model_repository: Path = field(
        default=Path("models"), metadata=_doc("folder holding <model>/<version>/ folders")
    )
    repository_poll_s: float = field(
        default=0.0,
        metadata=_doc(
            "seconds between scans of the model repository: new and changed versions are "
            "loaded in the background once their files are stable for one scan and swapped in "
            "without downtime, removed ones unloaded after a drain; 0 = off"
        ),
    )
    allow_empty_start: bool = field(
        default=False,
        metadata=_doc(
            "report ready (health SERVING, ServerReady) even when no model is ready, e.g. to "
            "start on an empty repository that --repository-poll-s fills later"
        ),
    )
    host: str = field(
        default="127.0.0.1",
        metadata=_doc("address the gRPC, HTTP and metrics servers bind (0.0.0.0 in containers)"),
    )
    http_port: int = field(
        default=8000,
        metadata=_doc(
            "KServe v2 / Open Inference Protocol REST port (HTTP/1.1, JSON and binary tensor "
            "data); 0 picks a free port, -1 disables"
        ),
    )
    grpc_port: int = field(default=8001, metadata=_doc("gRPC port; 0 picks a free port"))
    metrics_port: int = field(
        default=8002, metadata=_doc("Prometheus /metrics port; 0 picks a free port, -1 disables")
    )
    port_file: Path | None = field(
        default=None,
        metadata=_doc("write the bound ports as JSON to this file once serving (for port 0)"),
    )
    device: Device = field(
        default="auto",
        metadata=_doc("auto: CUDA when it really loads, else CPU; cpu; gpu: fail without CUDA"),
    )
    gpu_device_id: int = field(default=0, metadata=_doc("CUDA device index"))
    cuda_conv_algo_search: ConvAlgoSearch = field(
        default="heuristic",
        metadata=_doc(
            "how the CUDA provider picks cuDNN convolution algorithms: heuristic (cuDNN's "
            "guess, free), exhaustive (times every algorithm once per new input shape, and "
            "dynamic batching makes new shapes all the time), default (one fixed algorithm)"
        ),
    )
    intra_op_threads: int = field(
        default=0,
        metadata=_doc(
            "ONNX Runtime threads per run, and the threads drawing its noise; 0 = one per core"
        ),
    )
    inter_op_threads: int = field(default=0, metadata=_doc("ONNX Runtime inter-op threads"))
    allow_spinning: bool = field(
        default=False, metadata=_doc("let ONNX Runtime threads spin while idle")
    )
    graph_optimization_level: OptLevel = field(
        default="all", metadata=_doc("ONNX Runtime graph optimizations (EliminateDropout is off)")
    )
    engine: EngineKind = field(
        default="auto",
        metadata=_doc(
            "auto: run the deterministic prefix once and tile only the stochastic suffix "
            "(two sessions), whole-graph tiling when nothing can run once; split-graph: one "
            "graph with a Tile at the cut; split-sessions; tiled: always tile the whole graph"
        ),
    )
    compute_workers: int = field(
        default=1, metadata=_doc("session runs executing at once (threads off the event loop)")
    )
    max_queue_size: int = field(
        default=64,
        metadata=_doc("requests waiting for a compute worker; more get RESOURCE_EXHAUSTED"),
    )
    max_batch_rows: int = field(
        default=1024, metadata=_doc("rows B of one request; more get RESOURCE_EXHAUSTED")
    )
    max_row_samples: int = field(
        default=2_000_000,
        metadata=_doc("rows x samples (B*T) of one request; more get RESOURCE_EXHAUSTED"),
    )
    max_returned_samples: int = field(
        default=4_000_000,
        metadata=_doc(
            "values (rows x samples x output size) a request may ask back as raw samples; "
            "more get RESOURCE_EXHAUSTED"
        ),
    )
    tile_memory_bytes: int = field(
        default=256 * MiB,
        metadata=_doc("memory budget of one session run; the [T*B] tile is chunked to fit"),
    )
    max_message_bytes: int = field(
        default=64 * MiB,
        metadata=_doc("largest gRPC message received or sent, and largest HTTP request body"),
    )
    drain_period_s: float = field(
        default=1.0,
        metadata=_doc(
            "seconds the server keeps serving after SIGTERM with health NOT_SERVING, so that "
            "health-checking clients and load balancers move away before it stops accepting"
        ),
    )
    grace_period_s: float = field(
        default=10.0, metadata=_doc("seconds in-flight requests get to finish on shutdown")
    )
    reflection: bool = field(default=True, metadata=_doc("serve gRPC server reflection"))
    log_level: LogLevel = field(default="INFO", metadata=_doc("logging level"))
    # -- security ---------------------------------------------------------------------------
    tls_cert_file: Path | None = field(
        default=None,
        metadata=_doc(
            "PEM certificate chain of the gRPC port; with tls_key_file the port speaks TLS "
            "only. Re-read when the file changes (new connections get the new certificate)"
        ),
    )
    tls_key_file: Path | None = field(
        default=None, metadata=_doc("PEM private key (unencrypted) of tls_cert_file")
    )
    tls_client_ca_file: Path | None = field(
        default=None,
        metadata=_doc(
            "PEM CA certificates: clients must present a certificate signed by one of them "
            "(mutual TLS); needs tls_cert_file"
        ),
    )
    auth_token_file: Path | None = field(
        default=None,
        metadata=_doc(
            "file of accepted bearer tokens, one per line (blank lines and lines starting "
            "with # are skipped): every RPC except grpc.health.v1 then needs the metadata "
            "'authorization: Bearer <token>', else UNAUTHENTICATED. Re-read when it changes"
        ),
    )
    credentials_check_interval_s: float = field(
        default=1.0,
        metadata=_doc("seconds between checks of the TLS and token files for changes"),
    )
    health_port: int = field(
        default=-1,
        metadata=_doc(
            "a plaintext port serving only grpc.health.v1, for probes that cannot speak TLS "
            "(Kubernetes gRPC probes); -1 disables, 0 picks a free port"
        ),
    )
    # -- connection limits --------------------------------------------------------------------
    max_concurrent_streams: int = field(
        default=1000,
        metadata=_doc(
            "RPCs one connection may have open at once (HTTP/2 streams); a client opening more "
            "gets UNAVAILABLE (REFUSED_STREAM) for the excess"
        ),
    )
    max_connections: int = field(
        default=1000, metadata=_doc("client connections the gRPC port accepts at once")
    )
    keepalive_time_s: float = field(
        default=60.0,
        metadata=_doc("seconds between the server's keepalive pings on a quiet connection"),
    )
    keepalive_timeout_s: float = field(
        default=20.0,
        metadata=_doc("seconds a keepalive ping may go unanswered before the connection closes"),
    )
    keepalive_min_ping_interval_s: float = field(
        default=10.0,
        metadata=_doc(
            "shortest interval between a client's pings on a connection without data; a client "
            "pinging more often is sent GOAWAY (too_many_pings)"
        ),
    )
    keepalive_permit_without_calls: bool = field(
        default=True,
        metadata=_doc("accept (and send) keepalive pings on connections without calls"),
    )
    max_connection_age_s: float = field(
        default=3600.0,
        metadata=_doc(
            "seconds after which a connection is asked to go away (GOAWAY; clients reconnect, "
            "which also spreads them over replicas); 0 = no limit"
        ),
    )
    max_connection_age_grace_s: float = field(
        default=60.0,
        metadata=_doc("seconds the calls of an aged connection get to finish before it closes"),
    )

    def __post_init__(self) -> None:
        _check(self)


_NON_NEGATIVE = ("intra_op_threads", "inter_op_threads", "gpu_device_id")
_POSITIVE = (
    "compute_workers",
    "max_queue_size",
    "max_batch_rows",
    "max_row_samples",
    "max_returned_samples",
    "tile_memory_bytes",
    "max_message_bytes",
    "max_concurrent_streams",
    "max_connections",
)
_POSITIVE_SECONDS = (
    "credentials_check_interval_s",
    "keepalive_time_s",
    "keepalive_timeout_s",
    "keepalive_min_ping_interval_s",
)
_NON_NEGATIVE_SECONDS = (
    "drain_period_s",
    "grace_period_s",
    "repository_poll_s",
    "max_connection_age_s",
    "max_connection_age_grace_s",
)


def _check(s: Settings) -> None:
    for name in _POSITIVE:
        value = getattr(s, name)
        if value < 1:
            raise SettingsError(f"{name} must be an integer >= 1, got {value}")
    for name in _NON_NEGATIVE:
        value = getattr(s, name)
        if value < 0:
            raise SettingsError(f"{name} must be an integer >= 0, got {value}")
    if not 0 <= s.grpc_port <= 65535:
        raise SettingsError(f"grpc_port must be in 0..65535, got {s.grpc_port}")
    if not -1 <= s.http_port <= 65535:
        raise SettingsError(f"http_port must be in -1..65535 (-1 disables), got {s.http_port}")
    if not -1 <= s.metrics_port <= 65535:
        raise SettingsError(
            f"metrics_port must be in -1..65535 (-1 disables), got {s.metrics_port}"
        )
    for name in _NON_NEGATIVE_SECONDS:
        value = getattr(s, name)
        if not value >= 0:  # also refuses NaN
            raise SettingsError(f"{name} must be >= 0, got {value}")
        if name.startswith("max_connection_age") and math.isinf(value):
            raise SettingsError(f"{name} must be finite (0: no limit), got {value}")
    for name in _POSITIVE_SECONDS:
        value = getattr(s, name)
        if not 0 < value < math.inf:
            raise SettingsError(f"{name} must be > 0, got {value}")
    if not -1 <= s.health_port <= 65535:
        raise SettingsError(f"health_port must be in -1..65535 (-1 disables), got {s.health_port}")
    if s.health_port > 0 and s.health_port in (s.grpc_port, s.metrics_port):
        raise SettingsError(f"health_port {s.health_port} is also the gRPC or metrics port")
    if (s.tls_cert_file is None) != (s.tls_key_file is None):
        raise SettingsError("tls_cert_file and tls_key_file go together: set both or neither")
    if s.tls_client_ca_file is not None and s.tls_cert_file is None:
        raise SettingsError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
    if s.max_message_bytes > 2**31 - 1:
        raise SettingsError(f"max_message_bytes must be < 2 GiB, got {s.max_message_bytes}")
    for f in fields(s):
        choices = _choices(f.type)
        if choices and getattr(s, f.name) not in choices:
            raise SettingsError(
                f"{f.name} must be one of {', '.join(choices)}, got {getattr(s, f.name)!r}"
            )


_LITERALS: dict[str, tuple[str, ...]] = {
    "Device": get_args(Device),
    "LogLevel": get_args(LogLevel),
    "OptLevel": get_args(OptLevel),
    "EngineKind": get_args(EngineKind),
    "ConvAlgoSearch": get_args(ConvAlgoSearch),
}


def _choices(annotation: object) -> tuple[str, ...]:
    return _LITERALS.get(str(annotation), ())


def _kind(annotation: object) -> str:
    """The parser kind of a field from its (string) annotation."""
    text = str(annotation)
    if text in _LITERALS:
        return "choice"
    return {"int": "int", "float": "float", "bool": "bool", "str": "str"}.get(text, "path")


def _parse(name: str, kind: str, raw: str) -> object:
    try:
        if kind == "int":
            return int(raw.replace("_", ""))
        if kind == "float":
            return float(raw)
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "path":
            return Path(raw) if raw else None
        if kind == "choice" and name == "log_level":
            return raw.upper()
        return raw
    except ValueError:
        raise SettingsError(f"{name} must be a {kind}, got {raw!r}") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A bad flag is a SettingsError (one line), not argparse's usage dump and exit."""
        raise SettingsError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: one flag per settings field, defaults left to ``Settings``.
    A flag it cannot parse raises :class:`SettingsError`."""
    parser = _Parser(
        prog="python -m service",
        description="Serve Monte Carlo dropout uncertainty for ONNX models over gRPC.",
        epilog=f"Every flag can also be set as an environment variable {ENV_PREFIX}<NAME>, "
        f"for example {ENV_PREFIX}GRPC_PORT=9001.",
    )
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        kind = _kind(f.type)
        help_text = f"{f.metadata['doc']} (default: {f.default}; env {ENV_PREFIX}{f.name.upper()})"
        if kind == "bool":
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                default=None,
                metavar=f.name.upper(),
                choices=_choices(f.type) or None,
                # --log-level debug as well as DEBUG, as MCD_LOG_LEVEL accepts (_parse).
                type=str.upper if f.name == "log_level" else str,
                help=help_text,
            )
    return parser


def load_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings from flags and environment.

    Args:
        argv: command-line arguments (without the program name); None reads sys.argv.
        environ: environment; None reads os.environ.

    Raises:
        SettingsError: a value does not parse or is out of range.
    """
    environ = os.environ if environ is None else environ
    flags = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    for f in fields(Settings):
        kind = _kind(f.type)
        flag_value = flags.get(f.name)
        env_value = environ.get(ENV_PREFIX + f.name.upper())
        if flag_value is not None:
            values[f.name] = (
                flag_value if isinstance(flag_value, bool) else _parse(f.name, kind, flag_value)
            )
        elif env_value is not None:
            values[f.name] = _parse(f.name, kind, env_value)
    return dataclasses.replace(Settings(), **values)
