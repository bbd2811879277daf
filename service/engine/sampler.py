"""The graphs an engine runs: a prefix that runs once, and the sampler that runs on the tile.

The sampler graph of every engine form takes B untiled rows, tiles them itself (t samples,
sample-major: row s*B + b is sample s of row b), runs the stochastic part on the [t*B, ...]
tile and ends with the per-chunk summaries of ``service.engine.summaries``::

    form            sampler graph inputs            nodes                          prefix graph
    tiled           the model's inputs              Tile, every node                none
    split-graph     the model's inputs              prefix, Tile at the cut, suffix none
    split-sessions  the cut tensors (B rows)        Tile at the cut, suffix         inputs -> cut

Every sampler also takes ``mcd_num_samples`` (int64 [1]: t for this run) and, unless it keeps
the graph's own random nodes (``native``: CUDA, whose kernels draw independently per run), one
flat noise input per stochastic node (``service.engine.noise``). Its outputs: each summary
part, each model output on the tile (t*B, ...), and for class outputs the per-sample
probabilities; a run fetches only what it needs (ONNX Runtime computes the whole graph either
way, and the samples are intermediates of the summaries).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.engine.graph_split import SplitPlan
from service.engine.noise import NoiseSpec, feed_noise, graph_constants, is_stochastic
from service.engine.shapes import GraphShapes
from service.engine.summaries import OutputSummary, summary_nodes
from service.repository import ModelConfig, Semantics

__all__ = [
    "NUM_SAMPLES_INPUT",
    "Form",
    "SamplerGraph",
    "TileStep",
    "build_prefix",
    "build_sampler",
    "default_opset",
    "tile_steps",
]

log = logging.getLogger(__name__)

#: The extra input of every sampler graph: t for this run, int64, shape [1].
NUM_SAMPLES_INPUT = "mcd_num_samples"
_TILED = "__mcd_tiled"
_SHAPE_ONLY = "__mcd_shape_only"

Form = Literal["tiled", "split-graph", "split-sessions"]


#: One node's step on the tile: the tensors it makes, and those free after it (last read).
TileStep = tuple[tuple[str, ...], tuple[str, ...]]


def _names_read(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads, with those its subgraphs read from the outer scope."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        subgraphs = [attribute.g] if attribute.HasField("g") else []
        for subgraph in [*subgraphs, *attribute.graphs]:
            for inner in subgraph.node:
                names += _names_read(inner)
    return names


def tile_steps(
    nodes: Sequence[onnx.NodeProto], tiled: Sequence[str], kept: Iterable[str]
) -> tuple[TileStep, ...]:
    """The tensors of the tile in the order a run makes and frees them.

    ONNX Runtime's memory planner reuses a tensor's buffer once its last reader has run, so a
    run holds at once only the tensors made and not yet read for the last time: for a chain
    of layers about two activations, not the sum of all of them (which overstated the memory
    of a deep model's run tenfold and more). The graph's node order is topological.

    Args:
        nodes: the nodes that run on the tile, in graph order.
        tiled: the tensors tiled before the first node (made at a first, empty step).
        kept: the tensors read after the last node (the outputs the summaries read).

    Returns:
        One step for the tiling, then one per node: (tensors made, tensors free after it).
    """
    last_read: dict[str, int] = {}
    for index, node in enumerate(nodes, start=1):
        for name in _names_read(node):
            last_read[name] = index
    for name in kept:
        last_read[name] = len(nodes) + 1  # never freed within the run
    made: list[tuple[str, ...]] = [tuple(dict.fromkeys(tiled))]
    made += [tuple(name for name in node.output if name) for node in nodes]
    freed: list[list[str]] = [[] for _ in made]
    for index, names in enumerate(made):
        for name in names:
            last = last_read.get(name, index)  # never read: free at once
            if last < len(made):
                freed[last].append(name)
    return tuple((names, tuple(free)) for names, free in zip(made, freed, strict=True))


@dataclass(frozen=True)
class SamplerGraph:
    """A sampler graph and what the engine needs to know to feed and read it.

    Attributes:
        model: the graph.
        inputs: the data inputs it takes, B rows each (the model's inputs, or the cut).
        noise: its noise inputs (empty for a native graph).
        summaries: per model output, in the config's order, the summary fetches.
        raw: per model output, the fetch name of the output on the tile, (t*B, ...).
        tile_steps: the tile's tensors (original names) as a run makes and frees them, for
            the memory estimate of a run (``tile_steps``).
    """

    model: onnx.ModelProto
    inputs: tuple[str, ...]
    noise: tuple[NoiseSpec, ...]
    summaries: tuple[OutputSummary, ...]
    raw: tuple[str, ...]
    tile_steps: tuple[TileStep, ...]


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _value_info(name: str, shapes: GraphShapes, rename: str | None = None) -> onnx.ValueInfoProto:
    dims = shapes.dims(name)
    return helper.make_tensor_value_info(
        rename or name, shapes.elem_type(name), None if dims is None else list(dims)
    )


def _tile_nodes(source: str, target: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """(B, ...) -> (t*B, ...), sample-major, for a tensor of any rank: flatten to (1, B*R),
    Tile to (t, B*R), reshape to (t*B, ...)."""
    p = f"{target}__"
    constants = [
        numpy_helper.from_array(np.array([1, -1], np.int64), "mcd_one_by_all"),
        numpy_helper.from_array(np.array([1], np.int64), "mcd_one"),
        numpy_helper.from_array(np.array([-1], np.int64), "mcd_minus_one"),
        numpy_helper.from_array(np.array([2**62], np.int64), "mcd_end"),
    ]
    nodes = [
        helper.make_node("Reshape", [source, "mcd_one_by_all"], [p + "flat"]),
        helper.make_node("Concat", [NUM_SAMPLES_INPUT, "mcd_one"], [p + "repeats"], axis=0),
        helper.make_node("Tile", [p + "flat", p + "repeats"], [p + "copies"]),
        helper.make_node("Shape", [source], [p + "shape"]),
        helper.make_node("Slice", [p + "shape", "mcd_one", "mcd_end"], [p + "row_shape"]),
        helper.make_node("Concat", ["mcd_minus_one", p + "row_shape"], [p + "tiled_shape"],
                         axis=0),
        helper.make_node("Reshape", [p + "copies", p + "tiled_shape"], [target]),
    ]  # fmt: skip
    return nodes, constants


def _tiled_shape_nodes(
    source: str, target: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The shape (t*B, ...) of ``source`` tiled, without the tile: for a tensor the tile only
    reads the shape of (the input of a random node, such as the ``empty_like`` that in-place
    dropout draws its uniforms for; its noise is fed)."""
    p = f"{target}__"
    constants = [
        numpy_helper.from_array(np.array([0], np.int64), "mcd_zero"),
        numpy_helper.from_array(np.array([1], np.int64), "mcd_one"),
        numpy_helper.from_array(np.array([2**62], np.int64), "mcd_end"),
    ]
    nodes = [
        helper.make_node("Shape", [source], [p + "shape"]),
        helper.make_node("Slice", [p + "shape", "mcd_zero", "mcd_one"], [p + "rows"]),
        helper.make_node("Mul", [p + "rows", NUM_SAMPLES_INPUT], [p + "tile_rows"]),
        helper.make_node("Slice", [p + "shape", "mcd_one", "mcd_end"], [p + "row_shape"]),
        helper.make_node("Concat", [p + "tile_rows", p + "row_shape"], [target], axis=0),
    ]
    return nodes, constants


def _shape_only(nodes: Sequence[onnx.NodeProto], candidates: set[str]) -> set[str]:
    """The candidates every reader of which is a whole-tensor ``Shape`` node (and that some
    node reads): their tile would be made only for its shape."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in _names_read(node):
            if name in candidates:
                readers.setdefault(name, []).append(node)
    return {
        name
        for name, found in readers.items()
        if all(n.op_type == "Shape" and n.input[0] == name and not n.attribute for n in found)
    }


def _renamed(node: onnx.NodeProto, names: dict[str, str]) -> onnx.NodeProto:
    if not any(n in names for n in node.input):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(names.get(n, n) for n in node.input)
    return copy


def _used_initializers(
    graph: onnx.GraphProto, nodes: Iterable[onnx.NodeProto]
) -> list[onnx.TensorProto]:
    used = {name for n in nodes for name in n.input}
    return [i for i in graph.initializer if i.name in used]


def _make_model(
    original: onnx.ModelProto,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    *,
    initializers: Sequence[onnx.TensorProto],
    name: str,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs),
                              initializer=list(initializers))  # fmt: skip
    model = helper.make_model(graph, opset_imports=list(original.opset_import))
    model.ir_version = original.ir_version
    model.functions.extend(original.functions)
    return model


def build_prefix(model: onnx.ModelProto, plan: SplitPlan, shapes: GraphShapes) -> onnx.ModelProto:
    """The split-sessions prefix: graph inputs -> the cut tensors it computes and the
    deterministic outputs, B rows each."""
    graph = model.graph
    nodes = [graph.node[i] for i in plan.prefix]
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    input_names = {i.name for i in inputs}
    outputs = [
        _value_info(name, shapes)
        for name in dict.fromkeys([*plan.cut, *plan.tiled_outputs])
        if name not in input_names
    ]
    return _make_model(model, nodes, inputs, outputs,
                       initializers=_used_initializers(graph, nodes),
                       name=graph.name + "_prefix")  # fmt: skip


def build_sampler(
    model: onnx.ModelProto,
    config: ModelConfig,
    plan: SplitPlan,
    form: Form,
    shapes: GraphShapes,
    *,
    native: bool,
) -> SamplerGraph:
    """The sampler graph of one engine form.

    Args:
        model: the model as exported.
        config: its config (output semantics).
        plan: the split plan (``plan_split``); for ``tiled`` any plan will do.
        form: the engine form.
        shapes: the model's shapes.
        native: keep the graph's own random nodes instead of feeding noise.

    Raises:
        NoiseRewriteError: ``native`` is False and a random node cannot be fed noise (or sits
            in a subgraph or a local function).
    """
    graph = model.graph
    all_nodes = list(graph.node)
    initializer_names = {i.name for i in graph.initializer}
    model_inputs = [i.name for i in graph.input if i.name not in initializer_names]
    if form == "tiled":
        before: list[onnx.NodeProto] = []
        on_tile_indices = list(range(len(all_nodes)))
        to_tile = list(model_inputs)
        data_inputs = list(model_inputs)
    elif form == "split-graph":
        before = [all_nodes[i] for i in plan.prefix]
        on_tile_indices = list(plan.suffix)
        to_tile = list(dict.fromkeys([*plan.cut, *plan.tiled_outputs]))
        data_inputs = list(model_inputs)
    else:
        before = [all_nodes[i] for i in plan.constant_nodes]
        on_tile_indices = list(plan.suffix)
        to_tile = list(dict.fromkeys([*plan.cut, *plan.tiled_outputs]))
        data_inputs = list(to_tile)

    tiled_name = {name: name + _TILED for name in to_tile}
    on_tile = [_renamed(all_nodes[i], tiled_name) for i in on_tile_indices]
    extra: dict[str, onnx.TensorProto] = {}

    noise: tuple[NoiseSpec, ...] = ()
    noise_inputs: list[onnx.ValueInfoProto] = []
    opset = default_opset(model)
    if not native:
        _refuse_hidden_randomness(model)
        aliases = {tiled: name for name, tiled in tiled_name.items()}
        rewrite = feed_noise(on_tile, shapes, graph_constants(graph), aliases)
        on_tile = list(rewrite.nodes)
        noise = rewrite.noise
        noise_inputs = list(rewrite.inputs)
        extra.update({c.name: c for c in rewrite.initializers})

    # A model output on the tile: produced there, or a deterministic output tiled.
    raw = [tiled_name.get(o.name, o.name) for o in config.outputs]
    shape_only = _shape_only(on_tile, set(tiled_name.values()) - set(raw))
    nodes: list[onnx.NodeProto] = list(before)
    for name in to_tile:
        if tiled_name[name] in shape_only:
            tile, constants = _tiled_shape_nodes(name, tiled_name[name] + _SHAPE_ONLY)
        else:
            tile, constants = _tile_nodes(name, tiled_name[name])
        nodes += tile
        extra.update({c.name: c for c in constants})
    nodes += [
        helper.make_node("Identity", [node.input[0] + _SHAPE_ONLY], list(node.output))
        if node.op_type == "Shape" and node.input[0] in shape_only
        else node
        for node in on_tile
    ]
    summaries: list[OutputSummary] = []
    outputs: list[onnx.ValueInfoProto] = []
    for k, (spec, tensor) in enumerate(zip(config.outputs, raw, strict=True)):
        elem = shapes.elem_type(spec.name)
        summary_graph, constants, summary = summary_nodes(
            k, tensor, spec.semantics or Semantics.VALUES,
            elem_type=elem, num_samples=NUM_SAMPLES_INPUT, opset=opset,
        )  # fmt: skip
        nodes += summary_graph
        extra.update({c.name: c for c in constants})
        summaries.append(summary)
        outputs.append(helper.make_tensor_value_info(tensor, elem, None))
        for part, fetch in summary.parts.items():
            outputs.append(helper.make_tensor_value_info(fetch, summary.part_type(part), None))
        outputs.append(helper.make_tensor_value_info(summary.samples, summary.samples_type, None))

    inputs = [_value_info(name, shapes) for name in data_inputs]
    inputs.append(helper.make_tensor_value_info(NUM_SAMPLES_INPUT, TensorProto.INT64, [1]))
    inputs += noise_inputs
    initializers = [*_used_initializers(graph, nodes), *extra.values()]
    sampler = _make_model(model, nodes, inputs, outputs, initializers=initializers,
                          name=f"{graph.name}_{form}_sampler")  # fmt: skip
    made = [name for name in to_tile if tiled_name[name] not in shape_only]
    steps = tile_steps([all_nodes[i] for i in on_tile_indices], made,
                       [o.name for o in config.outputs])  # fmt: skip
    return SamplerGraph(
        model=sampler,
        inputs=tuple(data_inputs),
        noise=noise,
        summaries=tuple(summaries),
        raw=tuple(raw),
        tile_steps=steps,
    )


def _refuse_hidden_randomness(model: onnx.ModelProto) -> None:
    """Random nodes inside subgraphs or local functions cannot be fed noise."""
    from service.engine.noise import NoiseRewriteError  # noqa: PLC0415 (one use)

    def walk(nodes: Iterable[onnx.NodeProto], where: str) -> None:
        for node in nodes:
            for attribute in node.attribute:
                graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []
                if attribute.type == onnx.AttributeProto.GRAPHS:
                    graphs = list(attribute.graphs)
                for sub in graphs:
                    if any(is_stochastic(n) for n in sub.node):
                        raise NoiseRewriteError(
                            f"a random node inside the {node.op_type} {node.name!r} "
                            f"({where}) cannot be fed noise"
                        )
                    walk(sub.node, where)

    walk(model.graph.node, "main graph")
    for function in model.functions:
        if any(is_stochastic(n) for n in function.node):
            raise NoiseRewriteError(
                f"a random node inside the local function {function.name!r} cannot be fed noise"
            )
