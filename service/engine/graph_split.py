"""Load-time graph surgery: run the deterministic prefix once, tile only the stochastic suffix.

Everything upstream of the first stochastic node does not depend on the dropout masks, so for
a request of B rows and T samples it can run once on [B, ...]; only the suffix needs the
[T*B, ...] tile. The plan:

1. S, the stochastic region: the stochastic nodes (Dropout with a training_mode input,
   RandomUniform/Normal(Like), Multinomial, Bernoulli) and everything downstream of them.
2. The cut: tensors consumed by S but produced outside it. A cut tensor that does not depend
   on the graph inputs (weights, constants) is used as it is. One that depends on the inputs
   and has the batch dimension first is tiled. Any other (a shape computed from the untiled
   batch, say ``Shape -> Gather -> Concat`` feeding a Reshape) would carry B where the suffix
   needs T*B: its producer is pulled into S, to be recomputed on the tiled tensors, and the
   cut is taken again until every input-dependent cut tensor is batch-first.
3. Graph outputs produced outside S (deterministic outputs) are tiled as well, so every
   output has T*B rows.

Two executable forms of the same plan: :func:`tiled_model` (one graph, a ``Tile`` node at
each cut tensor, T fed as the extra input ``mcd_num_samples``) and :func:`split_models` (a
prefix graph whose outputs are the cut tensors, and a suffix graph that takes them tiled).

Graphs with control flow (If/Loop/Scan bodies) or local functions are not split: the plan
falls back to tiling the inputs (the whole graph runs on the tile), which is always correct.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

__all__ = [
    "NUM_SAMPLES_INPUT",
    "STOCHASTIC_OPS",
    "SplitPlan",
    "plan_split",
    "split_models",
    "tiled_model",
]

log = logging.getLogger(__name__)

#: The extra input of :func:`tiled_model`: T for this run, int64, shape [1].
NUM_SAMPLES_INPUT = "mcd_num_samples"
STOCHASTIC_OPS = frozenset(
    {"Dropout", "RandomUniformLike", "RandomNormalLike", "RandomUniform", "RandomNormal",
     "Multinomial", "Bernoulli"}
)  # fmt: skip
_TILED_SUFFIX = "__mcd_tiled"
_ONCE_SUFFIX = "__mcd_once"


@dataclass(frozen=True)
class SplitPlan:
    """Where the graph is cut.

    Attributes:
        suffix: indices (in graph order) of the nodes that run on the [T*B, ...] tile.
        prefix: indices of the nodes that run once on [B, ...].
        cut: input-dependent, batch-first tensors to tile (graph inputs among them when the
            stochastic region reaches an input directly).
        tiled_outputs: graph outputs produced by the prefix, tiled before leaving the graph.
        reason: why the graph was not split, when it was not.
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    cut: tuple[str, ...]
    tiled_outputs: tuple[str, ...]
    reason: str = ""

    @property
    def is_split(self) -> bool:
        """True when some computation runs once instead of T times."""
        return bool(self.prefix) and not self.reason

    def describe(self) -> str:
        if not self.is_split:
            return (
                f"whole graph tiled ({self.reason or 'the first stochastic node is at the inputs'})"
            )
        return (
            f"{len(self.prefix)} prefix nodes run once, {len(self.suffix)} suffix nodes on the "
            f"tile; cut at {', '.join(self.cut)}"
        )


