"""Sessions on CUDA keep Dropout stochastic: the CUDA twin of tests/unit/test_session.py.

ONNX Runtime's EliminateDropout optimizer runs for every execution provider; the control test
shows the trap on CUDA too, the others that ``service.engine.onnx_session.create_session`` disables it
there, at every optimization level, and that the Dropout kernels really run on the GPU.
"""

# The imports follow the module-level CUDA skip, so that a host without CUDA skips at once.
# ruff: noqa: E402
from __future__ import annotations

import pytest

from tests.gpu.cuda import require_cuda

require_cuda()

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.engine.onnx_session import DISABLED_OPTIMIZERS, SessionConfig, create_session
from tests.gpu.cuda import PROVIDER, USE_GPU
from tests.integration.conftest import ExportedModels
from tests.unit.test_session import X, dropout_model

pytestmark = pytest.mark.gpu

#: CUDA first, the CPU for what CUDA has no kernel for (as create_session asks).
PROVIDERS = list(dict.fromkeys([PROVIDER, "CPUExecutionProvider"]))
STOCHASTIC_OPS = ("Dropout", "RandomUniformLike", "RandomUniform", "RandomNormalLike", "Bernoulli")


def test_a_gpu_session_runs_on_cuda() -> None:
    session = create_session(dropout_model(), SessionConfig(use_gpu=USE_GPU))
    assert session.get_providers()[0] == PROVIDER


@pytest.mark.parametrize("search", ["heuristic", "exhaustive", "default"])
def test_the_conv_algo_search_setting_reaches_the_cuda_provider(search: str) -> None:
    config = SessionConfig(use_gpu=USE_GPU, cuda_conv_algo_search=search)
    session = create_session(dropout_model(), config)
    options = session.get_provider_options()[PROVIDER]
    assert options["cudnn_conv_algo_search"] == search.upper()


def test_control_default_onnxruntime_deletes_dropout_on_cuda() -> None:
    session = ort.InferenceSession(dropout_model(), providers=PROVIDERS)
    assert session.get_providers()[0] == PROVIDER
    a, b = (session.run(None, {"x": X})[0] for _ in range(2))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, X)  # Dropout became identity


@pytest.mark.parametrize("level", ["basic", "extended", "all"])
def test_dropout_stays_stochastic_on_cuda_at_every_optimization_level(level: str) -> None:
    session = create_session(
        dropout_model(), SessionConfig(use_gpu=USE_GPU, graph_optimization_level=level)
    )
    assert session.get_providers()[0] == PROVIDER
    a, b = (session.run(None, {"x": X})[0] for _ in range(2))
    assert not np.array_equal(a, b), "repeated runs gave identical outputs: Dropout was removed"
    # Inverted dropout: kept elements are scaled by 1/(1-p) = 2 exactly, dropped ones are 0.
    kept = a != 0
    np.testing.assert_allclose(a[kept], 2 * X[kept], rtol=1e-6)
    # P(drop) = 0.5 over 256 elements: within 6 sigma of 0.5 (false failure < 2e-9).
    assert abs(kept.mean() - 0.5) < 6 * np.sqrt(0.25 / kept.size)
    # Copies of one row within one run get their own masks.
    copies = session.run(None, {"x": np.repeat(X[:1], 64, axis=0)})[0]
    assert not np.all(copies == copies[:1]), "64 copies of a row got the same dropout mask"


def _placement(
    model: bytes | Path, feed: dict[str, np.ndarray], tmp_path: Path
) -> list[tuple[str, str]]:
    """(op type, provider) of every node that ran, from ONNX Runtime's profile of one run in a
    session built with the server's disabled optimizers."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(
        model if isinstance(model, bytes) else str(model),
        sess_options=options,
        providers=PROVIDERS,
        disabled_optimizers=list(DISABLED_OPTIMIZERS),
    )
    session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    return sorted(
        {
            (e["args"]["op_name"], e["args"]["provider"])
            for e in events
            if e.get("cat") == "Node" and "op_name" in e.get("args", {})
        }
    )


def test_dropout_kernels_run_on_the_gpu(tmp_path: Path) -> None:
    placement = _placement(dropout_model(), {"x": X}, tmp_path)
    assert ("Dropout", PROVIDER) in placement, placement
    assert all(p == PROVIDER for op, p in placement if op == "Dropout"), placement


@pytest.mark.parametrize(("name", "input_name"), [("digits", "image"), ("housing", "features")])
def test_exported_models_run_their_dropout_on_the_gpu(
    test_models: ExportedModels, name: str, input_name: str, tmp_path: Path
) -> None:
    """The bundled examples as exported (opset 18, dynamo): every Dropout node on CUDA."""
    folder = max((p for p in (test_models.repository / name).iterdir() if p.name.isdigit()),
                 key=lambda p: int(p.name))  # fmt: skip
    x = test_models.examples[name].numpy()
    placement = _placement(folder / "model.onnx", {input_name: x}, tmp_path)
    stochastic = [(op, p) for op, p in placement if op in STOCHASTIC_OPS]
    assert stochastic, f"no stochastic node ran: {placement}"
    assert all(p == PROVIDER for _, p in stochastic), f"stochastic nodes off the GPU: {placement}"
