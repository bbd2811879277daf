"""Every engine form on CUDA against PyTorch MC dropout: the CUDA twin of
tests/integration/test_engines.py (same models, T, statistical tests and thresholds), plus the
seeded path, large T in many chunks, IO binding, batch buckets and half precision.

Statistical tests (tests/integration/parity.py): per element, a two-sample z-test of the mean
and a log-variance-ratio z-test, Bonferroni-corrected over the elements compared, each at
false-failure probability ALPHA = 1e-4. This module makes 17 such comparisons (34 tests), so a
correct engine fails it by chance with probability below 3.4e-3.
"""

# The imports follow the module-level CUDA skip, so that a host without CUDA skips at once.
# ruff: noqa: E402
from __future__ import annotations

import pytest

from tests.gpu.cuda import require_cuda

require_cuda()

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from export import export_model, mc_dropout_copy, zoo
from export.precision import FP16_MEAN_MARGIN, FP16_VARIANCE_MARGIN
from export.stats import Moments, mean_z_test, variance_ratio_test
from service.engine.onnx_session import SessionConfig
from service.engine.runtime import build_engine
from service.repository import load_version
from service.settings import EngineKind
from tests.gpu.cuda import PROVIDER, USE_GPU
from tests.integration.conftest import ExportedModels
from tests.integration.parity import N_TORCH, assert_matches_torch, measured, torch_mc_samples
from tests.integration.test_engines import KINDS, T

pytestmark = pytest.mark.gpu


def _engine(test_models: ExportedModels, name: str, kind: EngineKind, budget: int = 1 << 28) -> Any:
    folder = test_models.repository / name
    version = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    return build_engine(load_version(folder, version), SessionConfig(use_gpu=USE_GPU), budget, kind)


def _rows(test_models: ExportedModels, name: str) -> NDArray[np.float32]:
    if name in test_models.examples:
        return np.asarray(test_models.examples[name].numpy(), dtype=np.float32)
    return np.random.default_rng(7).standard_normal((3, 2, 5, 5)).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["digits", "housing", "tiny_d2"])
def test_every_session_of_every_engine_form_runs_on_cuda(
    test_models: ExportedModels, kind: EngineKind, name: str
) -> None:
    engine = _engine(test_models, name, kind)
    assert engine.provider == PROVIDER
    assert not engine.noise_fed  # unseeded samples: CUDA's own Philox kernels
    assert engine.io_binding  # the prefix's outputs and the tile stay on the device
    x = _rows(test_models, name)
    engine.run({engine.config.inputs[0].name: x[:1]}, 8, seed=1)  # builds the fed sampler
    providers = {k: s.get_providers()[0] for k, s in engine.sessions().items()}
    assert "fed sampler" in providers, providers
    assert set(providers.values()) == {PROVIDER}, providers
    # The server's load-time probe: copies of one row differ (Dropout was not optimised away).
    assert engine.is_stochastic()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("name", "softmax"), [("digits", True), ("tiny_d2", False), ("housing", False)]
)
def test_engine_matches_pytorch_on_cuda(
    test_models: ExportedModels, kind: EngineKind, name: str, softmax: bool
) -> None:
    engine = _engine(test_models, name, kind)
    x = _rows(test_models, name)
    (stats,) = engine.run({engine.config.inputs[0].name: x}, T, keep_samples=True)
    assert stats.num_samples == T
    reference = torch_mc_samples(test_models.torch_models[name], x, N_TORCH, softmax=softmax)
    assert_matches_torch(measured(stats), reference, T)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_path_matches_pytorch_on_cuda(test_models: ExportedModels, kind: EngineKind) -> None:
    engine = _engine(test_models, "digits", kind)
    x = _rows(test_models, "digits")
    (stats,) = engine.run({"image": x}, T, seed=123, keep_samples=True)
    reference = torch_mc_samples(test_models.torch_models["digits"], x, N_TORCH, softmax=True)
    assert_matches_torch(measured(stats), reference, T)


