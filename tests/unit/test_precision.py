"""Half precision (export/precision.py): a float16 graph behind float32 inputs and outputs,
its dropout in float32, verified against PyTorch float32 within the stated tolerance, served
like any model.

Statistics: each export's verification has false-failure probability 1e-4 (split between the
mean and variance tests, Bonferroni over the output elements, with the float16 margins); the
served answers are compared the same way (tests/integration/parity.py's tests with the
margins), 1e-4 each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import ExportArgumentError, export_model, mc_dropout_copy, zoo
from export.precision import FP16_MEAN_MARGIN, FP16_VARIANCE_MARGIN, KEPT_IN_FLOAT32
from export.stats import Moments, mean_z_test, variance_ratio_test
from service.engine.onnx_session import SessionConfig
from service.engine.runtime import build_engine
from service.repository import load_version

pytestmark = pytest.mark.export

T = 2000


@pytest.fixture(scope="module")
def half(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("half")
    for name in ("two_head", "heteroscedastic"):
        entry = zoo.ZOO[name]
        export_model(entry.build(), entry.example_inputs(), repository=repository, name=name,
                     verify_samples=2000, precision="fp16", **entry.export_args)  # fmt: skip
    return repository


def test_the_graph_computes_in_float16_behind_float32_inputs_and_outputs(half: Path) -> None:
    graph = onnx.load(str(half / "two_head" / "1" / "model.onnx"))
    io = [*graph.graph.input, *graph.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {onnx.TensorProto.FLOAT}
    weights = [i for i in graph.graph.initializer if i.dims and np.prod(i.dims) > 16]
    assert weights
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    # The dropout stays in float32: its rate is the exported one, not its float16 rounding.
    dtypes = {i.name: i.data_type for i in graph.graph.initializer}
    for node in graph.graph.node:
        if node.op_type == "Constant":
            dtypes[node.output[0]] = node.attribute[0].t.data_type
    rates = [
        dtypes[name]
        for node in graph.graph.node
        if node.op_type in KEPT_IN_FLOAT32
        for name in node.input
        if name in dtypes
    ]
    assert rates  # the Dropout ratios / keep-probability constants
    assert set(rates) <= {onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL}
    config = (half / "two_head" / "1" / "config.json").read_text()
    assert '"precision": "fp16"' in config


def test_served_answers_match_pytorch_float32_within_the_stated_tolerance(half: Path) -> None:
    for name in ("two_head", "heteroscedastic"):
        entry = zoo.ZOO[name]
        source = load_version(half / name, 1)
        assert source.config.precision == "fp16"
        engine = build_engine(source, SessionConfig(use_gpu=False), 256 * 2**20)
        rows = entry.example_inputs()[0][:3]
        stats = engine.run({source.config.inputs[0].name: rows.numpy()}, T, keep_samples=True)
        mc = mc_dropout_copy(entry.build())
        with torch.no_grad():
            outputs = mc(rows.repeat(T, 1))
        for out, reference, spec in zip(stats, outputs, source.config.outputs, strict=True):
            torch_side = reference.double().reshape(T, 3, *reference.shape[1:])
            if spec.semantics is not None and spec.semantics.is_classification:
                torch_side = torch.softmax(torch_side, -1)
            assert out.samples is not None
            ours = Moments.from_samples(np.moveaxis(out.samples, 1, 0).reshape(T, -1))
            theirs = Moments.from_samples(torch_side.numpy().reshape(T, -1))
            mean = mean_z_test(ours, theirs, 1e-4, margin=FP16_MEAN_MARGIN)
            assert mean.passed, mean
            variance = variance_ratio_test(ours, theirs, 1e-4, margin=FP16_VARIANCE_MARGIN)
            assert variance.passed, variance


def test_margins_tolerate_small_differences_only() -> None:
    """With the margins a 1% shift of the mean and a 10% larger variance pass; a 5% shift and
    a 30% larger variance do not (n = 10^6, so sampling error is far below both)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1_000_000, 1)) + 10.0
    reference = Moments.from_samples(base)

    def shifted(shift: float, scale: float) -> Moments:
        other = rng.standard_normal((1_000_000, 1)) * scale + 10.0 + shift
        return Moments.from_samples(other)

    close = shifted(0.01 * 11, np.sqrt(1.10))  # 1% of |mean| + sd = 11
    assert mean_z_test(close, reference, 1e-4, margin=FP16_MEAN_MARGIN).passed
    assert variance_ratio_test(close, reference, 1e-4, margin=FP16_VARIANCE_MARGIN).passed
    assert not mean_z_test(close, reference, 1e-4).passed  # without the margin: a real shift
    far = shifted(0.05 * 11, np.sqrt(1.30))
    assert not mean_z_test(far, reference, 1e-4, margin=FP16_MEAN_MARGIN).passed
    assert not variance_ratio_test(far, reference, 1e-4, margin=FP16_VARIANCE_MARGIN).passed


def test_bfloat16_is_refused_with_the_reason(tmp_path: Path) -> None:
    entry = zoo.ZOO["two_head"]
    with pytest.raises(ExportArgumentError, match="precision must be one of"):
        export_model(entry.build(), entry.example_inputs(), repository=tmp_path, name="m",
                     precision="bf16", **entry.export_args)  # type: ignore[arg-type]  # fmt: skip