def _is_stochastic(node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in STOCHASTIC_OPS:
        return False
    # A Dropout without a training_mode input is an identity at inference.
    return node.op_type != "Dropout" or (len(node.input) >= 3 and bool(node.input[2]))


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Tensor name -> dims (int, symbolic name, or "" when unknown), from shape inference."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort; unknown shapes only cost speed
        log.debug("shape inference failed", exc_info=True)
        inferred = model
    graph = inferred.graph
    shapes: dict[str, list[int | str]] = {}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
            shapes[value.name] = [
                d.dim_param
                if d.HasField("dim_param")
                else (d.dim_value if d.HasField("dim_value") else "")
                for d in value.type.tensor_type.shape.dim
            ]
    return shapes


def _full_tiling(model: onnx.ModelProto, reason: str) -> SplitPlan:
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = tuple(i.name for i in graph.input if i.name not in initializers)
    return SplitPlan(prefix=(), suffix=tuple(range(len(graph.node))), cut=inputs,
                     tiled_outputs=(), reason=reason)  # fmt: skip


def plan_split(model: onnx.ModelProto) -> SplitPlan:
    """Plan the cut between the deterministic prefix and the stochastic suffix."""
    graph = model.graph
    nodes = list(graph.node)
    if model.functions or any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in nodes
        for a in n.attribute
    ):
        return _full_tiling(model, "control flow or local functions")
    initializers = {i.name for i in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in initializers]
    shapes = _shapes(model)
    batch_dims = {shapes[name][0] for name in graph_inputs if shapes.get(name)}
    if len(batch_dims) != 1 or next(iter(batch_dims)) in ("", 1):
        return _full_tiling(model, "no common symbolic batch dimension")
    batch = next(iter(batch_dims))

    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(i)

    # Tensors that depend on the graph inputs (nodes are topologically sorted in ONNX).
    dynamic = set(graph_inputs)
    for n in nodes:
        if any(name in dynamic for name in n.input):
            dynamic.update(o for o in n.output if o)

    stochastic = [i for i, n in enumerate(nodes) if _is_stochastic(n)]
    if not stochastic:
        return _full_tiling(model, "no stochastic node")
    suffix = _downstream(stochastic, nodes, consumers)

    def batch_first(name: str) -> bool:
        dims = shapes.get(name)
        return bool(dims) and dims is not None and dims[0] == batch

    while True:
        cut = _cut(suffix, nodes, producer)
        pulled = {
            producer[name]
            for name in cut
            if name in dynamic and not batch_first(name) and name in producer
        }
        if any(name in dynamic and not batch_first(name) and name not in producer for name in cut):
            return _full_tiling(model, "an input without the batch dimension first")
        if not pulled:
            break
        # Pull the producers in, and what they feed: the suffix must stay downstream-closed.
        suffix = _downstream(sorted(suffix | pulled), nodes, consumers)

    prefix = tuple(i for i in range(len(nodes)) if i not in suffix)
    tiled = tuple(sorted(name for name in cut if name in dynamic))
    outputs_from_prefix = tuple(
        o.name
        for o in graph.output
        if o.name not in graph_inputs and producer.get(o.name) in set(prefix)
    )
    if any(not batch_first(name) for name in outputs_from_prefix):
        return _full_tiling(model, "a deterministic output without the batch dimension first")
    if all(name not in producer for name in tiled) and not outputs_from_prefix:
        return _full_tiling(model, "the first stochastic node is at the inputs")
    return SplitPlan(prefix=prefix, suffix=tuple(sorted(suffix)), cut=tiled,
                     tiled_outputs=outputs_from_prefix)  # fmt: skip


def _downstream(
    start: Iterable[int], nodes: list[onnx.NodeProto], consumers: dict[str, list[int]]
) -> set[int]:
    region = set(start)
    stack = list(region)
    while stack:
        for out in nodes[stack.pop()].output:
            for j in consumers.get(out, []):
                if j not in region:
                    region.add(j)
                    stack.append(j)
    return region


def _cut(suffix: set[int], nodes: list[onnx.NodeProto], producer: dict[str, int]) -> set[str]:
    """Tensors consumed by the suffix and not produced inside it."""
    return {
        name for i in suffix for name in nodes[i].input if name and producer.get(name) not in suffix
    }


def _used_initializers(
    graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto]
) -> list[onnx.TensorProto]:
    used = {name for n in nodes for name in n.input}
    return [i for i in graph.initializer if i.name in used]


