"""Whether this host can run the CUDA tests: decided once per process, cheaply (no torch).

Every module under tests/gpu starts with :func:`require_cuda`, before its heavy imports, so on
a host without CUDA the whole folder is skipped at collection, with the reason, in well under a
second. CUDA counts as usable only when all of these hold:

1. onnxruntime offers ``CUDAExecutionProvider``;
2. ``service.engine.onnx_session.cuda_usable()`` (an NVIDIA driver loads; it also calls
   ``onnxruntime.preload_dlls()`` for the CUDA / cuDNN libraries of the Python packages);
3. a real session created the server's way (``create_session``, ``SessionConfig(use_gpu=True)``)
   reports ``CUDAExecutionProvider`` first: ONNX Runtime silently falls back to the CPU when
   the CUDA libraries do not load, which would make every test below pass without testing CUDA.
"""

from __future__ import annotations

import functools

import pytest

__all__ = [
    "DEVICE",
    "PROVIDER",
    "USE_GPU",
    "require_cuda",
    "skip_reason",
]

#: The provider every session of these tests must really run on.
PROVIDER = "CUDAExecutionProvider"
#: The server's ``--device`` for the end-to-end tests (gpu: it refuses a model not on CUDA).
DEVICE = "gpu"
#: ``SessionConfig.use_gpu`` of the in-process tests.
USE_GPU = True


@functools.cache
def skip_reason() -> str | None:
    """None when CUDA really runs here, else why not (one line)."""
    import onnxruntime as ort

    from service.engine.onnx_session import SessionConfig, create_session, cuda_usable

    available = ort.get_available_providers()
    if PROVIDER not in available:
        return f"onnxruntime {ort.__version__} has no {PROVIDER} (it offers {available})"
    if not cuda_usable():
        return (
            "no NVIDIA driver: libcuda.so.1 does not load (service.engine.onnx_session.cuda_usable)"
        )
    from tests.unit.test_session import dropout_model

    try:
        session = create_session(dropout_model(), SessionConfig(use_gpu=True))
    except Exception as exc:  # ONNX Runtime raises its own exception types
        return f"creating a CUDA session failed: {type(exc).__name__}: {exc}"
    providers = session.get_providers()
    if providers[0] != PROVIDER:
        return (
            f"a session that asked for CUDA runs on {providers[0]}: the CUDA / cuDNN libraries "
            "did not load (onnxruntime's error log above names the missing one)"
        )
    return None


def require_cuda() -> None:
    """Skip the calling test module (at collection) unless CUDA really runs here."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(f"needs CUDA: {reason}", allow_module_level=True)
