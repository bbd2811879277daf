"""Every engine form (whole-graph tiling, split into one graph, split into two sessions)
against PyTorch MC dropout of the same models, in process. The server's default engine is also
covered end to end by test_predict.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.onnx_session import SessionConfig
from service.repository import load_version
from service.runtime import SplitGraphEngine, SplitSessionsEngine, TiledEngine, build_engine
from service.settings import EngineKind
from tests.integration.conftest import ExportedModels
from tests.integration.parity import N_TORCH, assert_matches_torch, torch_mc_samples

KINDS: list[EngineKind] = ["tiled", "split-graph", "split-sessions"]
T = 3000


def _engine(test_models: ExportedModels, name: str, kind: EngineKind, budget: int = 1 << 28) -> Any:
    source = load_version(
        test_models.repository / name,
        max(int(p.name) for p in (test_models.repository / name).iterdir() if p.name.isdigit()),
    )
    return build_engine(source, SessionConfig(use_gpu=False), budget, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("name", "softmax"), [("digits", True), ("tiny_d2", False), ("housing", False)]
)
def test_engine_matches_pytorch(
    test_models: ExportedModels, kind: EngineKind, name: str, softmax: bool
) -> None:
    engine = _engine(test_models, name, kind)
    x = (
        test_models.examples[name].numpy()
        if name in test_models.examples
        else np.random.default_rng(7).standard_normal((3, 2, 5, 5)).astype(np.float32)
    )
    input_name = engine.config.inputs[0].name
    (stats,) = engine.run({input_name: x}, T)
    reference = torch_mc_samples(test_models.torch_models[name], x, N_TORCH, softmax=softmax)
    assert_matches_torch({"mean": stats.mean, "variance": stats.variance}, reference, T)


def test_auto_engine_splits_where_work_can_run_once(test_models: ExportedModels) -> None:
    assert isinstance(_engine(test_models, "digits", "auto"), SplitSessionsEngine)
    assert isinstance(_engine(test_models, "digits", "split-graph"), SplitGraphEngine)
    # tiny_reg has dropout on its input: nothing runs once, so the whole graph is tiled.
    assert isinstance(_engine(test_models, "tiny_reg", "auto"), TiledEngine)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_runs_match_one_run(test_models: ExportedModels, kind: EngineKind) -> None:
    """A tiny memory budget forces one sample per session run; the statistics must still be
    those of the model (same test, many chunks)."""
    engine = _engine(test_models, "tiny_d2", kind, budget=1)
    assert engine.budget_rows == 1
    x = np.random.default_rng(8).standard_normal((2, 2, 5, 5)).astype(np.float32)
    (stats,) = engine.run({"image": x}, 1500)
    assert stats.num_samples == 1500
    reference = torch_mc_samples(test_models.torch_models["tiny_d2"], x, N_TORCH, softmax=False)
    assert_matches_torch({"mean": stats.mean, "variance": stats.variance}, reference, 1500)
