"""The load-time split at the first stochastic node, on hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.engine.graph_split import NUM_SAMPLES_INPUT, plan_split, split_models, tiled_model
from service.engine.onnx_session import SessionConfig, create_session

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((4, 8)).astype(np.float32)
W2 = RNG.standard_normal((8, 3)).astype(np.float32)


def _model(
    nodes: list[onnx.NodeProto],
    outputs: list[onnx.ValueInfoProto],
    extra_init: list[onnx.TensorProto] | None = None,
) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    init = [
        numpy_helper.from_array(W1, "w1"),
        numpy_helper.from_array(W2, "w2"),
        numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
        numpy_helper.from_array(np.array(True), "training"),
        *(extra_init or []),
    ]
    graph = helper.make_graph(nodes, "g", [x], outputs, initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def head_graph() -> onnx.ModelProto:
    """x -> MatMul -> Relu -> Dropout -> MatMul -> y: the prefix is MatMul + Relu."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Dropout", ["r", "ratio", "training"], ["d"]),
            helper.make_node("MatMul", ["d", "w2"], ["y"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )


def shape_graph() -> onnx.ModelProto:
    """The suffix reshapes with a shape computed from the UNTILED prefix tensor: the Shape /
    Gather / Concat nodes must move into the suffix and run on the tiled tensor."""
    return _model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Shape", ["r"], ["r_shape"]),
            helper.make_node("Gather", ["r_shape", "zero"], ["b"], axis=0),
            helper.make_node("Concat", ["b", "two_four"], ["new_shape"], axis=0),
            helper.make_node("Dropout", ["r", "ratio", "training"], ["d"]),
            helper.make_node("Reshape", ["d", "new_shape"], ["y"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, 4])],
        [
            numpy_helper.from_array(np.array([0], np.int64), "zero"),
            numpy_helper.from_array(np.array([2, 4], np.int64), "two_four"),
        ],
    )


def test_plan_cuts_after_the_deterministic_prefix() -> None:
    plan = plan_split(head_graph())
    assert plan.is_split
    assert plan.prefix == (0, 1)
    assert plan.suffix == (2, 3)
    assert plan.cut == ("r",)


def test_shape_computations_move_into_the_suffix() -> None:
    plan = plan_split(shape_graph())
    assert plan.is_split
    assert plan.prefix == (0, 1)  # MatMul, Relu run once
    assert set(plan.suffix) == {2, 3, 4, 5, 6}  # Shape, Gather, Concat recomputed on the tile
    assert plan.cut == ("r",)


