"""Static checks on an ONNX graph that must sample like MC dropout in ONNX Runtime.

Pure ``onnx``: usable on any ``onnx.ModelProto``, whoever exported it. Every check walks the
main graph, every subgraph (``If`` branches, ``Loop`` / ``Scan`` bodies, at any depth) and every
model-local function, and names the graph each problem was found in.

What is checked, and why:

* ``opset``: the default-domain opset is within 18..21. At 22 ONNX Runtime 1.31 has no
  RandomUniformLike / Bernoulli kernel; below 18 the exporter's ops differ.
* ``stochastic_nodes``: at least one node draws random numbers (Dropout in training mode,
  RandomUniform(Like), RandomNormal(Like), Multinomial). Without one every sample is equal.
* ``dropout_training_mode``: every Dropout has a ``training_mode`` input that is a constant
  true (initializer or Constant node). Missing or false, ONNX Runtime runs it as identity.
* ``batch_norm_inference``: no BatchNormalization in training mode (``training_mode=1`` or
  running-statistics outputs): it would normalise with the statistics of the tiled batch.
* ``no_bernoulli``: ONNX Runtime's Bernoulli inverts the keep probability (measured).
* ``batch_dimension``: each graph input and output has a dynamic first dimension; other
  dimensions are static, except the input axes declared dynamic (``dynamic_axes``), which
  must be symbolic, and output dimensions derived from them (their symbols name only declared
  axes, so the server can bound them; a data-dependent size is refused), as config.json
  requires.
* ``onnx_checker``: ``onnx.checker.check_model`` (with shape inference) accepts the model.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = [
    "MAX_OPSET",
    "MIN_OPSET",
    "RANDOM_OPS",
    "CheckResult",
    "GraphCheckReport",
    "NodeRef",
    "ScopedNode",
    "check_batch_dimension",
    "check_batch_norm",
    "check_dropout_training_mode",
    "check_graph",
    "check_no_bernoulli",
    "check_onnx_checker",
    "check_opset",
    "check_stochastic_nodes",
    "find_stochastic_nodes",
    "iter_nodes",
]

#: Opsets that both keep dropout through the exporter and load in ONNX Runtime 1.31.
MIN_OPSET = 18
MAX_OPSET = 21

#: Ops that draw random numbers whatever their inputs (Dropout depends on training_mode).
RANDOM_OPS = frozenset(
    {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Multinomial"}
)
_DEFAULT_DOMAINS = ("", "ai.onnx")
_MAIN_GRAPH = "main graph"


@dataclass(frozen=True)
class NodeRef:
    """A node and where it lives.

    Attributes:
        op_type: e.g. "Dropout".
        name: the node name ("" when the node has none).
        graph: "main graph", a subgraph path such as "main graph/node_if_3.then_branch", or
            "function <domain>.<name>".
    """

    op_type: str
    name: str
    graph: str = _MAIN_GRAPH

    def describe(self) -> str:
        """``op_type 'name'`` plus the graph when it is not the main graph."""
        where = "" if self.graph == _MAIN_GRAPH else f" in {self.graph}"
        return f"{self.op_type} {self.name or '<unnamed>'!r}{where}"

    def to_dict(self) -> dict[str, str]:
        """The ``stochastic_nodes[]`` entry of metadata.json."""
        entry = {"op_type": self.op_type, "name": self.name}
        if self.graph != _MAIN_GRAPH:
            entry["graph"] = self.graph
        return entry


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one static check.

    Attributes:
        name: the check, e.g. "dropout_training_mode".
        problems: one readable sentence per problem; empty when the check passed.
        detail: what was looked at, for the report.
    """

    name: str
    problems: tuple[str, ...] = ()
    detail: str = ""

    @property
    def passed(self) -> bool:
        """True when the check found no problem."""
        return not self.problems


