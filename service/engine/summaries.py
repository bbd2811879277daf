"""Statistics next to the samples: per-chunk summaries computed inside the graph.

A session run on the tile produces t samples of B rows, (t*B, ...) sample-major per output.
Copying them out and reducing them in numpy costs more than the run itself for wide outputs
(1000 classes: 235 ms of float64 statistics for (T, B, C) = (100, 32, 1000) on 2 cores), so
the graph that runs on the tile ends with the reductions over its t samples, and each run
returns (B, ...)-sized summaries. The host merges chunks exactly in float64 (Chan's parallel
update, ``service.maths.summaries``).

Per output semantics (classes along the last axis):

* ``logits``: per-sample softmax p and log-softmax; the sum of p over the samples, the sum of
  squared deviations of p from the chunk's mean (M2), the sum of the per-sample entropies,
  and the per-sample argmax (the votes are counted on the host: (t, B, ...) int64 indices);
* ``probabilities``: the same without the softmax (log p where p > 0, else 0), plus the
  smallest value of each row (a negative "probability" fails that row);
* ``values`` (and the raw statistics of ``variance``/``log_variance`` outputs): in float64,
  the first sample as a shift, the sum of deviations from it and their M2 (shifting keeps
  values like 1e8 + N(0, 1) exact);
* ``variance`` / ``log_variance``: also the float64 sum of the predicted variances (exp of the
  log-variances), and their smallest value per row.

Class statistics stay in float32 inside a chunk (the per-sample probabilities are float32 like
the model's logits); measured against the float64 reference on the same samples, the largest
error was 5e-9 on the mean, 6e-6 relative on the variance and 4e-6 nats on the expected
entropy at t = 1000 (tests/unit/test_summaries.py states the tolerances it checks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from service.repository import Semantics

__all__ = ["OutputSummary", "summary_nodes"]

#: Fetch names of the summaries of output ``k``: ``mcd_s<k>_<part>``.
_PREFIX = "mcd_s"


@dataclass(frozen=True)
class OutputSummary:
    """The summary outputs of one model output.

    Attributes:
        output: the model output's name.
        semantics: its semantics.
        parts: the summary's fetch names by part ("sum", "m2", "entropy_sum", "argmax", "min",
            "shift", "variance_sum", "variance_min").
        samples: the fetch name of the per-sample values a request asking for its samples
            gets, (t, B, ...): the probabilities (float32) for class outputs, the raw output
            (its own dtype) otherwise.
        samples_type: the ONNX element type of ``samples``.
    """

    output: str
    semantics: Semantics
    parts: dict[str, str]
    samples: str
    samples_type: int

    @property
    def fetches(self) -> list[str]:
        return list(self.parts.values())

    def part_type(self, part: str) -> int:
        """The ONNX element type of a part: class summaries stay float32, the argmax is
        int64, everything else is float64."""
        if part == "argmax":
            return TensorProto.INT64
        return TensorProto.FLOAT if self.semantics.is_classification else TensorProto.DOUBLE


class _Builder:
    """Appends nodes and constants, with reductions written for the graph's opset."""

    def __init__(self, prefix: str, opset: int) -> None:
        self.prefix = prefix
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, onnx.TensorProto] = {}

    def name(self, part: str) -> str:
        return f"{self.prefix}_{part}"

    def const(self, part: str, value: NDArray[Any]) -> str:
        name = self.name(part)
        self.constants[name] = numpy_helper.from_array(value, name)
        return name

    def node(self, op: str, inputs: list[str], part: str, **attrs: Any) -> str:
        out = self.name(part)
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def reduce(self, op: str, x: str, axes: list[int], part: str, keepdims: int = 0) -> str:
        # ReduceSum takes its axes as an input since opset 13, the other reductions since 18.
        as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if as_input:
            axes_name = self.const(f"axes_{'_'.join(str(a) for a in axes).replace('-', 'm')}",
                                   np.array(axes, np.int64))  # fmt: skip
            return self.node(op, [x, axes_name], part, keepdims=keepdims)
        return self.node(op, [x], part, axes=axes, keepdims=keepdims)


