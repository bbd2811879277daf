"""ONNX Runtime sessions built the one way the server (and export verification) needs.

The release builds of ONNX Runtime run the ``EliminateDropout`` graph optimizer at
ORT_ENABLE_BASIC and above: it deletes every Dropout whose mask output is unused, whatever its
``training_mode`` input says, and every answer becomes identical. Disabling just that
optimizer keeps all the others. Every session in this project is created here, so no code path
can forget it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

__all__ = [
    "DISABLED_OPTIMIZERS",
    "SessionConfig",
    "create_session",
    "cuda_usable",
    "seed_process_rng",
]

log = logging.getLogger(__name__)

#: Graph optimizers that must never run on an MC dropout model.
DISABLED_OPTIMIZERS: tuple[str, ...] = ("EliminateDropout",)

_seed_lock = threading.Lock()
# pid -> seed: a forked child has a new pid, so it seeds again instead of inheriting.
_seed_by_pid: dict[int, int] = {}


def seed_process_rng() -> int:
    """Seed ONNX Runtime's process-wide random generator from fresh entropy, once per process.

    Without it, unseeded sessions in one process and forked workers draw the same random
    stream, so their "independent" samples are correlated. Safe to call repeatedly: it seeds
    again only in a new process (after fork).

    Returns:
        The seed used in this process.
    """
    with _seed_lock:
        pid = os.getpid()
        if pid not in _seed_by_pid:
            _seed_by_pid[pid] = secrets.randbits(63)
            ort.set_seed(_seed_by_pid[pid])
        return _seed_by_pid[pid]


@dataclass(frozen=True)
class SessionConfig:
    """How to build a session.

    Attributes:
        use_gpu: try the CUDA execution provider first (falls back to CPU if it cannot load).
        intra_op_threads: threads inside one run; 0 lets ONNX Runtime choose (all cores).
        inter_op_threads: threads across independent nodes; 0 lets ONNX Runtime choose.
        allow_spinning: let idle threads spin. Off by default: on small machines spinning
            threads steal cores from the event loop and from concurrent runs.
        graph_optimization_level: ONNX Runtime's optimization level ("disable", "basic",
            "extended", "all"). EliminateDropout stays disabled at every level.
        gpu_device_id: the CUDA device to use.
        cuda_conv_algo_search: the CUDA provider's cudnn_conv_algo_search ("heuristic",
            "exhaustive" or "default"). ONNX Runtime's own default, exhaustive, times every
            algorithm for each new input shape; under dynamic batching every batch size is a
            new shape.
    """

    use_gpu: bool = True
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    allow_spinning: bool = False
    graph_optimization_level: str = "all"
    gpu_device_id: int = 0
    cuda_conv_algo_search: str = "heuristic"


_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@functools.cache
def cuda_usable() -> bool:
    """True when this onnxruntime build has CUDA, an NVIDIA driver is present, and the CUDA
    libraries can be preloaded. Checked once per process.

    Without a driver there is no GPU: skip CUDA quietly instead of letting ONNX Runtime log a
    screenful of missing-library errors on every CPU host. With a driver, the session itself
    decides (``get_providers()`` tells what really runs).
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        log.info("no NVIDIA driver (libcuda.so.1) found: running on the CPU")
        return False
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            # preload_dlls prints to stdout; keep stdout for the program's own output.
            with contextlib.redirect_stdout(io.StringIO()):
                preload()
        except Exception:  # optional libraries: the session check decides
            log.debug("onnxruntime.preload_dlls() failed", exc_info=True)
    return True


def create_session(
    model: Path | str | bytes, config: SessionConfig | None = None, *, keep_dropout: bool = True
) -> ort.InferenceSession:
    """Create an InferenceSession that keeps Dropout stochastic.

    Args:
        model: path to a .onnx file, or its serialized bytes.
        config: session settings; defaults to ``SessionConfig()``.
        keep_dropout: False lets ONNX Runtime remove Dropout (``EliminateDropout``), for a
            deterministic pass to compare against (benchmarks); the server never does.

    Returns:
        The session. ``session.get_providers()[0]`` is the provider that really runs: asking
        for CUDA without usable CUDA libraries silently falls back to CPU.
    """
    config = config or SessionConfig()
    seed_process_rng()
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[config.graph_optimization_level]
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = config.inter_op_threads
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if config.allow_spinning else "0"
    )
    options.add_session_config_entry(
        "session.inter_op.allow_spinning", "1" if config.allow_spinning else "0"
    )
    options.log_severity_level = 3
    providers: list[str | tuple[str, dict[str, str]]] = ["CPUExecutionProvider"]
    if config.use_gpu and cuda_usable():
        cuda_options = {
            "device_id": str(config.gpu_device_id),
            "cudnn_conv_algo_search": config.cuda_conv_algo_search.upper(),
        }
        providers.insert(0, ("CUDAExecutionProvider", cuda_options))
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        source,
        sess_options=options,
        providers=providers,
        disabled_optimizers=list(DISABLED_OPTIMIZERS) if keep_dropout else [],
    )