@dataclass(frozen=True)
class GraphCheckReport:
    """Every static check on one graph.

    Attributes:
        results: one result per check, in the order they ran.
        stochastic_nodes: the nodes that draw random numbers.
        subgraphs_checked: how many subgraphs (If/Loop/Scan bodies) and functions were walked.
    """

    results: tuple[CheckResult, ...]
    stochastic_nodes: tuple[NodeRef, ...] = field(default=())
    subgraphs_checked: int = 0

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return all(result.passed for result in self.results)

    @property
    def problems(self) -> list[str]:
        """Every problem, prefixed with the name of its check."""
        return [f"{r.name}: {problem}" for r in self.results for problem in r.problems]

    def summary(self) -> str:
        """One line per check, then one indented line per problem."""
        lines = []
        for result in self.results:
            status = "ok  " if result.passed else "FAIL"
            lines.append(f"{status} {result.name}: {result.detail}")
            lines.extend(f"       - {problem}" for problem in result.problems)
        lines.append(
            f"(checked the main graph and {self.subgraphs_checked} subgraphs/local functions)"
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class ScopedNode:
    """A node with where it lives and the constants visible there.

    Attributes:
        node: the node.
        graph: "main graph", a subgraph path, or "function <domain>.<name>".
        constants: initializers and Constant outputs of its graph and every enclosing graph.
    """

    node: onnx.NodeProto
    graph: str
    constants: Mapping[str, np.ndarray]


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, or None for the forms this module does not need."""
    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name in ("value_int", "value_float", "value_ints", "value_floats"):
            return np.asarray(onnx.helper.get_attribute_value(attribute))
    return None


def _graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
            value = _constant_node_value(node)
            if value is not None:
                constants[node.output[0]] = value
    return constants


def _walk_graph(
    graph: onnx.GraphProto, path: str, outer: Mapping[str, np.ndarray]
) -> Iterator[ScopedNode]:
    constants = {**outer, **_graph_constants(graph)}
    for node in graph.node:
        yield ScopedNode(node, path, constants)
        for attribute in node.attribute:
            subgraphs: list[onnx.GraphProto] = []
            if attribute.type == onnx.AttributeProto.GRAPH:
                subgraphs = [attribute.g]
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                subgraphs = list(attribute.graphs)
            for index, subgraph in enumerate(subgraphs):
                suffix = f"[{index}]" if len(subgraphs) > 1 else ""
                sub_path = f"{path}/{node.name or node.op_type}.{attribute.name}{suffix}"
                yield from _walk_graph(subgraph, sub_path, constants)


def iter_nodes(model: onnx.ModelProto) -> Iterator[ScopedNode]:
    """Yield every node of the main graph, its subgraphs (any depth) and local functions.

    Args:
        model: the model.

    Yields:
        Nodes with the graph they live in and the constants visible there.
    """
    yield from _walk_graph(model.graph, _MAIN_GRAPH, {})
    for function in model.functions:
        path = f"function {function.domain}.{function.name}"
        constants: dict[str, np.ndarray] = {}
        for node in function.node:
            if node.op_type == "Constant" and node.output:
                value = _constant_node_value(node)
                if value is not None:
                    constants[node.output[0]] = value
        for node in function.node:
            yield ScopedNode(node, path, constants)


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield attribute.g
                yield from _subgraphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield subgraph
                    yield from _subgraphs(subgraph)


def _count_subgraphs(model: onnx.ModelProto) -> int:
    return sum(1 for _ in _subgraphs(model.graph)) + len(model.functions)


def _ref(scoped: ScopedNode) -> NodeRef:
    return NodeRef(scoped.node.op_type, scoped.node.name, scoped.graph)


def _is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in _DEFAULT_DOMAINS


def _constant_bool(scoped: ScopedNode, input_name: str) -> bool | None:
    """The truth value of a constant scalar input, or None when it is not a known constant."""
    value = scoped.constants.get(input_name)
    if value is None or value.size != 1:
        return None
    return bool(value.reshape(()).item())


def _dropout_state(scoped: ScopedNode) -> tuple[bool, str | None]:
    """Whether a Dropout node samples, and the problem with it if it does not."""
    node = scoped.node
    described = _ref(scoped).describe()
    if len(node.input) < 3 or not node.input[2]:
        return False, (
            f"{described} has no training_mode input: ONNX Runtime will run it as identity"
        )
    training = _constant_bool(scoped, node.input[2])
    if training is None:
        return False, (
            f"{described}: training_mode {node.input[2]!r} is not a constant (initializer or "
            "Constant node), so it cannot be shown to be true"
        )
    if not training:
        return False, (f"{described} has training_mode false: ONNX Runtime will run it as identity")
    if len(node.input) >= 2 and node.input[1]:
        ratio = scoped.constants.get(node.input[1])
        if ratio is not None and ratio.size == 1 and float(ratio.reshape(()).item()) == 0.0:
            # ratio 0 is a no-op, not a problem: it just does not count as randomness.
            return False, None
    return True, None


def find_stochastic_nodes(model: onnx.ModelProto) -> list[NodeRef]:
    """Every node that draws random numbers, subgraphs and functions included.

    Dropout counts only with a constant true ``training_mode`` and a nonzero ratio; Bernoulli
    counts (it is random) although ``check_no_bernoulli`` rejects it.

    Args:
        model: the model.

    Returns:
        The stochastic nodes in graph order.
    """
    found = []
    for scoped in iter_nodes(model):
        node = scoped.node
        if not _is_default_domain(node):
            continue
        if node.op_type == "Dropout":
            if _dropout_state(scoped)[0]:
                found.append(_ref(scoped))
        elif node.op_type in RANDOM_OPS or node.op_type == "Bernoulli":
            found.append(_ref(scoped))
    return found


def check_opset(
    model: onnx.ModelProto, min_opset: int = MIN_OPSET, max_opset: int = MAX_OPSET
) -> CheckResult:
    """The default-domain opset is within ``min_opset..max_opset``."""
    name = "opset"
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions:
        return CheckResult(name, ("the model imports no default-domain (ai.onnx) opset",))
    opset = versions[0]
    detail = f"opset {opset}, allowed {min_opset}..{max_opset}"
    if not min_opset <= opset <= max_opset:
        return CheckResult(
            name,
            (
                f"opset {opset} is outside {min_opset}..{max_opset}: at 22 and above ONNX "
                "Runtime 1.31 has no RandomUniformLike/Bernoulli kernel",
            ),
            detail,
        )
    return CheckResult(name, (), detail)


def check_stochastic_nodes(model: onnx.ModelProto) -> CheckResult:
    """At least one node draws random numbers."""
    nodes = find_stochastic_nodes(model)
    if not nodes:
        return CheckResult(
            "stochastic_nodes",
            (
                "no stochastic node (Dropout with training_mode true, RandomUniform(Like), "
                "RandomNormal(Like), Multinomial): every MC sample would be identical",
            ),
            "0 stochastic nodes",
        )
    kinds = sorted({n.op_type for n in nodes})
    return CheckResult(
        "stochastic_nodes", (), f"{len(nodes)} stochastic nodes ({', '.join(kinds)})"
    )


def check_dropout_training_mode(model: onnx.ModelProto) -> CheckResult:
    """Every Dropout has a ``training_mode`` input that is a constant true."""
    problems = []
    count = 0
    for scoped in iter_nodes(model):
        if scoped.node.op_type == "Dropout" and _is_default_domain(scoped.node):
            count += 1
            problem = _dropout_state(scoped)[1]
            if problem is not None:
                problems.append(problem)
    return CheckResult("dropout_training_mode", tuple(problems), f"{count} Dropout nodes")


def check_batch_norm(model: onnx.ModelProto) -> CheckResult:
    """No BatchNormalization runs in training mode (batch statistics of the tiled batch)."""
    problems = []
    count = 0
    for scoped in iter_nodes(model):
        node = scoped.node
        if node.op_type != "BatchNormalization" or not _is_default_domain(node):
            continue
        count += 1
        training = any(a.name == "training_mode" and a.i != 0 for a in node.attribute)
        running_outputs = len([o for o in node.output[1:] if o])
        if training or running_outputs:
            problems.append(
                f"{_ref(scoped).describe()} is in training mode: it would normalise with the "
                "statistics of the batch (of tiled samples) instead of the running statistics"
            )
    return CheckResult("batch_norm_inference", tuple(problems), f"{count} BatchNormalization nodes")


def check_no_bernoulli(model: onnx.ModelProto) -> CheckResult:
    """No Bernoulli node: ONNX Runtime inverts its keep probability (p=0.8 gave mean 0.2)."""
    problems = [
        f"{_ref(s).describe()}: ONNX Runtime's Bernoulli inverts the probability; build masks "
        "with nn.Dropout or rand_like(x) < p instead of torch.bernoulli"
        for s in iter_nodes(model)
        if s.node.op_type == "Bernoulli" and _is_default_domain(s.node)
    ]
    return CheckResult("no_bernoulli", tuple(problems), f"{len(problems)} Bernoulli nodes")


_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Functions the exporter writes into symbolic dimension expressions (sympy printing), e.g.
# "floor(sequence/2)": not dimension names.
_DIM_FUNCTIONS = frozenset(
    {"floor", "ceiling", "Max", "Min", "Mod", "FloorDiv", "CeilToInt", "FloorToInt", "Abs"}
)


def _dims_problems(
    kind: str,
    value: onnx.ValueInfoProto,
    dynamic: Collection[int],
    symbols: Collection[str],
) -> list[str]:
    """Problems with one input's or output's dimensions.

    Args:
        kind: "input" or "output".
        value: the graph input or output.
        dynamic: inputs: the axes declared dynamic (besides 0).
        symbols: outputs: the dimension names of the declared dynamic input axes; an output
            dimension may be symbolic when its expression names only these (and the batch).
    """
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
        return [f"{kind} {value.name!r} has no tensor shape"]
    dims = tensor_type.shape.dim
    if not dims:
        return [f"{kind} {value.name!r} is a scalar: the first dimension must be the batch"]
    problems = []
    if dims[0].HasField("dim_value"):
        problems.append(
            f"{kind} {value.name!r} has a fixed first dimension {dims[0].dim_value}: it must "
            "be the dynamic batch dimension"
        )
    static_declared = sorted(a for a in dynamic if a < len(dims) and dims[a].HasField("dim_value"))
    if static_declared:
        problems.append(
            f"{kind} {value.name!r} has static dimensions {static_declared} that were declared "
            "dynamic: the exporter specialised them"
        )
    undeclared: list[int] = []
    for i, d in enumerate(dims):
        if i == 0 or d.HasField("dim_value") or i in dynamic:
            continue
        names = set(_SYMBOL.findall(d.dim_param)) - _DIM_FUNCTIONS
        if not names or not names <= set(symbols):
            undeclared.append(i)
    if undeclared:
        params = ", ".join(dims[i].dim_param or "?" for i in undeclared)
        problems.append(
            f"{kind} {value.name!r} has dynamic dimensions {undeclared} ({params}): only the "
            "first (batch) dimension, input axes declared dynamic and output dimensions derived "
            "from them may be dynamic"
        )
    return problems


def _input_axis_symbols(
    inputs: Collection[onnx.ValueInfoProto], dynamic_axes: Mapping[str, Collection[int]]
) -> set[str]:
    symbols: set[str] = set()
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        symbols.update(
            dims[axis].dim_param
            for axis in dynamic_axes.get(value.name, ())
            if axis < len(dims) and dims[axis].dim_param
        )
    if symbols:
        symbols.update(dims[0].dim_param for v in inputs if (dims := v.type.tensor_type.shape.dim))
    return symbols


def check_batch_dimension(
    model: onnx.ModelProto, dynamic_axes: Mapping[str, Collection[int]] | None = None
) -> CheckResult:
    """Inputs and outputs have a dynamic first dimension and static other dimensions.

    Args:
        model: the graph.
        dynamic_axes: input name -> the non-batch axes declared dynamic; they must be
            symbolic in the graph. Output dimensions may then be symbolic too when their
            symbols name only those axes (and the batch).

    Returns:
        The result.
    """
    dynamic_axes = dynamic_axes or {}
    initializers = {init.name for init in model.graph.initializer}
    problems = []
    inputs = [v for v in model.graph.input if v.name not in initializers]
    unknown = sorted(set(dynamic_axes) - {v.name for v in inputs})
    if unknown:
        problems.append(f"dynamic axes declared for unknown inputs {unknown}")
    symbols = _input_axis_symbols(inputs, dynamic_axes)
    for value in inputs:
        problems.extend(_dims_problems("input", value, dynamic_axes.get(value.name, ()), ()))
    for value in model.graph.output:
        problems.extend(_dims_problems("output", value, (), symbols))
    declared = sum(len(axes) for axes in dynamic_axes.values())
    detail = f"{len(inputs)} inputs, {len(model.graph.output)} outputs"
    if declared:
        detail += f", {declared} declared dynamic non-batch axes"
    return CheckResult("batch_dimension", tuple(problems), detail)


def check_onnx_checker(model: onnx.ModelProto) -> CheckResult:
    """``onnx.checker.check_model`` with strict shape inference accepts the model."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        return CheckResult("onnx_checker", (first_line,), "onnx.checker.check_model")
    return CheckResult("onnx_checker", (), "onnx.checker.check_model(full_check=True)")


def check_graph(
    model: onnx.ModelProto,
    *,
    min_opset: int = MIN_OPSET,
    max_opset: int = MAX_OPSET,
    dynamic_axes: Mapping[str, Collection[int]] | None = None,
) -> GraphCheckReport:
    """Run every static check on ``model``.

    Args:
        model: any ONNX model.
        min_opset: the lowest default-domain opset accepted.
        max_opset: the highest default-domain opset accepted.
        dynamic_axes: input name -> its non-batch axes declared dynamic (see
            ``check_batch_dimension``); None when only the batch axis may be dynamic.

    Returns:
        The report; ``report.passed`` is False when any check found a problem.
    """
    results = (
        check_opset(model, min_opset, max_opset),
        check_stochastic_nodes(model),
        check_dropout_training_mode(model),
        check_batch_norm(model),
        check_no_bernoulli(model),
        check_batch_dimension(model, dynamic_axes),
        check_onnx_checker(model),
    )
    return GraphCheckReport(
        results=results,
        stochastic_nodes=tuple(find_stochastic_nodes(model)),
        subgraphs_checked=_count_subgraphs(model),
    )
