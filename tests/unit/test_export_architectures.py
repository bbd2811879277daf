"""Real architectures (export.zoo) through export_model, and what they needed from it.

Every zoo architecture exports, passes the static graph checks and the statistical
verification against PyTorch MC dropout; dropout modules bypassed by fused attention are
reported instead of refused, while a dropout module that runs but is missing from the graph is
still refused; PyTorch's fused fast path is off for the export and the reference; dynamic
non-batch axes (config shape and max_shape, two lengths in ONNX Runtime); mixed class and
regression heads (config per output); the automatic, time-bounded verification plan.

Statistics: each verification states its false-failure probability, FALSE_FAILURE (1e-4, split
between the mean and the variance test, Bonferroni over the K output elements), whatever n
(moderate here: VERIFY_SAMPLES, CONV_VERIFY_SAMPLES for the convolutional nets, whose whole
trunk runs once per sample on the CPU). The seeds are fixed, so the tests are deterministic;
with fresh seeds the architecture tests together would fail by chance with probability below
8 x 1e-4.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import export.verify
from export import (
    ExportArgumentError,
    ExportReport,
    GraphCheckError,
    check_graph,
    export_model,
    mc_dropout_copy,
    zoo,
)
from export.__main__ import main as cli_main
from export.checks import check_batch_dimension
from export.mc_mode import fastpath_disabled
from export.publish import _dim_size, activation_bytes_per_row
from export.verify import (
    DEFAULT_SAMPLES,
    MIN_AUTO_SAMPLES,
    VerificationPlan,
    _plan,
    _sample_moments,
)
from export.zoo import ZOO, TransformerClassifier, ZooEntry
from service.engine.onnx_session import SessionConfig, create_session
from tests.conftest import ZOO_FALSE_FAILURE as FALSE_FAILURE
from tests.conftest import ZOO_VERIFY_SAMPLES as VERIFY_SAMPLES

#: Every test here exports or builds a real architecture with PyTorch: not in make test-fast.
pytestmark = pytest.mark.export

ROOT = Path(__file__).resolve().parents[2]


def _entry(name: str) -> ZooEntry:
    entry = ZOO[name]
    if not entry.available:
        pytest.skip(f"{name} needs {', '.join(entry.requires)} (the dev extra pins them)")
    return entry


@pytest.fixture(scope="module")
def exported(zoo_export: Callable[[str], ExportReport]) -> Callable[[str], ExportReport]:
    """Exports a zoo architecture once per test session (tests/conftest.py)."""
    return zoo_export


def _read_json(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


@pytest.mark.parametrize("name", list(ZOO))
def test_architecture_exports_checks_and_verifies(
    name: str, exported: Callable[[str], ExportReport]
) -> None:
    report = exported(name)
    entry = ZOO[name]
    assert report.graph_checks.passed, report.graph_checks.summary()
    assert report.verification.passed, report.verification.summary()
    assert report.verification.false_failure_probability == FALSE_FAILURE
    assert [c.name for c in report.verification.checks] == [
        "repeated_runs_differ",
        "row_copies_differ",
        "mean_z_test",
        "variance_ratio",
    ]
    # Every output element varies: the statistical tests compared something (at random
    # initialisation EfficientNet's logits are ~1e-13 and would all look deterministic).
    assert [c.num_deterministic for c in report.verification.checks[2:]] == [0, 0]
    active = [d for d in report.dropout if d.p > 0]
    running = len(active) - len(report.dropout_not_run)
    assert len(report.metadata["stochastic_nodes"]) >= running >= 1
    if entry.dropout_not_run is not None:
        assert len(report.dropout_not_run) == entry.dropout_not_run
    assert report.metadata["mha_fastpath_enabled"] is False
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the export
    # The published files are what was checked: reload and run the graph once.
    graph = onnx.load(str(report.path / "model.onnx"))
    assert check_graph(graph, dynamic_axes=_declared(entry)).passed
    session = create_session(report.path / "model.onnx", SessionConfig(use_gpu=False))
    feeds = {
        s.name: t[:1].numpy() for s, t in zip(report.inputs, entry.example_inputs(), strict=True)
    }
    outputs = session.run(None, feeds)
    assert [o.shape for o in outputs] == [(1, *s.shape[1:]) for s in report.outputs]


def _declared(entry: ZooEntry) -> dict[str, tuple[int, ...]]:
    axes = entry.export_args.get("dynamic_axes", {})
    return {name: tuple(a) for name, a in axes.items()}


def test_bypassed_attention_dropout_is_reported_not_refused(
    exported: Callable[[str], ExportReport],
) -> None:
    bert = exported("bert")
    assert [d.module for d in bert.dropout_not_run] == [
        "model.bert.encoder.layer.0.attention.self.dropout",
        "model.bert.encoder.layer.1.attention.self.dropout",
    ]
    metadata = _read_json(bert.path / "metadata.json")
    assert [d["module"] for d in metadata["dropout_not_run"]] == [
        d.module for d in bert.dropout_not_run
    ]
    assert "dropout not run in the MC-mode forward (2, " in bert.summary()
    vit = exported("vit")
    # timm's fused attention passes attn_drop's rate only when the attention module trains.
    assert all(d.module.endswith("attn.attn_drop") for d in vit.dropout_not_run)


def test_transformer_encoder_fast_path_would_skip_dropout(
    exported: Callable[[str], ExportReport],
) -> None:
    # The premise: with the fast path on (PyTorch's default), the MC copy's encoder does not
    # sample at all under no_grad, so it could not serve as the reference.
    entry = _entry("transformer_encoder")
    mc_model = mc_dropout_copy(entry.build())
    assert isinstance(mc_model, TransformerClassifier)
    (tokens,) = entry.example_inputs()
    with torch.no_grad():
        hidden = mc_model.embed(tokens)
        first, second = mc_model.encoder(hidden), mc_model.encoder(hidden)
        assert torch.equal(first, second)
        with fastpath_disabled():
            first, second = mc_model.encoder(hidden), mc_model.encoder(hidden)
        assert not torch.equal(first, second)
    assert torch.backends.mha.get_fastpath_enabled()
    report = exported("transformer_encoder")
    assert report.verification.passed
    assert "fast path (torch.backends.mha) off" in report.summary()


def test_fastpath_setting_is_restored_after_an_error() -> None:
    seen = []

    def fail() -> None:
        with fastpath_disabled():
            seen.append(torch.backends.mha.get_fastpath_enabled())
            raise RuntimeError("boom")

    torch.backends.mha.set_fastpath_enabled(True)
    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert seen == [False]
    assert torch.backends.mha.get_fastpath_enabled()


# --- dynamic sequence axis --------------------------------------------------------------


def test_text_model_has_a_dynamic_sequence_axis(exported: Callable[[str], ExportReport]) -> None:
    report = exported("bert")
    config = _read_json(report.path / "config.json")
    assert config["task"] == "classification"
    assert config["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": [-1, -1], "max_shape": [-1, 64]},
        {"name": "attention_mask", "dtype": "int64", "shape": [-1, -1], "max_shape": [-1, 64]},
    ]
    assert config["outputs"] == [
        {"name": "logits", "dtype": "float32", "shape": [-1, 3], "semantics": "logits"}
    ]
    graph = onnx.load(str(report.path / "model.onnx"))
    # Both inputs share one symbol for the sequence, which the server can read from the graph.
    assert {v.type.tensor_type.shape.dim[1].dim_param for v in graph.graph.input} == {"sequence"}
    # Activation estimate at the longest sequence (many tensors grow with it).
    assert config["activation_bytes_per_row"] == activation_bytes_per_row(graph, {"sequence": 64})
    assert config["activation_bytes_per_row"] > 2 * activation_bytes_per_row(
        graph, {"sequence": 16}
    )

    session = create_session(report.path / "model.onnx", SessionConfig(use_gpu=False))
    generator = np.random.default_rng(0)
    for length in (16, 24, 64):
        ids = generator.integers(0, 100, size=(3, length), dtype=np.int64)
        mask = np.ones((3, length), dtype=np.int64)
        first, second = (
            session.run(None, {"input_ids": ids, "attention_mask": mask})[0] for _ in range(2)
        )
        assert first.shape == (3, 3)
        assert np.isfinite(first).all()
        assert not np.array_equal(first, second)  # still sampling at every length


class TokenTagger(nn.Module):
    """Per-token class logits: (B, S) tokens -> (B, S, C), S dynamic in the output too."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.drop(self.embed(tokens)))
        return out