def _row_bytes(stats: Any, row: int) -> list[bytes]:
    return [
        np.ascontiguousarray(getattr(stats, field)[row]).tobytes()
        for field in ("mean", "variance", "predictive_entropy", "mutual_information")
        if getattr(stats, field, None) is not None
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["digits", "housing", "tiny_d2"])
def test_seeded_path_is_bit_identical_on_cuda(
    test_models: ExportedModels, kind: EngineKind, name: str
) -> None:
    """The same seed and row give the same bytes: repeated, alone or in a batch, moved."""
    engine = _engine(test_models, name, kind)
    input_name = engine.config.inputs[0].name
    row_shape = engine.config.inputs[0].row_shape
    batch = np.random.default_rng(3).random((6, *row_shape)).astype(np.float32)

    def run(x: NDArray[np.float32], seed: int = 7) -> Any:
        return engine.run({input_name: x}, 200, seed=seed)[0]

    alone, again = run(batch[2:3]), run(batch[2:3])
    assert _row_bytes(alone, 0) == _row_bytes(again, 0), "repeated seeded runs differ on CUDA"
    in_batch, moved = run(batch), run(batch[::-1].copy())  # row 2 -> row 3
    assert _row_bytes(alone, 0) == _row_bytes(in_batch, 2) == _row_bytes(moved, 3)
    assert _row_bytes(alone, 0) != _row_bytes(run(batch[2:3], seed=8), 0)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_runs_match_one_run_on_cuda(test_models: ExportedModels, kind: EngineKind) -> None:
    """A memory budget of one byte: one sample per session run, 1500 runs on the GPU."""
    engine = _engine(test_models, "tiny_d2", kind, budget=1)
    x = np.random.default_rng(8).standard_normal((2, 2, 5, 5)).astype(np.float32)
    assert engine.budget_rows({"image": x}) == 1
    (stats,) = engine.run({"image": x}, 1500, keep_samples=True)
    assert stats.num_samples == 1500
    reference = torch_mc_samples(test_models.torch_models["tiny_d2"], x, N_TORCH, softmax=False)
    assert_matches_torch(measured(stats), reference, 1500)


def test_large_t_in_many_chunks_on_cuda(test_models: ExportedModels) -> None:
    """T = 20,000 on the digits CNN with a budget of 256 samples of its rows per run (79 runs),
    statistics folded across chunks."""
    x = _rows(test_models, "digits")
    probe = _engine(test_models, "digits", "auto")
    per_row = probe.tile_memory_bytes // probe.budget_rows({"image": x})
    engine = _engine(test_models, "digits", "auto", budget=per_row * 256 * x.shape[0])
    assert engine.provider == PROVIDER
    assert engine.budget_rows({"image": x}) // x.shape[0] == 256
    t = 20_000
    (stats,) = engine.run({"image": x}, t, keep_samples=True)
    assert stats.num_samples == t
    # As many reference samples as ours: with N_TORCH = 4000 against 20,000 the test's power
    # rests on the reference alone, whose variance of a rare class's probability (kurtosis
    # ~200 here) is too noisy for the kurtosis-based standard error.
    reference = torch_mc_samples(test_models.torch_models["digits"], x, t, softmax=True)
    assert_matches_torch(measured(stats), reference, t)


def test_batch_sizes_are_padded_to_buckets_on_cuda(test_models: ExportedModels) -> None:
    """On CUDA runs are padded to powers of two (a few shapes for the provider's algorithm
    choices); the answer has the real rows and matches PyTorch."""
    engine = _engine(test_models, "digits", "auto")
    assert engine.batch_buckets[:4] == (1, 2, 4, 8)
    x = np.concatenate([_rows(test_models, "digits")] * 3)[:5]  # 5 rows: padded to 8
    (stats,) = engine.run({"image": x}, T, keep_samples=True)
    assert stats.mean.shape == (5, 10)
    reference = torch_mc_samples(test_models.torch_models["digits"], x, N_TORCH, softmax=True)
    assert_matches_torch(measured(stats), reference, T)


def test_half_precision_on_cuda(tmp_path: Path) -> None:
    """A float16 export of the zoo's two-head model served on CUDA: within the stated
    tolerance of PyTorch float32 (export/precision.py)."""
    entry = zoo.ZOO["two_head"]
    report = export_model(entry.build(), entry.example_inputs(), repository=tmp_path,
                          name="half", precision="fp16", **entry.export_args)  # fmt: skip
    engine = build_engine(load_version(tmp_path / "half", report.version),
                          SessionConfig(use_gpu=USE_GPU), 1 << 28)  # fmt: skip
    assert engine.provider == PROVIDER
    rows = entry.example_inputs()[0][:3]
    stats = engine.run({"features": rows.numpy()}, 2000, keep_samples=True)
    with torch.no_grad():
        outputs = mc_dropout_copy(entry.build())(rows.repeat(2000, 1))
    for out, reference, spec in zip(stats, outputs, engine.config.outputs, strict=True):
        theirs = reference.double().reshape(2000, 3, *reference.shape[1:])
        if spec.semantics is not None and spec.semantics.is_classification:
            theirs = torch.softmax(theirs, -1)
        ours = Moments.from_samples(np.moveaxis(out.samples, 1, 0).reshape(2000, -1))
        torch_side = Moments.from_samples(theirs.numpy().reshape(2000, -1))
        assert mean_z_test(ours, torch_side, 1e-4, margin=FP16_MEAN_MARGIN).passed
        assert variance_ratio_test(ours, torch_side, 1e-4, margin=FP16_VARIANCE_MARGIN).passed
