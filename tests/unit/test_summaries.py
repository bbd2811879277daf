"""Statistics computed next to the samples (service.engine.summaries, merged by
service.maths.summaries) against the float64 reference of service.maths.uncertainty, on the
very samples of the same run (requests that keep their samples get both).

Stated accuracy (docstring of service.engine.summaries): class statistics are summed in float32
inside a chunk and merged in float64; values in float64 throughout. The tolerances below are
about 10x the largest errors measured; the Monte Carlo error of these statistics at these T is
at least 1e-3, so none of this shows in an answer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.onnx_session import SessionConfig
from service.engine.runtime import McEngine
from service.maths.predictive import AleatoricAccumulator
from service.maths.uncertainty import (
    ClassificationAccumulator,
    ClassificationStats,
    RegressionAccumulator,
    RegressionStats,
)
from service.repository import parse_config

RNG = np.random.default_rng(5)
CPU = SessionConfig(use_gpu=False)


def head_model(
    out_dims: list[int], extra: list[tuple[str, list[int]]] = (), offset: float = 0.0
) -> onnx.ModelProto:
    """x (B, 6) -> Linear -> Relu -> Dropout(0.3) -> Linear -> outputs; outputs of rank > 2
    are reshaped from the flat head ((B, 4, 5) from 20 values). ``offset`` is added to the
    first output (values far from zero)."""
    total = int(np.prod(out_dims))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Dropout", ["r", "ratio", "training"], ["d"]),
        helper.make_node("MatMul", ["d", "w2"], ["flat"]),
        helper.make_node("Add", ["flat", "offset"], ["shifted"]),
        helper.make_node("Reshape", ["shifted", "shape"], ["y"]),
    ]
    init = [
        numpy_helper.from_array(RNG.standard_normal((6, 16)).astype(np.float32), "w1"),
        numpy_helper.from_array(RNG.standard_normal((16, total)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(0.3, np.float32), "ratio"),
        numpy_helper.from_array(np.array(True), "training"),
        numpy_helper.from_array(np.array(offset, np.float32), "offset"),
        numpy_helper.from_array(np.array([-1, *out_dims], np.int64), "shape"),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", *out_dims])]
    for name, dims in extra:  # a second head on the same features
        size = int(np.prod(dims))
        init.append(numpy_helper.from_array(
            RNG.standard_normal((16, size)).astype(np.float32) * 0.3, f"w_{name}"))  # fmt: skip
        nodes.append(helper.make_node("MatMul", ["d", f"w_{name}"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *dims]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])
    graph = helper.make_graph(nodes, "g", [x], outputs, initializer=init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def engine(model: onnx.ModelProto, outputs: list[dict[str, Any]], budget: int) -> McEngine:
    config = parse_config(
        {"task": "classification"
         if outputs[0].get("semantics") in ("logits", "probabilities") else "regression",
         "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 6]}], "outputs": outputs},
        "m",
    )  # fmt: skip
    return McEngine(model, config, "m/1", session_config=CPU, tile_memory_bytes=budget)


def check_classes(stats: ClassificationStats, reference: ClassificationStats) -> None:
    np.testing.assert_allclose(stats.mean, reference.mean, rtol=0, atol=2e-6)
    np.testing.assert_allclose(stats.variance, reference.variance, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(stats.expected_entropy, reference.expected_entropy, atol=2e-5)
    np.testing.assert_allclose(stats.predictive_entropy, reference.predictive_entropy, atol=2e-5)
    np.testing.assert_allclose(stats.mutual_information, reference.mutual_information, atol=4e-5)
    np.testing.assert_array_equal(stats.vote_counts, reference.vote_counts)
    np.testing.assert_array_equal(stats.predicted_class, reference.predicted_class)
    np.testing.assert_allclose(stats.variation_ratio, reference.variation_ratio, atol=1e-12)


def check_values(stats: RegressionStats, reference: RegressionStats) -> None:
    np.testing.assert_allclose(stats.mean, reference.mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(stats.variance, reference.variance, rtol=1e-9, atol=0)


# budget: one chunk (large) or many small chunks (a few hundred bytes: chunks of 1-3 samples)
@pytest.mark.parametrize("budget", [2**26, 3000], ids=["one-chunk", "many-chunks"])
@pytest.mark.parametrize("semantics", ["logits", "probabilities"])
def test_class_statistics_match_the_float64_reference(semantics: str, budget: int) -> None:
    model = head_model([10])
    if semantics == "probabilities":  # softmax inside the graph, as a model would end
        model.graph.node.append(helper.make_node("Softmax", ["y"], ["p"], axis=-1))
        model.graph.output[0].name = "p"
    name = model.graph.output[0].name
    e = engine(model, [{"name": name, "dtype": "float32", "shape": [-1, 10],
                        "semantics": semantics}], budget)  # fmt: skip
    x = RNG.standard_normal((5, 6)).astype(np.float32)
    (stats,) = e.run({"x": x}, 300, keep_samples=True)
    assert isinstance(stats, ClassificationStats)
    assert stats.samples is not None
    assert stats.samples.shape == (5, 300, 10)
    reference = ClassificationAccumulator(from_logits=False)
    reference.update(np.moveaxis(stats.samples, 1, 0))
    check_classes(stats, reference.result())
    assert stats.num_samples == 300


def test_class_axis_last_with_positions_before_it() -> None:
    """A token-level classifier: (B, 4, 5) logits, classes on the last axis. (config.json
    cannot declare such an output yet: the config is built by hand.)"""
    flat = parse_config(
        {"task": "classification", "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 6]}],
         "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 20], "semantics": "logits"}]},
        "m",
    )  # fmt: skip
    config = dataclasses.replace(
        flat, outputs=(dataclasses.replace(flat.outputs[0], shape=(-1, 4, 5)),)
    )
    e = McEngine(head_model([4, 5]), config, "m/1", session_config=CPU, tile_memory_bytes=4000)
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    (stats,) = e.run({"x": x}, 200, keep_samples=True)
    assert isinstance(stats, ClassificationStats)
    assert stats.samples is not None
    assert stats.mean.shape == (3, 4, 5)
    assert stats.predictive_entropy.shape == (3, 4)
    reference = ClassificationAccumulator(from_logits=False)
    reference.update(np.moveaxis(stats.samples, 1, 0))
    check_classes(stats, reference.result())


@pytest.mark.parametrize("offset", [0.0, 1e6])
@pytest.mark.parametrize("budget", [2**26, 2000], ids=["one-chunk", "many-chunks"])
def test_value_statistics_match_the_float64_reference(offset: float, budget: int) -> None:
    """Values far from zero (1e6 + spread ~1) keep their variance: every chunk is shifted by
    its first sample and merged around the first chunk's shift."""
    e = engine(head_model([3], offset=offset), [{"name": "y", "dtype": "float32",
                                                 "shape": [-1, 3]}], budget)  # fmt: skip
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    (stats,) = e.run({"x": x}, 250, keep_samples=True)
    assert isinstance(stats, RegressionStats)
    assert stats.samples is not None
    reference = RegressionAccumulator()
    reference.update(np.moveaxis(stats.samples, 1, 0))
    check_values(stats, reference.result())


