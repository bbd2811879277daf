"""The load-time split at the first stochastic node, on hand-built graphs (the graphs built
from the plan are tested in tests/unit/test_sampler.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.engine.graph_split import plan_split

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


def weight_derived_graph() -> onnx.ModelProto:
    """The LSTM case: the suffix uses a tensor computed from weights only (here w2 transposed
    twice) whose nodes sit upstream of the cut."""
    return _model(
        [
            helper.make_node("Transpose", ["w2"], ["w2_t"], perm=[1, 0]),
            helper.make_node("Transpose", ["w2_t"], ["w2_back"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Dropout", ["r", "ratio", "training"], ["d"]),
            helper.make_node("MatMul", ["d", "w2_back"], ["y"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )


def test_weight_derived_tensors_of_the_suffix_are_constant_nodes() -> None:
    plan = plan_split(weight_derived_graph())
    assert plan.is_split
    assert plan.cut == ("r",)  # only input-dependent tensors are tiled
    assert plan.constant_nodes == (0, 1)  # both Transposes, which the suffix needs
