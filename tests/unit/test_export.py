"""export_model end to end (tiny models, real torch.onnx.export and ONNX Runtime), the
verification statistics, and the command line.

The PyTorch side of each verification is seeded; the ONNX side draws the server's unseeded
noise, so every verifying export is a live statistical test that fails by chance with at most
the false-failure probability it states (1e-4 by default).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import export.verify
from export import (
    DropoutNotKeptError,
    DropoutNotRunError,
    ExportArgumentError,
    ExportReport,
    NoDropoutError,
    VerificationError,
    VersionExistsError,
    ZeroDropoutError,
    check_graph,
    export_model,
    mc_dropout_copy,
)
from export.__main__ import main as cli_main
from export.mc_mode import find_dropout_modules
from export.onnx_export import export_onnx_bytes
from export.stats import (
    MomentAccumulator,
    Moments,
    bonferroni_threshold,
    mean_z_test,
    variance_ratio_test,
)
from service.engine.onnx_session import SessionConfig, create_session

pytestmark = pytest.mark.export  # trains and exports models: not in make test-fast

ROOT = Path(__file__).resolve().parents[2]
VERIFY_SAMPLES = 2000


# Factories: module level so the command line can import them (tests.unit.test_export:...).
def make_tiny() -> nn.Module:
    """Regression MLP, dropout before the output layer."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))


def make_no_dropout() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


