"""Tensor shapes of a model graph, with symbolic dimensions, evaluated per request.

Shape inference gives each tensor dims that are integers, symbols (``"batch"``, ``"sequence"``,
the names the exporter gave the dynamic axes) or expressions of them (``"batch*sequence"``), or
nothing when inference could not tell. The engine needs two numbers per request shape, both per
input row: how many elements each stochastic node's noise has, and how many bytes the part of
the graph that runs on the tile holds at its peak (to size the chunks of samples). Both come
from these dims with the batch symbol set to 1 and every other symbol set from the request's
input shapes, so a text model served at 16 and 512 tokens gets the right noise and the right
chunks at each length.
"""

from __future__ import annotations

import ast
import logging
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import onnx
from onnx import TensorProto, shape_inference

__all__ = ["Dim", "GraphShapes", "UnknownShape", "evaluate_dim", "row_elements"]

log = logging.getLogger(__name__)

#: One dimension: a size, a symbol or expression of symbols, or None (unknown).
Dim = int | str | None

_BINARY: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}


class UnknownShape(ValueError):
    """A dimension could not be evaluated (unknown to shape inference, or a symbol that no
    input gives)."""


def evaluate_dim(dim: Dim, symbols: Mapping[str, int]) -> int:
    """The size of one dimension for the given symbol values.

    Args:
        dim: an integer, a symbol, or an expression of symbols with ``+ - * //`` and
            parentheses (as exporters write derived sizes, e.g. ``"2*sequence"``).
        symbols: the value of each symbol.

    Raises:
        UnknownShape: ``dim`` is None, uses an unknown symbol, or is not such an expression.
    """
    if isinstance(dim, int):
        return dim
    if dim is None or not dim:
        raise UnknownShape("a dimension unknown to shape inference")
    if dim in symbols:
        return symbols[dim]
    try:
        tree = ast.parse(dim, mode="eval")
    except SyntaxError:
        raise UnknownShape(f"dimension {dim!r} is not an expression of symbols") from None

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in symbols:
                raise UnknownShape(f"dimension {dim!r} uses {node.id!r}, which no input gives")
            return symbols[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        raise UnknownShape(f"dimension {dim!r} is not an expression of symbols")

    return walk(tree)


def row_elements(dims: Iterable[Dim], symbols: Mapping[str, int]) -> int:
    """Elements of a tensor for one input row: its dims evaluated with the batch symbol at 1
    (``symbols`` must map it to 1)."""
    return math.prod(evaluate_dim(d, symbols) for d in dims)


def _dims_of(value: onnx.ValueInfoProto) -> tuple[Dim, ...] | None:
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


@dataclass(frozen=True)
class TensorShape:
    """What shape inference knows of one tensor."""

    dims: tuple[Dim, ...]
    elem_type: int

    @property
    def itemsize(self) -> int:
        try:
            return int(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type).itemsize)
        except (KeyError, TypeError, ValueError):
            return 4


class GraphShapes:
    """Shapes of every tensor of a model, from ONNX shape inference (best effort).

    Args:
        model: the model; not modified.

    Attributes:
        batch: the symbol of the batch dimension (the first dim of the graph inputs), or None
            when the inputs do not share one.
        input_symbols: per graph input, the symbol at each of its axes (None where fixed).
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        try:
            inferred = shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # inference is best effort: unknown shapes only cost precision
            log.debug("shape inference failed", exc_info=True)
            inferred = model
        graph = inferred.graph
        self._shapes: dict[str, TensorShape] = {}
        for value in [*graph.value_info, *graph.input, *graph.output]:
            dims = _dims_of(value)
            if dims is not None:
                self._shapes[value.name] = TensorShape(dims, value.type.tensor_type.elem_type)
        initializers = {i.name for i in graph.initializer}
        self.input_symbols: dict[str, tuple[str | None, ...]] = {}
        for value in graph.input:
            if value.name in initializers or value.name not in self._shapes:
                continue
            self.input_symbols[value.name] = tuple(
                d if isinstance(d, str) else None for d in self._shapes[value.name].dims
            )
        firsts = {s[0] for s in self.input_symbols.values() if s}
        self.batch: str | None = next(iter(firsts)) if len(firsts) == 1 else None

    def get(self, name: str) -> TensorShape | None:
        return self._shapes.get(name)

    def dims(self, name: str) -> tuple[Dim, ...] | None:
        shape = self._shapes.get(name)
        return None if shape is None else shape.dims

    def elem_type(self, name: str, default: int = TensorProto.FLOAT) -> int:
        shape = self._shapes.get(name)
        return default if shape is None else shape.elem_type

    def is_batch_first(self, name: str) -> bool:
        dims = self.dims(name)
        return bool(dims) and dims is not None and self.batch is not None and dims[0] == self.batch

    def symbols(self, row_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """Symbol values for one input row: the batch symbol is 1, every other symbol takes the
        size the request gives at the axis where an input declares it.

        Args:
            row_shapes: per graph input, the shape of one row (the request's shape without the
                batch axis).

        Raises:
            UnknownShape: two inputs give one symbol different sizes.
        """
        values: dict[str, int] = {} if self.batch is None else {self.batch: 1}
        for name, row_shape in row_shapes.items():
            for symbol, size in zip(self.input_symbols.get(name, ())[1:], row_shape, strict=False):
                if symbol is None:
                    continue
                if values.setdefault(symbol, size) != size:
                    raise UnknownShape(
                        f"axis {symbol!r} has size {values[symbol]} in one input and {size} in "
                        f"{name!r}: they must be equal"
                    )
        return values

    def peak_row_bytes(
        self, steps: Iterable[tuple[Iterable[str], Iterable[str]]], symbols: Mapping[str, int]
    ) -> tuple[int, int]:
        """The most bytes per input row held at once over ``steps`` (tensors made, tensors
        freed after, as ``service.engine.sampler.tile_steps`` gives them), and how many tensors
        had unknown shapes (left out)."""
        sizes: dict[str, int] = {}
        unknown = 0

        def size(name: str) -> int:
            nonlocal unknown
            if name not in sizes:
                known, missing = self.row_bytes([name], symbols)
                sizes[name] = known
                unknown += missing
            return sizes[name]

        held = peak = 0
        for made, freed in steps:
            held += sum(size(name) for name in made)
            peak = max(peak, held)
            held -= sum(size(name) for name in freed)
        return peak, unknown

    def row_bytes(self, names: Iterable[str], symbols: Mapping[str, int]) -> tuple[int, int]:
        """Bytes of the named tensors for one input row, and how many of them had unknown
        shapes (left out of the sum)."""
        total = unknown = 0
        for name in names:
            shape = self._shapes.get(name)
            if shape is None:
                unknown += 1
                continue
            try:
                total += row_elements(shape.dims, symbols) * shape.itemsize
            except UnknownShape:
                unknown += 1
        return total, unknown