def test_dropout_at_the_input_tiles_the_whole_graph() -> None:
    model = _model(
        [helper.make_node("Dropout", ["x", "ratio", "training"], ["d"]),
         helper.make_node("MatMul", ["d", "w1"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )  # fmt: skip
    plan = plan_split(model)
    assert not plan.is_split
    assert "at the inputs" in plan.reason


def test_dropout_without_training_mode_is_not_stochastic() -> None:
    model = _model(
        [helper.make_node("Dropout", ["x"], ["d"]), helper.make_node("MatMul", ["d", "w1"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )
    assert plan_split(model).reason == "no stochastic node"


def test_control_flow_is_not_split() -> None:
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["o"])], "b", [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    model = _model(
        [helper.make_node("Dropout", ["x", "ratio", "training"], ["d"]),
         helper.make_node("ReduceMax", ["d"], ["m"], keepdims=0),
         helper.make_node("Cast", ["m"], ["c"], to=TensorProto.BOOL),
         helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    assert plan_split(model).reason == "control flow or local functions"


def _run_tiled(model: onnx.ModelProto, x: np.ndarray, t: int) -> np.ndarray:
    plan = plan_split(model)
    session = create_session(
        tiled_model(model, plan).SerializeToString(), SessionConfig(use_gpu=False)
    )
    out: np.ndarray = session.run(None, {"x": x, NUM_SAMPLES_INPUT: np.array([t], np.int64)})[0]
    return out


def _run_two_sessions(model: onnx.ModelProto, x: np.ndarray, t: int) -> np.ndarray:
    plan = plan_split(model)
    prefix, suffix = split_models(model, plan)
    config = SessionConfig(use_gpu=False)
    cut = create_session(prefix.SerializeToString(), config).run(None, {"x": x})[0]
    tiled = np.broadcast_to(cut, (t, *cut.shape)).reshape(t * cut.shape[0], *cut.shape[1:])
    out: np.ndarray = create_session(suffix.SerializeToString(), config).run(None, {"r": tiled})[0]
    return out


@pytest.mark.parametrize("run", [_run_tiled, _run_two_sessions])
@pytest.mark.parametrize("make", [head_graph, shape_graph])
def test_split_forms_compute_the_same_function(run, make) -> None:  # type: ignore[no-untyped-def]
    """Dropout with p = 0.5 keeps an element as 2x or drops it: the split output must be
    either 0 or 2 * the exact deterministic value, row t*B + b coming from input row b."""
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    t = 200
    out = run(make(), x, t)
    relu = np.maximum(x @ W1, 0)  # (B, 8)
    assert out.shape[0] == t * 3
    if make is shape_graph:
        samples = out.reshape(t, 3, 8)
        expected = 2 * relu
        kept = samples != 0
        np.testing.assert_allclose(
            samples[kept], np.broadcast_to(expected, samples.shape)[kept], rtol=1e-5
        )
        # every copy draws its own mask: P(all 200 copies of an element agree) = 2^-199
        kept_fraction = kept.mean(axis=0)[relu > 0]
        assert (kept_fraction > 0).all()
        assert (kept_fraction < 1).all()
    else:
        samples = out.reshape(t, 3, 3)
        # Mean over T samples of d @ W2 has expectation relu @ W2; a 6-sigma band
        # (false-failure probability < 1e-8 per element, 9 elements).
        mean = samples.mean(axis=0)
        se = samples.std(axis=0, ddof=1) / np.sqrt(t)
        assert (np.abs(mean - relu @ W2) < 6 * se).all()


def test_deterministic_outputs_are_tiled_too() -> None:
    model = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Dropout", ["r", "ratio", "training"], ["d"]),
         helper.make_node("MatMul", ["d", "w2"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["batch", 8])],
    )  # fmt: skip
    plan = plan_split(model)
    assert plan.tiled_outputs == ("r",)
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    session = create_session(
        tiled_model(model, plan).SerializeToString(), SessionConfig(use_gpu=False)
    )
    y, r = session.run(None, {"x": x, NUM_SAMPLES_INPUT: np.array([5], np.int64)})
    assert y.shape == (10, 3)
    np.testing.assert_allclose(r, np.tile(np.maximum(x @ W1, 0), (5, 1)), rtol=1e-6)


def test_noise_fed_dropout_keeps_where_the_noise_is_at_least_p() -> None:
    from service.engine.graph_split import noise_fed_model

    model, noise = noise_fed_model(head_graph())
    assert [(n.name, n.row_shape) for n in noise] == [("mcd_noise_0", (8,))]
    session = create_session(model.SerializeToString(), SessionConfig(use_gpu=False))
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    relu = np.maximum(x @ W1, 0)
    u = np.tile(np.array([0.2, 0.7], np.float32), (2, 4))  # p = 0.5: drop, keep, drop, keep...
    (y,) = session.run(None, {"x": x, "mcd_noise_0": u})
    kept = np.where(u >= 0.5, 2.0 * relu, 0.0)  # inverted dropout: kept values scaled 1/(1-p)
    np.testing.assert_allclose(y, kept @ W2, rtol=1e-5)
    (y_again,) = session.run(None, {"x": x, "mcd_noise_0": u})
    np.testing.assert_array_equal(y, y_again)  # no randomness left inside the graph


def test_noise_fed_random_uniform_like_maps_the_noise_to_its_range() -> None:
    from service.engine.graph_split import noise_fed_model

    model = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("RandomUniformLike", ["h"], ["r"], low=2.0, high=6.0),
         helper.make_node("Add", ["h", "r"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )  # fmt: skip
    fed, noise = noise_fed_model(model)
    session = create_session(fed.SerializeToString(), SessionConfig(use_gpu=False))
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    u = np.full((3, 8), 0.25, np.float32)
    (y,) = session.run(None, {"x": x, noise[0].name: u})
    np.testing.assert_allclose(y, x @ W1 + 3.0, rtol=1e-5)  # 2 + 0.25 * (6 - 2)


def test_random_nodes_that_cannot_be_fed_are_refused_with_the_reason() -> None:
    from service.engine.graph_split import NoiseRewriteError, noise_fed_model

    model = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("RandomNormalLike", ["h"], ["r"]),
         helper.make_node("Add", ["h", "r"], ["y"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
    )  # fmt: skip
    with pytest.raises(NoiseRewriteError, match="RandomNormalLike node"):
        noise_fed_model(model)