class Classifier(nn.Module):
    """BatchNorm with non-trivial running statistics, dropout in the head."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(p), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


def make_classifier(p: float = 0.3) -> Classifier:
    torch.manual_seed(1)
    model = Classifier(p)
    batch_norm = model.body[1]
    assert isinstance(batch_norm, nn.BatchNorm1d)
    assert batch_norm.running_mean is not None
    assert batch_norm.running_var is not None
    with torch.no_grad():  # far from (0, 1): BatchNorm in training mode would show
        batch_norm.running_mean.uniform_(-1.0, 1.0)
        batch_norm.running_var.uniform_(0.5, 3.0)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _training_flags(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _reference_weights_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Published:
    repository: Path
    model: nn.Module
    flags_before: dict[str, bool]
    state_before: dict[str, torch.Tensor]
    report: ExportReport


@pytest.fixture(scope="module")
def export_published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    """A classifier, left by its caller in training mode, exported once into a repository."""
    repository = tmp_path_factory.mktemp("repo") / "models"
    model = make_classifier()
    model.train()
    flags, state = _training_flags(model), _state(model)
    report = export_model(
        model,
        torch.randn(4, 5, generator=torch.Generator().manual_seed(0)),
        repository=repository,
        name="tiny_cls",
        task="classification",
        input_names=["x"],
        output_names=["logits"],
        labels=["ant", "bee", "cat"],
        default_num_samples=50,
        max_num_samples=5000,
        verify_samples=VERIFY_SAMPLES,
        description="tiny classifier",
        metrics={"test_accuracy": 0.5},
    )
    return Published(repository, model, flags, state, report)


def _read_json(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def test_publishes_exactly_one_version_folder(export_published: Published) -> None:
    report = export_published.report
    assert report.version == 1
    assert report.path == export_published.repository / "tiny_cls" / "1"
    assert sorted(p.name for p in report.path.iterdir()) == [
        "config.json",
        "metadata.json",
        "model.onnx",
    ]
    # The temporary build folder is gone.
    assert [p.name for p in (export_published.repository / "tiny_cls").iterdir()] == ["1"]


def test_config_matches_the_contract(export_published: Published) -> None:
    config = _read_json(export_published.report.path / "config.json")
    activation_bytes = config.pop("activation_bytes_per_row")
    assert config == {
        "format_version": 1,
        "name": "tiny_cls",
        "task": "classification",
        "description": "tiny classifier",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 5]}],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": [-1, 3], "semantics": "logits"}
        ],
        "labels": ["ant", "bee", "cat"],
        "num_samples": {"default": 50, "max": 5000},
    }
    # At least the input and output rows (float32), plus the 16-wide hidden activations.
    assert isinstance(activation_bytes, int)
    assert activation_bytes >= (5 + 3 + 16) * 4


def test_metadata_matches_the_contract(export_published: Published) -> None:
    path = export_published.report.path
    metadata = _read_json(path / "metadata.json")
    assert set(metadata) == {
        "format_version",
        "opset",
        "weights_sha256",
        "onnx_sha256",
        "dropout",
        "dropout_not_run",
        "mha_fastpath_enabled",
        "precision",
        "stochastic_nodes",
        "exported_at",
        "versions",
        "verification",
        "metrics",
    }
    assert metadata["format_version"] == 1
    assert metadata["opset"] == 18
    assert metadata["onnx_sha256"] == hashlib.sha256((path / "model.onnx").read_bytes()).hexdigest()
    assert metadata["weights_sha256"] == _reference_weights_sha256(export_published.model)
    assert metadata["dropout"] == [{"module": "head.0", "type": "Dropout", "p": 0.3}]
    assert metadata["dropout_not_run"] == []
    assert metadata["mha_fastpath_enabled"] is False
    assert metadata["precision"] == "fp32"
    assert [n["op_type"] for n in metadata["stochastic_nodes"]] == ["Dropout"]
    assert datetime.fromisoformat(metadata["exported_at"]).tzinfo is not None
    assert set(metadata["versions"]) == {"torch", "onnx", "onnxruntime"}
    assert metadata["metrics"] == {"test_accuracy": 0.5}

    verification = metadata["verification"]
    assert verification["passed"] is True
    assert verification["num_samples"] == VERIFY_SAMPLES
    assert verification["false_failure_probability"] == 1e-4
    assert verification["plan"]["rows"] == 4
    assert verification["plan"]["torch_device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert verification["plan"]["reason"] == "n fixed by the caller"
    checks = {c["name"]: c for c in verification["checks"]}
    assert list(checks) == [
        "repeated_runs_differ",
        "row_copies_differ",
        "mean_z_test",
        "variance_ratio",
    ]
    assert all(c["passed"] and c["detail"] for c in checks.values())
    for name in ("mean_z_test", "variance_ratio"):
        assert 0 <= checks[name]["max_abs_z"] < checks[name]["threshold"]
        assert checks[name]["num_elements"] == 4 * 3
    # Not "min <= 1 <= max": the K ratios are correlated and can all fall on one side of 1 by
    # chance. Agreement itself is the z-test's job (asserted above).
    assert 0 < checks["variance_ratio"]["min_ratio"] <= checks["variance_ratio"]["max_ratio"]


def test_published_graph_keeps_dropout_active(export_published: Published) -> None:
    path = export_published.report.path / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )
    assert check_graph(model).passed
    # BatchNorm is folded away or in inference mode, never in training mode.
    assert not any(
        n.op_type == "BatchNormalization" and len(n.output) > 1 for n in model.graph.node
    )
    session = create_session(path, SessionConfig(use_gpu=False))
    x = np.ones((3, 5), dtype=np.float32)
    first, second = (session.run(None, {"x": x})[0] for _ in range(2))
    assert not np.array_equal(first, second)


def test_callers_model_is_not_mutated(export_published: Published) -> None:
    model = export_published.model
    assert _training_flags(model) == export_published.flags_before
    assert model.training
    after = _state(model)
    assert after.keys() == export_published.state_before.keys()
    for key, before in export_published.state_before.items():
        assert torch.equal(after[key], before), key
    assert all(p.requires_grad for p in model.parameters())


def test_next_version_and_eval_model_untouched(export_published: Published) -> None:
    model = make_classifier().eval()
    report = export_model(
        model,
        torch.randn(4, 5),
        repository=export_published.repository,
        name="tiny_cls",
        task="classification",
        verify_samples=VERIFY_SAMPLES,
    )
    assert report.version == 2
    assert report.path.name == "2"
    assert not any(m.training for m in model.modules())
    assert _read_json(report.path / "config.json")["outputs"][0]["name"] == "output"


def test_existing_version_is_refused(export_published: Published) -> None:
    with pytest.raises(VersionExistsError, match="already exists"):
        export_model(
            make_classifier(),
            torch.randn(4, 5),
            repository=export_published.repository,
            name="tiny_cls",
            task="classification",
            version=1,
        )


class Dropout2dRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.drop = nn.Dropout2d(0.3)
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(6 * 5 * 5, 2))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.drop(self.conv(image)))
        return out


def test_dropout2d_model_exports_and_verifies(tmp_path: Path) -> None:
    torch.manual_seed(3)
    report = export_model(
        Dropout2dRegressor(),
        torch.randn(4, 2, 5, 5),
        repository=tmp_path,
        name="d2",
        task="regression",
        input_names=["image"],
        output_names=["y"],
        verify_samples=VERIFY_SAMPLES,
    )
    assert report.verification.passed
    config = _read_json(report.path / "config.json")
    assert config["inputs"] == [{"name": "image", "dtype": "float32", "shape": [-1, 2, 5, 5]}]
    assert config["outputs"][0]["semantics"] == "values"
    assert "labels" not in config
    metadata = _read_json(report.path / "metadata.json")
    assert metadata["dropout"] == [{"module": "drop", "type": "Dropout2d", "p": 0.3}]
    assert "RandomUniformLike" in {n["op_type"] for n in metadata["stochastic_nodes"]}


def test_alpha_dropouts_export_from_a_single_row_example(tmp_path: Path) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(6, 8),
        nn.SELU(),
        nn.AlphaDropout(0.2),
        nn.Linear(8, 8),
        nn.SELU(),
        nn.FeatureAlphaDropout(0.2),
        nn.Linear(8, 2),
    )
    report = export_model(
        model,
        torch.randn(1, 6),  # batch of one: torch.export would specialise it without care
        repository=tmp_path,
        name="alpha",
        task="regression",
        verify_samples=VERIFY_SAMPLES,
    )
    assert report.verification.passed
    assert report.verification.rows == 1
    assert len(report.metadata["stochastic_nodes"]) >= 2
    session = create_session(report.path / "model.onnx", SessionConfig(use_gpu=False))
    assert session.run(None, {"input": np.zeros((7, 6), np.float32)})[0].shape == (7, 2)


def test_model_without_dropout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NoDropoutError, match="Sequential has no dropout module"):
        export_model(
            make_no_dropout(), torch.randn(2, 6), repository=tmp_path, name="m", task="regression"
        )
    assert list(tmp_path.iterdir()) == []


def test_zero_rate_dropout_is_refused_naming_the_modules(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Linear(6, 8), nn.Dropout(0.0), nn.ReLU(), nn.Dropout1d(0.0), nn.Linear(8, 2)
    )
    with pytest.raises(ZeroDropoutError) as raised:
        export_model(model, torch.randn(2, 6), repository=tmp_path, name="m", task="regression")
    assert "1 (Dropout, p=0.0)" in str(raised.value)
    assert "3 (Dropout1d, p=0.0)" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


class UnusedDropout(nn.Module):
    """Two dropout modules, one of which forward never calls: the graph gets one mask."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Dropout(0.2)
        self.forgotten = nn.Dropout(0.5)
        self.linear = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(self.used(x))
        return out