def test_outputs_may_have_dynamic_axes_derived_from_the_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    report = export_model(
        TokenTagger(), torch.randint(0, 30, (4, 8)), repository=tmp_path, name="tagger",
        task="classification", input_names=["tokens"], output_names=["tags"],
        output_labels={"tags": ["O", "B-X", "I-X", "B-Y", "I-Y"]},
        dynamic_axes={"tokens": {1: "sequence"}}, axis_max={"sequence": 128},
        verify_samples=VERIFY_SAMPLES,
    )  # fmt: skip
    config = _read_json(report.path / "config.json")
    assert config["inputs"] == [
        {"name": "tokens", "dtype": "int64", "shape": [-1, -1], "max_shape": [-1, 128]}
    ]
    assert config["outputs"] == [
        {
            "name": "tags",
            "dtype": "float32",
            "shape": [-1, -1, 5],
            "semantics": "logits",
            "labels": ["O", "B-X", "I-X", "B-Y", "I-Y"],
        }
    ]
    assert "labels" not in config
    session = create_session(report.path / "model.onnx", SessionConfig(use_gpu=False))
    for length in (3, 40):
        tokens = np.zeros((2, length), dtype=np.int64)
        assert session.run(None, {"tokens": tokens})[0].shape == (2, length, 5)


