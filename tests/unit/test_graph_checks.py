"""Static graph checks (export/checks.py) on graphs built by hand with onnx.helper.

Each failure the checks must catch is built on purpose; a correct graph passes them all.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.checks import (
    check_batch_dimension,
    check_batch_norm,
    check_dropout_training_mode,
    check_graph,
    check_no_bernoulli,
    check_onnx_checker,
    check_opset,
    check_stochastic_nodes,
    find_stochastic_nodes,
)

WIDTH = 4


def _tensor(name: str, value: object, dtype: type = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=dtype), name)


def _model(
    nodes: Sequence[onnx.NodeProto],
    initializers: Sequence[TensorProto] = (),
    *,
    opset: int = 18,
    input_shape: Sequence[int | str] = ("batch", WIDTH),
    output_shape: Sequence[int | str] = ("batch", WIDTH),
    extra_inputs: Sequence[onnx.ValueInfoProto] = (),
) -> onnx.ModelProto:
    """A graph X (batch, 4) -> nodes -> Y (batch, 4)."""
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(input_shape)), *extra_inputs],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(output_shape))],
        initializer=list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _dropout_model(training_mode: bool = True) -> onnx.ModelProto:
    """X -> Dropout(ratio 0.5, training_mode initializer) -> Y, as the dynamo exporter writes."""
    return _model(
        [helper.make_node("Dropout", ["X", "ratio", "training"], ["Y"], name="drop")],
        [_tensor("ratio", 0.5), _tensor("training", training_mode, np.bool_)],
    )


def _uniform_mask_model() -> onnx.ModelProto:
    """Dropout2d as the exporter writes it: RandomUniformLike -> Less -> Cast -> Div -> Mul."""
    return _model(
        [
            helper.make_node("RandomUniformLike", ["X"], ["u"], name="rand"),
            helper.make_node("Less", ["u", "keep"], ["mask_bool"]),
            helper.make_node("Cast", ["mask_bool"], ["mask"], to=TensorProto.FLOAT),
            helper.make_node("Div", ["mask", "keep"], ["scaled"]),
            helper.make_node("Mul", ["X", "scaled"], ["Y"]),
        ],
        [_tensor("keep", 0.7)],
    )


def _problems(model: onnx.ModelProto, check: str) -> tuple[str, ...]:
    report = check_graph(model)
    return next(r.problems for r in report.results if r.name == check)


@pytest.mark.parametrize(
    "model", [_dropout_model(), _uniform_mask_model()], ids=["dropout", "uniform"]
)
def test_correct_graphs_pass_every_check(model: onnx.ModelProto) -> None:
    report = check_graph(model)
    assert report.passed, report.summary()
    assert report.problems == []
    assert len(report.stochastic_nodes) == 1


def test_stochastic_nodes_are_named() -> None:
    nodes = find_stochastic_nodes(_dropout_model())
    assert [(n.op_type, n.name) for n in nodes] == [("Dropout", "drop")]
    assert nodes[0].to_dict() == {"op_type": "Dropout", "name": "drop"}


def test_eliminated_dropout_leaves_no_stochastic_node() -> None:
    # What ONNX Runtime's EliminateDropout (or a plain eval() export) leaves behind.
    model = _model([helper.make_node("Identity", ["X"], ["Y"])])
    result = check_stochastic_nodes(model)
    assert not result.passed
    assert "no stochastic node" in result.problems[0]
    assert not check_graph(model).passed


def test_dropout_with_training_mode_false_is_reported() -> None:
    model = _dropout_model(training_mode=False)
    result = check_dropout_training_mode(model)
    assert len(result.problems) == 1
    assert "'drop'" in result.problems[0]
    assert "training_mode false" in result.problems[0]
    assert "identity" in result.problems[0]
    assert find_stochastic_nodes(model) == []
    assert not check_stochastic_nodes(model).passed


@pytest.mark.parametrize("inputs", [["X"], ["X", "ratio"], ["X", "ratio", ""]])
def test_dropout_without_training_mode_is_reported(inputs: list[str]) -> None:
    model = _model(
        [helper.make_node("Dropout", inputs, ["Y"], name="drop")], [_tensor("ratio", 0.5)]
    )
    problems = check_dropout_training_mode(model).problems
    assert len(problems) == 1
    assert "no training_mode input" in problems[0]
    assert "identity" in problems[0]


def test_training_mode_from_a_constant_node_counts() -> None:
    model = _model(
        [
            helper.make_node(
                "Constant", [], ["training"], value=_tensor("t", True, np.bool_), name="const"
            ),
            helper.make_node("Dropout", ["X", "ratio", "training"], ["Y"], name="drop"),
        ],
        [_tensor("ratio", 0.5)],
    )
    assert check_graph(model).passed, check_graph(model).summary()


def test_training_mode_fed_by_a_graph_input_is_not_trusted() -> None:
    model = _model(
        [helper.make_node("Dropout", ["X", "ratio", "training"], ["Y"], name="drop")],
        [_tensor("ratio", 0.5)],
        extra_inputs=[helper.make_tensor_value_info("training", TensorProto.BOOL, [])],
    )
    problems = check_dropout_training_mode(model).problems
    assert len(problems) == 1
    assert "not a constant" in problems[0]


def test_batch_norm_in_training_mode_is_reported() -> None:
    def model(training_mode: int) -> onnx.ModelProto:
        params = [_tensor(n, np.ones(WIDTH)) for n in ("scale", "bias", "mean", "var")]
        return _model(
            [
                helper.make_node(
                    "BatchNormalization",
                    ["X", "scale", "bias", "mean", "var"],
                    ["h"],
                    name="bn",
                    training_mode=training_mode,
                ),
                helper.make_node("Dropout", ["h", "ratio", "training"], ["Y"], name="drop"),
            ],
            [*params, _tensor("ratio", 0.5), _tensor("training", True, np.bool_)],
        )

    assert check_batch_norm(model(0)).passed
    problems = check_batch_norm(model(1)).problems
    assert len(problems) == 1
    assert "'bn'" in problems[0]
    assert "training mode" in problems[0]
    assert not check_graph(model(1)).passed


def test_bernoulli_mask_is_reported() -> None:
    model = _model(
        [
            helper.make_node("RandomUniformLike", ["X"], ["u"]),
            helper.make_node("Bernoulli", ["u"], ["mask"], name="bern"),
            helper.make_node("Mul", ["X", "mask"], ["Y"]),
        ]
    )
    result = check_no_bernoulli(model)
    assert len(result.problems) == 1
    assert "'bern'" in result.problems[0]
    assert "inverts" in result.problems[0]
    report = check_graph(model)
    assert not report.passed
    assert [r.name for r in report.results if not r.passed] == ["no_bernoulli"]


@pytest.mark.parametrize(("opset", "ok"), [(17, False), (18, True), (21, True), (22, False)])
def test_opset_range(opset: int, ok: bool) -> None:
    model = _model([helper.make_node("RandomUniformLike", ["X"], ["Y"])], opset=opset)
    result = check_opset(model)
    assert result.passed is ok
    if not ok:
        assert f"opset {opset} is outside 18..21" in result.problems[0]


def test_opset_22_fails_the_whole_report() -> None:
    model = _model([helper.make_node("RandomUniformLike", ["X"], ["Y"])], opset=22)
    report = check_graph(model)
    assert [r.name for r in report.results if not r.passed] == ["opset"]


@pytest.mark.parametrize(
    ("input_shape", "message"),
    [((1, WIDTH), "fixed first dimension 1"), (("batch", "width"), "dynamic dimensions [1]")],
)
def test_batch_dimension_must_be_first_and_only_dynamic(
    input_shape: tuple[int | str, ...], message: str
) -> None:
    model = _model([helper.make_node("RandomUniformLike", ["X"], ["Y"])], input_shape=input_shape)
    problems = check_batch_dimension(model).problems
    assert len(problems) == 1
    assert message in problems[0]
    assert "'X'" in problems[0]


def test_static_output_batch_is_reported() -> None:
    model = _model([helper.make_node("RandomUniformLike", ["X"], ["Y"])], output_shape=(8, WIDTH))
    problems = check_batch_dimension(model).problems
    assert problems == (
        "output 'Y' has a fixed first dimension 8: it must be the dynamic batch dimension",
    )


def _if_model(branch_training_mode: bool) -> onnx.ModelProto:
    """The only Dropout sits in an If branch and reads its constants from the outer graph."""
    then_graph = helper.make_graph(
        [helper.make_node("Dropout", ["X", "ratio", "training"], ["t_out"], name="inner_drop")],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["batch", WIDTH])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["batch", WIDTH])],
    )
    return _model(
        [
            helper.make_node(
                "If", ["cond"], ["Y"], name="branch", then_branch=then_graph, else_branch=else_graph
            )
        ],
        [
            _tensor("cond", True, np.bool_),
            _tensor("ratio", 0.5),
            _tensor("training", branch_training_mode, np.bool_),
        ],
    )


def test_checks_look_inside_subgraphs() -> None:
    good = check_graph(_if_model(True))
    assert good.passed, good.summary()
    assert good.subgraphs_checked == 2
    assert [(n.op_type, n.name) for n in good.stochastic_nodes] == [("Dropout", "inner_drop")]
    assert "branch.then_branch" in good.stochastic_nodes[0].graph

    bad = check_dropout_training_mode(_if_model(False)).problems
    assert len(bad) == 1
    assert "'inner_drop'" in bad[0]
    assert "branch.then_branch" in bad[0]


def test_onnx_checker_rejects_a_dangling_input() -> None:
    model = _model([helper.make_node("Add", ["X", "missing"], ["Y"])])
    result = check_onnx_checker(model)
    assert not result.passed
    assert "missing" in result.problems[0]


def test_summary_names_failed_checks_and_problems() -> None:
    summary = check_graph(_dropout_model(training_mode=False)).summary()
    assert "FAIL dropout_training_mode" in summary
    assert "FAIL stochastic_nodes" in summary
    assert "ok   opset" in summary