def test_a_dropout_module_that_never_runs_is_reported_not_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    report = export_model(
        UnusedDropout(), torch.randn(4, 6), repository=tmp_path, name="m", task="regression",
        verify_samples=500,
    )  # fmt: skip
    forgotten = {"module": "forgotten", "type": "Dropout", "p": 0.5}
    assert [d.to_dict() for d in report.dropout_not_run] == [forgotten]
    assert report.metadata["dropout_not_run"] == [forgotten]
    assert _read_json(report.path / "metadata.json")["dropout_not_run"] == [forgotten]
    assert "dropout not run in the MC-mode forward (1, " in report.summary()
    assert len(report.metadata["stochastic_nodes"]) == 1


class ExportBlindDropout(nn.Dropout):
    """Samples in PyTorch but traces as identity, as an exporter that froze it would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            return x
        return super().forward(x)


class FrozenDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kept = nn.Dropout(0.2)
        self.frozen = ExportBlindDropout(0.3)
        self.forgotten = nn.Dropout(0.5)
        self.linear = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(self.frozen(self.kept(x)))
        return out


def test_a_running_dropout_module_missing_from_the_graph_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DropoutNotKeptError) as raised:
        export_model(
            FrozenDropout(), torch.randn(2, 6), repository=tmp_path, name="m", task="regression"
        )
    message = str(raised.value)
    assert "1 stochastic nodes for 2 active dropout modules that run" in message
    assert "frozen (ExportBlindDropout, p=0.3)" in message
    assert "1 more do not run in the MC-mode forward and are not counted: forgotten" in message
    assert list(tmp_path.iterdir()) == []


class TrainingOnlyDropout(nn.Module):
    """Calls its dropout module only in training mode, so MC mode (eval) never runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.linear = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(self.drop(x) if self.training else x)
        return out