def _value_info(model: onnx.ModelProto, names: Iterable[str]) -> list[onnx.ValueInfoProto]:
    inferred = shape_inference.infer_shapes(model)
    known = {
        v.name: v
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    return [known[name] for name in names]


def _make_model(model: onnx.ModelProto, graph: onnx.GraphProto) -> onnx.ModelProto:
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def tiled_model(model: onnx.ModelProto, plan: SplitPlan) -> onnx.ModelProto:
    """One graph: the prefix, a Tile (sample-major) at each cut tensor, then the suffix.

    The graph gains the input ``mcd_num_samples`` (int64, [1]): T for the run. Its outputs
    have T*B rows, row t*B + b being sample t of input row b.
    """
    graph = model.graph
    nodes = list(graph.node)
    shapes = _shapes(model)
    renamed = {name: name + _TILED_SUFFIX for name in plan.cut}
    tile_nodes: list[onnx.NodeProto] = []
    constants: dict[str, onnx.TensorProto] = {}

    def add_tile(name: str, target: str) -> None:
        # A deterministic graph output keeps its name for the tiled tensor, so inside the
        # graph the prefix produces it as "<name>__mcd_once".
        source = name + _ONCE_SUFFIX if name in plan.tiled_outputs else name
        rank = len(shapes[name])
        repeats = NUM_SAMPLES_INPUT
        if rank > 1:  # repeats = [T, 1, ..., 1]: tile along the batch axis only
            ones = f"mcd_ones_{rank - 1}"
            constants.setdefault(ones, numpy_helper.from_array(np.ones(rank - 1, np.int64), ones))
            repeats = f"{target}__mcd_repeats"
            tile_nodes.append(
                helper.make_node("Concat", [NUM_SAMPLES_INPUT, ones], [repeats], axis=0)
            )
        tile_nodes.append(helper.make_node("Tile", [source, repeats], [target]))

    for name in plan.cut:
        add_tile(name, renamed[name])
    for name in plan.tiled_outputs:
        add_tile(name, name)

    prefix_nodes = [_rename_outputs(nodes[i], plan.tiled_outputs) for i in plan.prefix]
    suffix_nodes = [_rename_inputs(nodes[i], renamed) for i in plan.suffix]
    num_samples = helper.make_tensor_value_info(NUM_SAMPLES_INPUT, TensorProto.INT64, [1])
    new_graph = helper.make_graph(
        [*prefix_nodes, *tile_nodes, *suffix_nodes],
        graph.name + "_mc_tiled",
        [*graph.input, num_samples],
        list(graph.output),
        initializer=[*graph.initializer, *constants.values()],
    )
    return _make_model(model, new_graph)


def split_models(
    model: onnx.ModelProto, plan: SplitPlan
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Two graphs: the prefix (graph inputs -> cut tensors and deterministic outputs) and the
    suffix (tiled cut tensors -> graph outputs). Tile the prefix outputs sample-major between
    the two runs."""
    if plan.tiled_outputs:
        raise ValueError("split_models does not support deterministic graph outputs")
    graph = model.graph
    nodes = list(graph.node)
    prefix_nodes = [nodes[i] for i in plan.prefix]
    suffix_nodes = [nodes[i] for i in plan.suffix]
    initializers = {i.name for i in graph.initializer}
    graph_inputs = [i for i in graph.input if i.name not in initializers]
    cut_info = _value_info(model, plan.cut)
    prefix_outputs = [v for v in cut_info if v.name not in {i.name for i in graph_inputs}]
    prefix = helper.make_graph(
        prefix_nodes, graph.name + "_prefix", graph_inputs, prefix_outputs,
        initializer=_used_initializers(graph, prefix_nodes),
    )  # fmt: skip
    suffix = helper.make_graph(
        suffix_nodes, graph.name + "_suffix", cut_info, list(graph.output),
        initializer=_used_initializers(graph, suffix_nodes),
    )  # fmt: skip
    return _make_model(model, prefix), _make_model(model, suffix)


def _rename_inputs(node: onnx.NodeProto, renamed: dict[str, str]) -> onnx.NodeProto:
    if not any(name in renamed for name in node.input):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(renamed.get(name, name) for name in node.input)
    return copy


def _rename_outputs(node: onnx.NodeProto, tiled_outputs: tuple[str, ...]) -> onnx.NodeProto:
    if not any(name in tiled_outputs for name in node.output):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.output[:]
    copy.output.extend(
        name + "__mcd_once" if name in tiled_outputs else name for name in node.output
    )
    return copy


@dataclass(frozen=True)
class NoiseInput:
    """A graph input that replaced a random node: uniform [0, 1) noise of shape
    [rows, *row_shape], float32, one value per element of the node's tensor."""

    name: str
    row_shape: tuple[int, ...]


class NoiseRewriteError(ValueError):
    """The graph has a random node whose noise cannot be fed from outside."""


def noise_fed_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[NoiseInput, ...]]:
    """Rewrite every stochastic node to take its randomness from a graph input.

    Dropout(x, ratio, training_mode=true) becomes x * Cast(u >= ratio) / (1 - ratio), and
    RandomUniformLike(t) becomes u * (high - low) + low, u a new float32 input of x's (t's) shape.
    The caller draws u, so a seeded generator per row makes the samples reproducible whatever
    else is in the batch (notes: "Feeding the uniform noise as graph inputs").

    Raises:
        NoiseRewriteError: a random node other than these, or a tensor whose shape beyond the
            batch dimension is not known statically.
    """
    graph = model.graph
    shapes = _shapes(model)
    dtypes = _elem_types(model)
    nodes: list[onnx.NodeProto] = []
    noise: list[NoiseInput] = []
    consts = {i.name for i in graph.initializer}
    initializers = list(graph.initializer)

    def const(name: str, value: float) -> str:
        if name not in consts:
            initializers.append(numpy_helper.from_array(np.array(value, np.float32), name))
            consts.add(name)
        return name

    for node in graph.node:
        if not _is_stochastic(node):
            nodes.append(node)
            continue
        if node.op_type not in ("Dropout", "RandomUniformLike"):
            raise NoiseRewriteError(f"{node.op_type} node {node.name!r} cannot be fed noise")
        source = node.input[0]
        dims = shapes.get(source)
        if not dims or any(not isinstance(d, int) or d < 1 for d in dims[1:]):
            raise NoiseRewriteError(f"the shape of {source!r} ({dims}) is not known statically")
        k = len(noise)
        u = f"mcd_noise_{k}"
        noise.append(NoiseInput(u, tuple(int(d) for d in dims[1:])))
        p = f"mcd_{k}_"
        if node.op_type == "Dropout":
            elem = dtypes.get(source, TensorProto.FLOAT)
            ratio = (
                node.input[1] if len(node.input) > 1 and node.input[1] else const("mcd_half", 0.5)
            )
            nodes += [
                helper.make_node("Cast", [ratio], [p + "ratio32"], to=TensorProto.FLOAT),
                helper.make_node("GreaterOrEqual", [u, p + "ratio32"], [p + "keep"]),
                helper.make_node("Cast", [p + "keep"], [p + "keep_x"], to=elem),
                helper.make_node("Sub", [const("mcd_one", 1.0), p + "ratio32"], [p + "kept_frac"]),
                helper.make_node("Reciprocal", [p + "kept_frac"], [p + "scale32"]),
                helper.make_node("Cast", [p + "scale32"], [p + "scale"], to=elem),
                helper.make_node("Mul", [source, p + "keep_x"], [p + "masked"]),
                helper.make_node("Mul", [p + "masked", p + "scale"], [node.output[0]]),
            ]
            if len(node.output) > 1 and node.output[1]:
                nodes.append(helper.make_node("Identity", [p + "keep"], [node.output[1]]))
        else:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            low, high = float(attrs.get("low", 0.0)), float(attrs.get("high", 1.0))
            elem = int(attrs.get("dtype", dtypes.get(source, TensorProto.FLOAT)))
            nodes += [
                helper.make_node("Mul", [u, const(p + "width", high - low)], [p + "scaled"]),
                helper.make_node("Add", [p + "scaled", const(p + "low", low)], [p + "shifted"]),
                helper.make_node("Cast", [p + "shifted"], [node.output[0]], to=elem),
            ]
    batch = next((d for d in shapes.get(graph.input[0].name, [""])[:1]), "rows")
    noise_inputs = [
        helper.make_tensor_value_info(n.name, TensorProto.FLOAT, [batch or "rows", *n.row_shape])
        for n in noise
    ]
    new_graph = helper.make_graph(nodes, graph.name + "_noise_fed", [*graph.input, *noise_inputs],
                                  list(graph.output), initializer=initializers)  # fmt: skip
    return _make_model(model, new_graph), tuple(noise)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> ONNX element type, from shape inference."""
    try:
        inferred = shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    return {
        v.name: v.type.tensor_type.elem_type
        for v in [*g.value_info, *g.input, *g.output]
        if v.type.HasField("tensor_type")
    }