class SequenceScores(nn.Module):
    """One score per token as a 'class' axis: the classes would vary with the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.drop = nn.Dropout(0.2)
        self.score = nn.Linear(8, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.score(self.drop(self.embed(tokens))).squeeze(-1)
        return out


def test_a_class_axis_must_be_static(tmp_path: Path) -> None:
    with pytest.raises(ExportArgumentError, match="static last axis"):
        export_model(
            SequenceScores(), torch.randint(0, 30, (2, 6)), repository=tmp_path, name="m",
            task="classification", dynamic_axes={"input": {1: "sequence"}},
            axis_max={"sequence": 32},
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("dynamic_axes", "axis_max", "example", "message"),
    [
        ({"nope": {1: "s"}}, {"s": 9}, (2, 6), "unknown inputs"),
        ({"input": {0: "s"}}, {"s": 9}, (2, 6), "axis 0 is the batch"),
        ({"input": {2: "s"}}, {"s": 9}, (2, 6), r"within 1\.\.1"),
        ({"input": {1: "s"}}, {}, (2, 6), "axis_max has no size"),
        ({"input": {1: "s"}}, {"s": 4}, (2, 6), "must be an integer >= the example's size 6"),
        ({"input": {1: "s"}}, {"s": 9, "t": 3}, (2, 6), "no input declares dynamic"),
        ({"input": {1: "s"}}, {"s": 9}, (2, 1), "needs >= 2"),
        ({"input": {1: "batch"}}, {"batch": 9}, (2, 6), "the batch's"),
        ({"input": {1: "two words"}}, {"two words": 9}, (2, 6), "identifiers"),
    ],
)
def test_dynamic_axes_arguments_are_checked_early(
    tmp_path: Path,
    dynamic_axes: dict[str, dict[int, str]],
    axis_max: dict[str, int],
    example: tuple[int, int],
    message: str,
) -> None:
    with pytest.raises(ExportArgumentError, match=message):
        export_model(
            TokenTagger(), torch.randint(0, 30, example), repository=tmp_path, name="m",
            task="classification", dynamic_axes=dynamic_axes, axis_max=axis_max,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


class PairModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.drop(a).sum(dim=1, keepdim=True) + b.sum(dim=1, keepdim=True)
        return out


def test_axes_sharing_a_name_must_share_the_example_size(tmp_path: Path) -> None:
    with pytest.raises(ExportArgumentError, match="axes sharing a name share one size"):
        export_model(
            PairModel(), (torch.randn(2, 5), torch.randn(2, 7)), repository=tmp_path, name="m",
            task="regression", dynamic_axes={"input_0": {1: "n"}, "input_1": {1: "n"}},
            axis_max={"n": 9},
        )  # fmt: skip


def _graph(
    inputs: list[tuple[str, list[int | str]]], outputs: list[tuple[str, list[int | str]]]
) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", [inputs[0][0]], [o[0]]) for o in outputs],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_batch_dimension_check_with_declared_dynamic_axes() -> None:
    model = _graph([("x", ["batch", "seq", 4])], [("y", ["batch", "seq", 4])])
    assert check_batch_dimension(model, {"x": (1,)}).passed
    # Undeclared: today's rule (only the batch is dynamic) holds.
    problems = check_batch_dimension(model).problems
    assert len(problems) == 2
    assert "input 'x' has dynamic dimensions [1] (seq)" in problems[0]
    # An output dimension from an expression of declared axes passes; one the server could
    # not bound (a data-dependent size) does not.
    derived = _graph([("x", ["batch", "seq", 4])], [("y", ["batch", "floor(seq/2) + 1", 4])])
    assert check_batch_dimension(derived, {"x": (1,)}).passed
    unbounded = _graph([("x", ["batch", "seq", 4])], [("y", ["batch", "u0", 4])])
    (problem,) = check_batch_dimension(unbounded, {"x": (1,)}).problems
    assert "output 'y' has dynamic dimensions [1] (u0)" in problem
    # Declared dynamic but exported static: the exporter specialised it.
    static = _graph([("x", ["batch", 6, 4])], [("y", ["batch", 6, 4])])
    (problem,) = check_batch_dimension(static, {"x": (1,)}).problems
    assert "static dimensions [1] that were declared dynamic" in problem
    (problem,) = check_batch_dimension(model, {"x": (1,), "z": (1,)}).problems
    assert "unknown inputs ['z']" in problem


def test_symbolic_dimensions_are_evaluated_at_their_maximum() -> None:
    def dim(text: str) -> onnx.TensorShapeProto.Dimension:
        value = onnx.TensorShapeProto.Dimension()
        value.dim_param = text
        return value

    sizes = {"sequence": 64, "width": 10}
    assert _dim_size(dim("sequence"), sizes) == 64
    assert _dim_size(dim("2*sequence + width"), sizes) == 138
    assert _dim_size(dim("floor(sequence/3)"), sizes) == 21
    assert _dim_size(dim("Max(1, sequence - 70)"), sizes) == 1
    assert _dim_size(dim("u0"), sizes) is None
    assert _dim_size(dim("__import__('os')"), sizes) is None
    assert _dim_size(dim("sequence"), {}) is None


# --- mixed heads ------------------------------------------------------------------------


def test_two_head_model_config(exported: Callable[[str], ExportReport]) -> None:
    report = exported("two_head")
    config = _read_json(report.path / "config.json")
    assert config["task"] == "mixed"
    assert "labels" not in config
    assert config["outputs"] == [
        {
            "name": "logits",
            "dtype": "float32",
            "shape": [-1, 3],
            "semantics": "logits",
            "labels": ["low", "mid", "high"],
        },
        {"name": "value", "dtype": "float32", "shape": [-1, 1], "semantics": "values"},
    ]
    assert config["inputs"] == [{"name": "features", "dtype": "float32", "shape": [-1, 8]}]
    # Both heads were verified: K covers the rows of both outputs.
    mean_test = next(c for c in report.verification.checks if c.name == "mean_z_test")
    assert mean_test.num_elements == 4 * (3 + 1)


def test_heteroscedastic_config(exported: Callable[[str], ExportReport]) -> None:
    config = _read_json(exported("heteroscedastic").path / "config.json")
    assert config["task"] == "regression"
    assert config["outputs"] == [
        {"name": "mean", "dtype": "float32", "shape": [-1, 2], "semantics": "values"},
        {
            "name": "log_variance",
            "dtype": "float32",
            "shape": [-1, 2],
            "semantics": "log_variance",
            "of": "mean",
        },
    ]


def test_single_class_output_keeps_top_level_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    report = export_model(
        ZOO["two_head"].build(), torch.randn(4, 8), repository=tmp_path, name="m",
        output_names=["kind", "price"], output_semantics=["probabilities", "values"],
        labels=["a", "b", "c"], verify_samples=500,
    )  # fmt: skip
    config = _read_json(report.path / "config.json")
    assert config["task"] == "mixed"
    assert config["labels"] == ["a", "b", "c"]
    assert [o["semantics"] for o in config["outputs"]] == ["probabilities", "values"]
    assert "labels" not in config["outputs"][0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task": "classification"}, "does not fit the output semantics"),
        ({"task": "regression"}, "does not fit the output semantics"),
        ({"output_semantics": None}, "output_semantics is required"),
        ({"output_semantics": None, "task": "mixed"}, "output_semantics is required"),
        (
            {
                "output_semantics": ["logits", "logits"],
                "output_labels": None,
                "labels": ["a", "b", "c"],
            },
            "labels need exactly one class output",
        ),
        ({"output_labels": {"value": ["x"]}}, "'value', which is not a class output"),
        ({"output_labels": {"logits": ["x"]}}, "'logits' has 3 classes but 1 labels"),
        ({"labels": ["a", "b"], "output_labels": None}, "3 classes but 2 labels"),
        ({"labels": ["a", "b", "c"]}, "not both"),
        (
            {
                "output_semantics": ["logits", "variance"],
                "variance_of": {"value": "logits"},
                "output_labels": None,
            },
            "not a values output",
        ),
        ({"output_semantics": ["logits", "banana"]}, "output semantics must be among"),
    ],
)
def test_mixed_head_arguments_are_checked_early(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {
        "repository": tmp_path,
        "name": "m",
        "output_names": ["logits", "value"],
        "output_semantics": ["logits", "values"],
        "output_labels": {"logits": ["a", "b", "c"]},
    }
    arguments.update(overrides)
    with pytest.raises(ExportArgumentError, match=message):
        export_model(ZOO["two_head"].build(), torch.randn(2, 8), **arguments)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_two_head_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli_main([
        "--model", "export.zoo:TwoHeadModel", "--input-shape", "4,8",
        "--repository", str(tmp_path), "--name", "pets",
        "--output-names", "kind,price", "--output-semantics", "logits,values",
        "--output-labels", "kind=cat,dog,eel", "--verify-samples", "500",
    ])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    config = _read_json(tmp_path / "pets" / "1" / "config.json")
    assert config["task"] == "mixed"
    assert config["outputs"][0]["labels"] == ["cat", "dog", "eel"]


def test_cli_exports_a_dynamic_axis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "tokens.npy", np.random.default_rng(0).integers(0, 30, (4, 8)))
    status = cli_main([
        "--model", "tests.unit.test_export_architectures:TokenTagger",
        "--example", str(tmp_path / "tokens.npy"), "--input-names", "tokens",
        "--repository", str(tmp_path / "models"), "--name", "tagger", "--task", "classification",
        "--dynamic-axis", "tokens:1:sequence", "--axis-max", "sequence=32",
        "--verify-samples", "500",
    ])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    config = _read_json(tmp_path / "models" / "tagger" / "1" / "config.json")
    assert config["inputs"][0]["max_shape"] == [-1, 32]
    assert config["outputs"][0]["shape"] == [-1, -1, 5]


# --- verification plan ------------------------------------------------------------------


def test_plan_keeps_the_default_when_it_fits_and_cuts_rows_then_samples() -> None:
    cpu = torch.device("cpu")
    fits = _plan(1e-3, 8, None, 60.0, cpu)
    assert (fits.num_samples, fits.rows) == (DEFAULT_SAMPLES, 8)
    # 8 rows take 0.08 s per sample: 4000 samples of 2 rows take 80 s, of 1 row 40 s.
    fewer_rows = _plan(0.08, 8, None, 60.0, cpu)
    assert (fewer_rows.num_samples, fewer_rows.rows) == (DEFAULT_SAMPLES, 1)
    assert "cut from n=4000 x 8 rows" in fewer_rows.reason
    fewer_samples = _plan(0.8, 8, None, 60.0, cpu)
    assert (fewer_samples.num_samples, fewer_samples.rows) == (600, 1)
    floor = _plan(10.0, 8, None, 60.0, cpu)
    assert (floor.num_samples, floor.rows) == (MIN_AUTO_SAMPLES, 1)
    assert "is the least it takes" in floor.reason
    fixed = _plan(10.0, 8, 200, 60.0, cpu)
    assert (fixed.num_samples, fixed.rows, fixed.reason) == (200, 8, "n fixed by the caller")


def test_automatic_verification_fits_its_time_budget(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    # A budget no model meets: the least plan, stated in the report and metadata.json.
    report = export_model(
        model, torch.randn(4, 6), repository=tmp_path, name="m", task="regression",
        verify_time_budget_s=1e-6,
    )  # fmt: skip
    assert report.verification.passed
    assert (report.verification.num_samples, report.verification.rows) == (MIN_AUTO_SAMPLES, 1)
    metadata = _read_json(report.path / "metadata.json")["verification"]
    assert metadata["num_samples"] == MIN_AUTO_SAMPLES
    assert metadata["false_failure_probability"] == 1e-4
    assert metadata["plan"]["rows"] == 1
    assert "to fit the time budget" in metadata["plan"]["reason"]
    assert "to fit the time budget" in report.summary()
    # A budget every model meets (no timing in the assertion): the full n on every row.
    report = export_model(
        model, torch.randn(4, 6), repository=tmp_path, name="m", task="regression",
        verify_time_budget_s=1e9,
    )  # fmt: skip
    assert (report.verification.num_samples, report.verification.rows) == (DEFAULT_SAMPLES, 4)


# --- torchvision import helper ----------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )  # fmt: skip


def test_import_torchvision_defines_missing_schemas_once() -> None:
    _entry("mobilenet_v3_small")
    first = zoo.import_torchvision()
    assert zoo.import_torchvision() is first
    assert torch._C._jit_get_schemas_for_operator("torchvision::nms")
    # Defined here where torchvision's extension does not load beside this torch (PyPI's
    # CUDA build beside the CPU torch), not at all where it does.
    assert len(zoo._torchvision_library) <= 1
    first.models.mobilenet_v3_small(num_classes=3)


def test_import_torchvision_is_harmless_when_the_operators_exist() -> None:
    _entry("mobilenet_v3_small")
    result = _python(
        "import torch\n"
        "import export.zoo as zoo\n"
        "if not torch._C._jit_get_schemas_for_operator('torchvision::nms'):\n"
        "    lib = torch.library.Library('torchvision', 'DEF')  # as the C++ extension would\n"
        "    for schema in zoo._TORCHVISION_SCHEMAS.values():\n"
        "        lib.define(schema)\n"
        "zoo.import_torchvision().models.efficientnet_b0(num_classes=3)\n"
        "print(len(zoo._torchvision_library))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"


def test_graph_check_error_names_an_undeclared_dynamic_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A graph whose output has a dynamic axis no input declares: refused by the checks.
    import export.api

    real = export.api.export_onnx_bytes

    def undeclared(*args: Any, **kwargs: Any) -> bytes:
        model = onnx.load_from_string(real(*args, **kwargs))
        model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "u0"
        return bytes(model.SerializeToString())

    monkeypatch.setattr(export.api, "export_onnx_bytes", undeclared)
    with pytest.raises(GraphCheckError, match=r"output 'output' has dynamic dimensions \[1\]"):
        export_model(
            TokenTagger(), torch.randint(0, 30, (2, 4)), repository=tmp_path, name="m",
            task="classification",
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


class _FakeSide:
    """Stands in for a sampler: standard normal samples of 3 elements."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self.drawn = 0

    def samples(self, count: int) -> np.ndarray:
        self.drawn += count
        return self._rng.normal(size=(count, 3))