def test_model_whose_dropout_never_runs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DropoutNotRunError, match=r"none of the 1 dropout modules .*\(drop\)"):
        export_model(
            TrainingOnlyDropout(), torch.randn(2, 6), repository=tmp_path, name="m",
            task="regression",
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


class FunctionalDropout(nn.Module):
    """Samples with its dropout module's rate and flag without calling the module."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.linear = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sampled = nn.functional.dropout(x, self.drop.p, training=self.drop.training)
        out: torch.Tensor = self.linear(sampled)
        return out


def test_dropout_sampled_without_calling_its_module_still_exports(tmp_path: Path) -> None:
    # No module runs, but the graph samples: verification, not the hook count, decides.
    torch.manual_seed(0)
    report = export_model(
        FunctionalDropout(), torch.randn(4, 6), repository=tmp_path, name="m",
        task="regression", verify_samples=500,
    )  # fmt: skip
    assert report.verification.passed
    assert [d.module for d in report.dropout_not_run] == ["drop"]
    assert len(report.metadata["stochastic_nodes"]) == 1


def test_exporter_failure_on_a_dropout_op_names_the_module_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_export(*args: object, **kwargs: object) -> None:
        # What the legacy exporter said about Dropout2d in training mode.
        raise RuntimeError(
            "Exporting the operator 'aten::feature_dropout' to ONNX is not supported"
        )

    monkeypatch.setattr(torch.onnx, "export", failing_export)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout2d(0.3))
    with pytest.raises(DropoutNotKeptError, match=r"cannot keep Dropout2d .*modules 1\)"):
        export_model(
            model, torch.randn(2, 1, 4, 4), repository=tmp_path, name="m", task="regression"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"opset": 22}, "opset must be within 18..21"),
        ({"opset": 17}, "opset must be within 18..21"),
        ({"name": "a/b"}, "model name must match"),
        ({"labels": ["only", "two"]}, "3 classes but 2 labels"),
        ({"max_num_samples": 10, "default_num_samples": 20}, "max_num_samples must be >="),
        ({"output_semantics": ["values"]}, "semantics"),
    ],
)
def test_invalid_arguments_are_refused_early(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"repository": tmp_path, "name": "m", "task": "classification"}
    arguments.update(overrides)
    with pytest.raises(ExportArgumentError, match=message):
        export_model(make_classifier(), torch.randn(2, 5), **arguments)
    assert list(tmp_path.iterdir()) == []


def test_deterministic_graph_fails_verification_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def default_sampler(model: bytes, config: Any = None) -> Any:
        """The ONNX side in a session with ONNX Runtime's default options, whose
        EliminateDropout removes the Dropout node: every sample is the same."""
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def sample(inputs: Any, count: int) -> list[Any]:
            tiled = [np.tile(x, (count,) + (1,) * (x.ndim - 1)) for x in inputs]
            return list(session.run(None, dict(zip(names, tiled, strict=True))))

        return sample

    monkeypatch.setattr(export.verify, "onnx_sampler", default_sampler)
    with pytest.raises(VerificationError) as raised:
        export_model(
            make_tiny(), torch.randn(4, 6), repository=tmp_path, name="m", task="regression",
            verify_samples=500,
        )  # fmt: skip
    failed = raised.value.report.failed
    assert "repeated_runs_differ" in failed
    assert "row_copies_differ" in failed
    assert "variance_ratio" in failed
    assert "repeated_runs_differ" in str(raised.value)
    assert "nothing was published" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_wrong_dropout_rate_fails_the_variance_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dropout right before the output layer: p=0.5 instead of 0.2 leaves the mean unchanged in
    # expectation, so only the variance test can tell.
    other = make_tiny()
    dropout = other.get_submodule("2")
    assert isinstance(dropout, nn.Dropout)
    dropout.p = 0.5
    wrong_bytes = export_onnx_bytes(
        mc_dropout_copy(other),
        (torch.randn(2, 6),),
        input_names=["input"],
        output_names=["output"],
        opset=18,
        dropout=find_dropout_modules(other),
    )

    real_sampler = export.verify.onnx_sampler

    def wrong_sampler(model: bytes, config: Any = None) -> Any:
        """The server's sampling path, on the graph exported with the wrong rate."""
        return real_sampler(wrong_bytes, config)

    monkeypatch.setattr(export.verify, "onnx_sampler", wrong_sampler)
    with pytest.raises(VerificationError) as raised:
        export_model(
            make_tiny(), torch.randn(4, 6), repository=tmp_path, name="m", task="regression"
        )
    report = raised.value.report
    assert "variance_ratio" in report.failed
    assert "repeated_runs_differ" not in report.failed
    variance = next(c for c in report.checks if c.name == "variance_ratio")
    assert variance.max_ratio is not None
    assert variance.max_ratio > 1.5
    assert variance.threshold is not None
    assert variance.max_abs_z is not None
    assert variance.max_abs_z > variance.threshold
    assert list(tmp_path.iterdir()) == []


# --- verification statistics (pure numpy) ------------------------------------------------


def test_bonferroni_threshold() -> None:
    assert bonferroni_threshold(0.05, 1) == pytest.approx(1.95996, abs=1e-4)
    assert bonferroni_threshold(5e-5, 40) > bonferroni_threshold(5e-5, 4) > 4
    with pytest.raises(ValueError, match="alpha"):
        bonferroni_threshold(0.0, 3)


def test_moment_accumulator_matches_numpy_across_chunks() -> None:
    rng = np.random.default_rng(0)
    samples = 1e4 + rng.gamma(2.0, 1.0, size=(3000, 5))  # large mean, skewed: shift matters
    accumulator = MomentAccumulator()
    for chunk in np.array_split(samples, 7):
        accumulator.update(chunk)
    moments = accumulator.result()
    centred = samples - samples.mean(0)
    np.testing.assert_allclose(moments.mean, samples.mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.variance, samples.var(0, ddof=1), rtol=1e-8)
    kurtosis = (centred**4).mean(0) / (centred**2).mean(0) ** 2
    np.testing.assert_allclose(moments.kurtosis, kurtosis, rtol=1e-6)


def test_same_distribution_passes_both_tests() -> None:
    # alpha 1e-4 per test: a fresh seed would fail with probability < 2e-4.
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.1, 10.0, size=30)
    a = Moments.from_samples(rng.normal(3.0, scale, size=(4000, 30)))
    b = Moments.from_samples(rng.normal(3.0, scale, size=(4000, 30)))
    assert mean_z_test(a, b, 1e-4).passed
    result = variance_ratio_test(a, b, 1e-4)
    assert result.passed
    assert result.min_ratio is not None
    assert result.max_ratio is not None
    assert 0.85 < result.min_ratio <= result.max_ratio < 1.15


