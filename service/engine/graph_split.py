"""Load-time planning: which nodes run once per request and which run on the tile.

Everything upstream of the first stochastic node does not depend on the dropout masks, so for
a request of B rows and T samples it can run once on [B, ...]; only the suffix needs the
[T*B, ...] tile. The plan:

1. S, the stochastic region: the stochastic nodes (Dropout with a training_mode input,
   RandomUniform/Normal(Like), Multinomial, Bernoulli) and everything downstream of them.
2. The cut: tensors consumed by S but produced outside it. One that depends on the inputs and
   has the batch dimension first is tiled. Any other input-dependent one (a shape computed
   from the untiled batch, say ``Shape -> Gather -> Concat`` feeding a Reshape) would carry B
   where the suffix needs T*B: its producer is pulled into S, to be recomputed on the tiled
   tensors, and the cut is taken again until every input-dependent cut tensor is batch-first.
3. Cut tensors that do not depend on the inputs (weights, constants, and tensors computed from
   weights only, such as the reshaped recurrent weights of an LSTM) are used as they are; the
   nodes computing them are ``constant_nodes``: a graph holding only the suffix must hold them
   too (ONNX Runtime folds them once at load time).
4. Graph outputs produced outside S (deterministic outputs) are tiled as well, so every
   output has T*B rows.

``service.engine.sampler`` builds the graphs of each engine form from the plan. Graphs with
control flow (If/Loop/Scan bodies) or local functions are not split: the plan falls back to
tiling the inputs (the whole graph runs on the tile), which is always correct.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import onnx

from service.engine.noise import is_stochastic
from service.engine.shapes import GraphShapes

__all__ = ["SplitPlan", "plan_split"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitPlan:
    """Where the graph is cut.

    Attributes:
        prefix: indices (in graph order) of the nodes that run once on [B, ...].
        suffix: indices of the nodes that run on the [T*B, ...] tile.
        cut: input-dependent, batch-first tensors to tile (graph inputs among them when the
            stochastic region reaches an input directly).
        tiled_outputs: graph outputs produced by the prefix, tiled before leaving the graph.
        constant_nodes: prefix nodes that compute, from weights only, tensors the suffix uses.
        reason: why the graph was not split, when it was not.
    """

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    cut: tuple[str, ...]
    tiled_outputs: tuple[str, ...]
    constant_nodes: tuple[int, ...] = ()
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


def _full_tiling(model: onnx.ModelProto, reason: str) -> SplitPlan:
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = tuple(i.name for i in graph.input if i.name not in initializers)
    return SplitPlan(prefix=(), suffix=tuple(range(len(graph.node))), cut=inputs,
                     tiled_outputs=(), reason=reason)  # fmt: skip


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """Whether the model has local functions or nodes with subgraphs (If, Loop, Scan)."""
    return bool(model.functions) or any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in model.graph.node
        for a in n.attribute
    )


def plan_split(model: onnx.ModelProto, shapes: GraphShapes | None = None) -> SplitPlan:
    """Plan the cut between the deterministic prefix and the stochastic suffix.

    Args:
        model: the model.
        shapes: its shapes, when the caller has them already.
    """
    graph = model.graph
    nodes = list(graph.node)
    if has_subgraphs(model):
        return _full_tiling(model, "control flow or local functions")
    initializers = {i.name for i in graph.initializer}
    graph_inputs = [i.name for i in graph.input if i.name not in initializers]
    shapes = shapes or GraphShapes(model)
    if shapes.batch is None:
        return _full_tiling(model, "no common symbolic batch dimension")

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

    stochastic = [i for i, n in enumerate(nodes) if is_stochastic(n)]
    if not stochastic:
        return _full_tiling(model, "no stochastic node")
    suffix = _downstream(stochastic, nodes, consumers)

    while True:
        cut = _cut(suffix, nodes, producer)
        wrong = [name for name in cut if name in dynamic and not shapes.is_batch_first(name)]
        if any(name not in producer for name in wrong):
            return _full_tiling(model, "an input without the batch dimension first")
        if not wrong:
            break
        # Pull the producers in, and what they feed: the suffix must stay downstream-closed.
        suffix = _downstream(sorted(suffix | {producer[n] for n in wrong}), nodes, consumers)

    prefix = tuple(i for i in range(len(nodes)) if i not in suffix)
    tiled = tuple(sorted(name for name in cut if name in dynamic))
    outputs_from_prefix = tuple(
        o.name
        for o in graph.output
        if o.name not in graph_inputs and producer.get(o.name) in set(prefix)
    )
    if any(not shapes.is_batch_first(name) for name in outputs_from_prefix):
        return _full_tiling(model, "a deterministic output without the batch dimension first")
    if all(name not in producer for name in tiled) and not outputs_from_prefix:
        return _full_tiling(model, "the first stochastic node is at the inputs")
    constants = _upstream(
        [producer[name] for name in cut if name not in dynamic and name in producer],
        nodes,
        producer,
    )
    return SplitPlan(prefix=prefix, suffix=tuple(sorted(suffix)), cut=tiled,
                     tiled_outputs=outputs_from_prefix,
                     constant_nodes=tuple(sorted(constants)))  # fmt: skip


def _upstream(
    start: Iterable[int], nodes: list[onnx.NodeProto], producer: dict[str, int]
) -> set[int]:
    region = set(start)
    stack = list(region)
    while stack:
        for name in nodes[stack.pop()].input:
            j = producer.get(name)
            if j is not None and j not in region:
                region.add(j)
                stack.append(j)
    return region


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
