"""The machine limit: measured matrix-multiply FLOP/s, and the FLOPs a model needs per row.

The FLOPs of a graph are counted from its Conv, ConvTranspose, Gemm and MatMul nodes (2 FLOPs
per multiply-add; element-wise ops, pooling and the statistics are ignored, so this is a lower
bound of the work done), with shapes from ONNX shape inference. Each node is either in the
deterministic prefix (no stochastic node upstream of it: its rows can be computed once per
input row) or in the stochastic suffix (computed once per sample of a row). So a request of B
rows and T samples needs

* useful work: ``B * prefix + T * B * suffix`` FLOPs (what an engine that runs the prefix
  once must do), and
* naive work: ``T * B * (prefix + suffix)`` FLOPs (what the whole graph on the [T*B] tile does).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference

from export.checks import RANDOM_OPS

__all__ = ["MatmulRate", "ModelFlops", "count_model_flops", "measure_matmul"]

#: Nodes whose outputs are random: everything downstream of one runs once per sample.
STOCHASTIC_OPS = RANDOM_OPS | {"Dropout", "Bernoulli"}


@dataclass(frozen=True)
class MatmulRate:
    """Measured float32 matrix-multiply throughput.

    Attributes:
        size: n of the n x n by n x n product.
        flops_per_s: median over the repeats (2 n^3 FLOPs per product).
        low_flops_per_s: the slowest repeat.
        high_flops_per_s: the fastest repeat.
        repeats: products timed.
        blas: the BLAS library numpy uses, with its thread count.
    """

    size: int
    flops_per_s: float
    low_flops_per_s: float
    high_flops_per_s: float
    repeats: int
    blas: str


def _blas_description() -> str:
    try:
        # Optional (comes with scikit-learn), untyped.
        from threadpoolctl import threadpool_info  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError:
        return "unknown BLAS"
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    # torch may load a BLAS of its own: describe numpy's (numpy.libs/ in its path) if listed.
    pools.sort(key=lambda p: "numpy" not in str(p.get("filepath", "")))
    if not pools:
        return "unknown BLAS"
    pool = pools[0]
    return (
        f"{pool.get('internal_api')} {pool.get('version')} ({pool.get('architecture')} kernels), "
        f"{pool.get('num_threads')} threads"
    )


def measure_matmul(size: int = 2048, repeats: int = 7, seed: int = 0) -> MatmulRate:
    """Time ``repeats`` float32 ``size x size`` products with numpy (after one warm-up)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)
    rates: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.matmul(a, b, out=out)
        rates.append(2.0 * size**3 / (time.perf_counter() - started))
    return MatmulRate(
        size=size,
        flops_per_s=statistics.median(rates),
        low_flops_per_s=min(rates),
        high_flops_per_s=max(rates),
        repeats=repeats,
        blas=_blas_description(),
    )


@dataclass(frozen=True)
class ModelFlops:
    """FLOPs per input row of a graph, split at the first stochastic node.

    Attributes:
        prefix_per_row: FLOPs of the deterministic prefix, needed once per row.
        suffix_per_row: FLOPs downstream of a stochastic node, needed once per sample.
    """

    prefix_per_row: int
    suffix_per_row: int

    @property
    def total_per_row(self) -> int:
        return self.prefix_per_row + self.suffix_per_row

    def useful(self, num_rows: int, num_samples: int) -> int:
        """FLOPs of a request when the prefix runs once per row."""
        return num_rows * self.prefix_per_row + num_samples * num_rows * self.suffix_per_row

    def naive(self, num_rows: int, num_samples: int) -> int:
        """FLOPs of a request when the whole graph runs on every sample."""
        return num_samples * num_rows * self.total_per_row


def _dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """Per-dimension sizes; None for symbolic (the batch) or unknown dimensions."""
    return [
        d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim
    ]


def _row_product(dims: list[int | None]) -> int:
    """Product of the known dimensions: the batch dimension (symbolic) is left out, so this is
    a per-row count for tensors whose first dimension is the batch."""
    return math.prod(d for d in dims if d is not None)


def _node_macs(node: onnx.NodeProto, shapes: dict[str, list[int | None]]) -> int:
    """Multiply-adds per row of one node (0 for node types that are not counted)."""
    if node.op_type in ("Conv", "ConvTranspose"):
        weight = shapes[node.input[1]]  # (C_out, C_in / groups, k...) or transposed
        output = shapes[node.output[0]]  # (N, C_out, spatial...)
        if node.op_type == "Conv":
            return _row_product(output) * _row_product(weight[1:])
        input_ = shapes[node.input[0]]
        return _row_product(input_) * _row_product(weight[1:])
    if node.op_type == "Gemm":
        a = shapes[node.input[0]]
        trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
        k = a[0] if trans_a else a[-1]
        output = shapes[node.output[0]]
        return _row_product(output) * (k or 1)
    if node.op_type == "MatMul":
        a = shapes[node.input[0]]
        output = shapes[node.output[0]]
        return _row_product(output) * (a[-1] or 1)
    return 0


def count_model_flops(model_path: Path) -> ModelFlops:
    """Count the FLOPs per row of an exported graph (see the module docstring).

    Args:
        model_path: a model.onnx with a symbolic batch dimension.

    Returns:
        The prefix and suffix FLOPs per row.
    """
    model = shape_inference.infer_shapes(onnx.load(str(model_path)))
    graph = model.graph
    shapes: dict[str, list[int | None]] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        shapes[value.name] = _dims(value)
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)

    stochastic: set[str] = set()  # tensors downstream of a random draw
    prefix = suffix = 0
    for node in graph.node:  # ONNX graphs are topologically sorted
        downstream = node.op_type in STOCHASTIC_OPS or any(i in stochastic for i in node.input)
        macs = _node_macs(node, shapes)
        if downstream:
            stochastic.update(node.output)
            suffix += macs
        else:
            prefix += macs
    return ModelFlops(prefix_per_row=2 * prefix, suffix_per_row=2 * suffix)