def test_two_point_law_does_not_fail_the_variance_test() -> None:
    # Kurtosis ~1 (dropout p=0.5 on a single unit): the first-order standard error ~vanishes.
    rng = np.random.default_rng(2)
    a = Moments.from_samples(2.0 * rng.integers(0, 2, size=(4000, 20)))
    b = Moments.from_samples(2.0 * rng.integers(0, 2, size=(4000, 20)))
    assert variance_ratio_test(a, b, 1e-4).passed
    assert mean_z_test(a, b, 1e-4).passed


def test_mean_shift_and_variance_change_are_caught() -> None:
    rng = np.random.default_rng(3)
    reference = Moments.from_samples(rng.normal(0.0, 1.0, size=(4000, 10)))
    shifted = Moments.from_samples(rng.normal(0.2, 1.0, size=(4000, 10)))
    wider = Moments.from_samples(rng.normal(0.0, 1.25, size=(4000, 10)))
    mean = mean_z_test(shifted, reference, 5e-5)
    assert not mean.passed
    assert mean.max_abs_z > mean.threshold
    assert variance_ratio_test(shifted, reference, 5e-5).passed
    variance = variance_ratio_test(wider, reference, 5e-5)
    assert not variance.passed
    assert "variance ratio" in variance.problems[0]
    assert mean_z_test(wider, reference, 5e-5).passed


