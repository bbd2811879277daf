"""Every engine form (whole-graph tiling, split into one graph, split into two sessions)
against PyTorch MC dropout of the same models, in process. The server's default engine is also
covered end to end by test_predict.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine.onnx_session import SessionConfig
from service.engine.runtime import build_engine
from service.repository import load_version
from service.settings import EngineKind
from tests.integration.conftest import ExportedModels
from tests.integration.parity import N_TORCH, assert_matches_torch, measured, torch_mc_samples

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
    (stats,) = engine.run({input_name: x}, T, keep_samples=True)
    reference = torch_mc_samples(test_models.torch_models[name], x, N_TORCH, softmax=softmax)
    assert_matches_torch(measured(stats), reference, T)


def test_auto_engine_splits_where_work_can_run_once(test_models: ExportedModels) -> None:
    assert _engine(test_models, "digits", "auto").kind == "split-sessions"
    assert _engine(test_models, "digits", "split-graph").kind == "split-graph"
    # tiny_reg has dropout on its input: nothing runs once, so the whole graph is tiled.
    assert _engine(test_models, "tiny_reg", "auto").kind == "tiled"


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_runs_match_one_run(test_models: ExportedModels, kind: EngineKind) -> None:
    """A tiny memory budget forces one sample per session run; the statistics must still be
    those of the model (same test, many chunks)."""
    engine = _engine(test_models, "tiny_d2", kind, budget=1)
    x = np.random.default_rng(8).standard_normal((2, 2, 5, 5)).astype(np.float32)
    assert engine.budget_rows({"image": x}) == 1
    (stats,) = engine.run({"image": x}, 1500, keep_samples=True)
    assert stats.num_samples == 1500
    reference = torch_mc_samples(test_models.torch_models["tiny_d2"], x, N_TORCH, softmax=False)
    assert_matches_torch(measured(stats), reference, 1500)


def test_load_probe_accepts_models_with_small_dropout_rates(tmp_path: Path) -> None:
    """With p = 0.005 a copy of a row often drops nothing (73% of copies here): the load-time
    probe must still see the model as stochastic. With 8 copies it refused this valid model
    about 20% of the time, so 50 probes all passing had probability ~1e-5; with 256 copies a
    false refusal has probability ~1e-35 per probe."""
    import torch
    from torch import nn

    from export import export_model

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Dropout(0.005), nn.Linear(13, 50), nn.ReLU(), nn.Dropout(0.005), nn.Linear(50, 1)
    )
    export_model(
        model,
        torch.randn(8, 13),
        repository=tmp_path,
        name="small_p",
        task="regression",
        verify_samples=2000,
    )
    engine = build_engine(
        load_version(tmp_path / "small_p", 1), SessionConfig(use_gpu=False), 1 << 28
    )
    assert all(engine.is_stochastic() for _ in range(50))