@pytest.mark.parametrize(
    ("chunk_s", "expected", "reason"),
    [
        (2.0, 3000, "cut to n=3000 after 100 samples (20 ms per sample)"),
        (0.1, DEFAULT_SAMPLES, "planned"),
        (1e3, MIN_AUTO_SAMPLES, "cut to n=500 after 100 samples"),
    ],
)
def test_n_is_cut_when_the_chunks_run_slower_than_planned(
    monkeypatch: pytest.MonkeyPatch, chunk_s: float, expected: int, reason: str
) -> None:
    # A fake clock: every chunk (100 samples, both sides) takes chunk_s.
    def clock() -> Iterator[float]:
        for i in itertools.count():
            yield i * chunk_s
            yield (i + 1) * chunk_s

    ticks = clock()
    monkeypatch.setattr(export.verify.time, "perf_counter", lambda: next(ticks))
    plan = VerificationPlan(DEFAULT_SAMPLES, 1, "cpu", "planned", 0.0)
    onnx_side, torch_side = _FakeSide(0), _FakeSide(1)
    onnx_moments, torch_moments, final = _sample_moments(
        onnx_side, torch_side, plan, chunk=100, adaptive_budget_s=60.0
    )
    assert final.num_samples == expected == onnx_moments.n == torch_moments.n
    assert onnx_side.drawn == torch_side.drawn == expected
    assert reason in final.reason
    # A caller's n is never changed.
    _, _, fixed = _sample_moments(
        _FakeSide(2), _FakeSide(3), plan, chunk=100, adaptive_budget_s=None
    )
    assert fixed == plan