def test_deterministic_elements_are_compared_for_equality() -> None:
    rng = np.random.default_rng(4)
    noisy = rng.normal(0.0, 1.0, size=(1000, 1))
    constant = np.full((1000, 1), 5.0)
    onnx_side = Moments.from_samples(np.hstack([constant, constant + 1e-6, noisy]))
    torch_side = Moments.from_samples(
        np.hstack([constant, constant, rng.normal(0.0, 1.0, size=(1000, 1))])
    )
    mean = mean_z_test(onnx_side, torch_side, 1e-4)
    assert mean.passed
    assert mean.num_deterministic == 2

    unequal = Moments.from_samples(np.hstack([constant + 0.1, constant, noisy]))
    assert not mean_z_test(unequal, torch_side, 1e-4).passed

    frozen = Moments.from_samples(np.hstack([constant, constant, np.zeros((1000, 1))]))
    variance = variance_ratio_test(frozen, torch_side, 1e-4)
    assert not variance.passed
    assert "vary in PyTorch but not in ONNX Runtime" in variance.problems[0]


# --- command line -------------------------------------------------------------------------


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_help() -> None:
    result = _run_cli("--help")
    assert result.returncode == 0
    for option in ("--model", "--state-dict", "--input-shape", "--example", "--repository",
                   "--task", "--labels", "--output-semantics", "exit status"):  # fmt: skip
        assert option in result.stdout


def test_cli_exports_a_factory_with_weights(tmp_path: Path) -> None:
    weights = make_tiny()
    torch.manual_seed(5)
    for parameter in weights.parameters():
        torch.nn.init.normal_(parameter)
    torch.save(weights.state_dict(), tmp_path / "weights.pt")
    result = _run_cli(
        "--model", "tests.unit.test_export:make_tiny",
        "--state-dict", str(tmp_path / "weights.pt"),
        "--input-shape", "1,6",
        "--repository", str(tmp_path / "models"),
        "--name", "cli_tiny",
        "--task", "regression",
        "--output-names", "y",
        "--verify-samples", "500",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "published cli_tiny version 1" in result.stdout
    assert "ok   variance_ratio" in result.stdout
    assert "torchvision" not in result.stderr
    metadata = _read_json(tmp_path / "models" / "cli_tiny" / "1" / "metadata.json")
    assert metadata["weights_sha256"] == _reference_weights_sha256(weights)
    assert _read_json(tmp_path / "models" / "cli_tiny" / "1" / "config.json")["outputs"] == [
        {"name": "y", "dtype": "float32", "shape": [-1, 2], "semantics": "values"}
    ]


def test_cli_reports_export_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--input-shape", "2,6", "--repository", str(tmp_path), "--name", "m", "--task", "regression"]  # fmt: skip
    assert cli_main(["--model", "tests.unit.test_export:make_no_dropout", *common]) == 1
    assert "NoDropoutError" in capsys.readouterr().err
    assert cli_main(["--model", "tests.unit.no_such_module:make", *common]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert cli_main(["--model", "tests.unit.test_export:VERIFY_SAMPLES", *common]) == 2
    assert "not callable" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_variance_outputs_must_name_their_values_output() -> None:
    from export.api import _check_variance_of

    _check_variance_of(["mu", "lv"], ["values", "log_variance"], {"lv": "mu"})
    with pytest.raises(ExportArgumentError, match="must map exactly the variance outputs"):
        _check_variance_of(["mu", "lv"], ["values", "log_variance"], {})
    with pytest.raises(ExportArgumentError, match="is the variance of 'lv', not a values output"):
        _check_variance_of(["mu", "lv"], ["values", "log_variance"], {"lv": "lv"})