def summary_nodes(
    k: int,
    output: str,
    semantics: Semantics,
    *,
    elem_type: int,
    num_samples: str,
    opset: int,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], OutputSummary]:
    """The nodes that summarise model output ``output`` over the t samples of a run.

    Args:
        k: the output's index (names the summary tensors).
        output: the tensor, (t*B, ...) sample-major.
        semantics: what it means.
        elem_type: its ONNX element type.
        num_samples: the graph input holding t (int64, [1]).
        opset: the graph's default-domain opset.

    Returns:
        The nodes, their constants, and the description of the fetches.
    """
    b = _Builder(f"{_PREFIX}{k}", opset)
    # (t*B, ...) -> (t, B, ...): the leading -1 is B, the rest is the output's own row shape.
    rest = b.node(
        "Slice",
        [b.node("Shape", [output], "shape"), b.const("one", np.array([1], np.int64)),
         b.const("end", np.array([2**62], np.int64))],
        "row_shape",
    )  # fmt: skip
    shape = b.node(
        "Concat", [num_samples, b.const("minus_one", np.array([-1], np.int64)), rest],
        "shape3", axis=0,
    )  # fmt: skip
    by_sample = b.node("Reshape", [output, shape], "by_sample")
    builders: dict[Semantics, Callable[..., tuple[dict[str, str], str]]] = {
        Semantics.LOGITS: _classes,
        Semantics.PROBABILITIES: _classes,
        Semantics.VALUES: _values,
        Semantics.VARIANCE: _variances,
        Semantics.LOG_VARIANCE: _variances,
    }
    parts, samples = builders[semantics](b, by_sample, semantics, elem_type, num_samples)
    samples_type = TensorProto.FLOAT if semantics.is_classification else elem_type
    summary = OutputSummary(output, semantics, parts, samples, samples_type)
    return b.nodes, list(b.constants.values()), summary


def _as(b: _Builder, x: str, elem_type: int, target: int, part: str) -> str:
    return x if elem_type == target else b.node("Cast", [x], part, to=target)


def _classes(
    b: _Builder, y: str, semantics: Semantics, elem_type: int, num_samples: str
) -> tuple[dict[str, str], str]:
    y = _as(b, y, elem_type, TensorProto.FLOAT, "y32")
    parts: dict[str, str] = {}
    if semantics is Semantics.LOGITS:
        p = b.node("Softmax", [y], "p", axis=-1)
        log_p = b.node("LogSoftmax", [y], "log_p", axis=-1)
    else:
        p = y
        zero = b.const("zero", np.array(0.0, np.float32))
        positive = b.node("Greater", [p, zero], "positive")
        log_p = b.node("Where", [positive, b.node("Log", [p], "log_raw"), zero], "log_p")
        parts["min"] = b.reduce("ReduceMin", p, [0, -1], "min")
    plogp = b.node("Mul", [p, log_p], "plogp")
    neg_entropy = b.reduce("ReduceSum", plogp, [-1], "neg_entropy")  # (t, B, ...)
    parts["entropy_sum"] = b.node(
        "Neg", [b.reduce("ReduceSum", neg_entropy, [0], "neg_entropy_sum")], "entropy_sum"
    )
    total = b.reduce("ReduceSum", p, [0], "sum")
    t = b.node("Cast", [num_samples], "t32", to=TensorProto.FLOAT)
    deviation = b.node("Sub", [p, b.node("Div", [total, t], "chunk_mean")], "deviation")
    parts["sum"] = total
    parts["m2"] = b.reduce("ReduceSumSquare", deviation, [0], "m2")
    parts["argmax"] = b.node("ArgMax", [p], "argmax", axis=-1, keepdims=0)
    return parts, p


def _moments64(b: _Builder, y: str, num_samples: str, part: str) -> dict[str, str]:
    """Shift (the first sample), sum of deviations from it and their M2, in float64."""
    shift = b.node("Gather", [y, b.const(part + "first", np.array(0, np.int64))], part + "shift",
                   axis=0)  # fmt: skip
    deviation = b.node("Sub", [y, shift], part + "dev")
    total = b.reduce("ReduceSum", deviation, [0], part + "sum")
    t = b.node("Cast", [num_samples], part + "t64", to=TensorProto.DOUBLE)
    centred = b.node("Sub", [deviation, b.node("Div", [total, t], part + "mean_dev")],
                     part + "centred")  # fmt: skip
    m2 = b.reduce("ReduceSumSquare", centred, [0], part + "m2")
    return {"shift": shift, "sum": total, "m2": m2}


def _values(
    b: _Builder, y: str, semantics: Semantics, elem_type: int, num_samples: str
) -> tuple[dict[str, str], str]:
    y64 = _as(b, y, elem_type, TensorProto.DOUBLE, "y64")
    return _moments64(b, y64, num_samples, ""), y


def _variances(
    b: _Builder, y: str, semantics: Semantics, elem_type: int, num_samples: str
) -> tuple[dict[str, str], str]:
    y64 = _as(b, y, elem_type, TensorProto.DOUBLE, "y64")
    parts = _moments64(b, y64, num_samples, "")
    variance = y64 if semantics is Semantics.VARIANCE else b.node("Exp", [y64], "exp")
    parts["variance_sum"] = b.reduce("ReduceSum", variance, [0], "variance_sum")
    parts["variance_min"] = b.reduce("ReduceMin", variance, [0], "variance_min")
    return parts, y