@pytest.mark.parametrize("semantics", ["variance", "log_variance"])
def test_aleatoric_variance_is_the_mean_predicted_variance(semantics: str) -> None:
    model = head_model([2], extra=[("noise", [2])])
    if semantics == "variance":  # a variance head must be non-negative: square it
        model.graph.node.append(helper.make_node("Mul", ["noise", "noise"], ["noise_sq"]))
        model.graph.output[1].name = "noise_sq"
    noise_name = model.graph.output[1].name
    e = engine(model, [
        {"name": "y", "dtype": "float32", "shape": [-1, 2]},
        {"name": noise_name, "dtype": "float32", "shape": [-1, 2], "semantics": semantics,
         "of": "y"},
    ], 3000)  # fmt: skip
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    values, noise = e.run({"x": x}, 200, keep_samples=True)
    assert isinstance(values, RegressionStats)
    assert values.aleatoric_variance is not None
    assert noise.samples is not None
    predicted = noise.samples if semantics == "variance" else np.exp(noise.samples)
    reference = AleatoricAccumulator()
    reference.update(np.moveaxis(predicted, 1, 0))
    np.testing.assert_allclose(values.aleatoric_variance, reference.result(), rtol=1e-12)
    assert values.total_variance is not None
    np.testing.assert_allclose(values.total_variance, values.variance + reference.result(),
                               rtol=1e-12)  # fmt: skip


def test_a_row_with_non_finite_outputs_fails_alone() -> None:
    """A huge input overflows the head to inf: that row's statistics are NaN, the other rows'
    are those of the same rows run without it (seeded, so the noise is the same)."""
    e = engine(head_model([10]), [{"name": "y", "dtype": "float32", "shape": [-1, 10],
                                   "semantics": "logits"}], 2**26)  # fmt: skip
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    poisoned = x.copy()
    poisoned[1] = 3e38
    (stats,) = e.run({"x": poisoned}, 50, seed=3)
    (alone,) = e.run({"x": x[[0, 2]]}, 50, seed=3)
    assert np.isnan(stats.mean[1]).all()
    np.testing.assert_array_equal(stats.mean[[0, 2]], alone.mean)


def test_negative_probabilities_fail_their_row() -> None:
    """A "probabilities" output that is not a distribution (here raw head values) fails the
    rows where a value is negative instead of the whole batch."""
    e = engine(head_model([10]), [{"name": "y", "dtype": "float32", "shape": [-1, 10],
                                   "semantics": "probabilities"}], 2**26)  # fmt: skip
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    (stats,) = e.run({"x": x}, 20)
    assert np.isnan(stats.mean).any(axis=1).all()  # random weights: every row has negatives
