"""What the client returns: frozen dataclasses holding read-only numpy arrays.

Shapes: B is the number of rows sent, C the number of classes, T the number of stochastic
passes; every statistic keeps the batch dimension first, even for a single row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "DropoutLayer",
    "HealthStatus",
    "Interval",
    "IntervalMethod",
    "ModelInfo",
    "ModelSummary",
    "OutputPrediction",
    "Prediction",
    "Semantics",
    "Task",
    "TensorInfo",
]

Task = Literal["classification", "regression", "mixed", "unspecified"]
#: What a model output means. Predictions carry the first four; ``variance`` and
#: ``log_variance`` are the predicted-variance outputs of heteroscedastic models, which the
#: metadata lists and predictions fold into ``aleatoric_variance`` of their values output.
Semantics = Literal["logits", "probabilities", "values", "variance", "log_variance", "unspecified"]
IntervalMethod = Literal["gaussian", "empirical"]
#: ``grpc.health.v1`` statuses (``SERVICE_UNKNOWN`` only comes from Watch, never from Check).
HealthStatus = Literal["SERVING", "NOT_SERVING", "UNKNOWN", "SERVICE_UNKNOWN"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class Interval:
    """A central prediction interval of a regression output.

    Attributes:
        level: the probability mass inside, in (0, 1).
        method: ``"gaussian"`` (mean +- z * sqrt(total predictive variance)) or
            ``"empirical"`` (quantiles of the predictive mixture: of the T samples, or of the
            mixture of the T predicted normals for heteroscedastic outputs).
        lower: (B, ...) float64, the output's shape.
        upper: (B, ...) float64.
    """

    level: float
    method: str
    lower: FloatArray
    upper: FloatArray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays as nested lists, NaN and infinities as None."""
        return {
            "level": self.level,
            "method": self.method,
            "lower": _jsonable(self.lower),
            "upper": _jsonable(self.upper),
        }


@dataclass(frozen=True, eq=False)
class OutputPrediction:
    """The statistics of one model output over the T stochastic passes.

    Attributes:
        name: the output's name.
        semantics: ``"logits"`` or ``"probabilities"`` (a classifier output) or ``"values"``.
        mean: (B, ...) float64, the mean over samples; for classifiers the mean of the
            per-sample probabilities, (B, C).
        variance: (B, ...) float64, unbiased (divisor T - 1); NaN when T = 1. For a
            heteroscedastic output, the epistemic part.
        std: (B, ...) float64, the square root of ``variance``.
        predicted_class: (B,) int64, argmax of ``mean``; None for regression outputs.
        predicted_label: B labels of ``predicted_class``; None for regression outputs and
            models without labels.
        predictive_entropy: (B,) float64, entropy of ``mean`` in nats (total uncertainty);
            None for regression.
        expected_entropy: (B,) float64, mean per-sample entropy (aleatoric part); None for
            regression.
        mutual_information: (B,) float64, their difference (BALD, epistemic part); None for
            regression.
        variation_ratio: (B,) float64, 1 - (votes for the modal class) / T; None for
            regression.
        samples: (B, T, ...) float64, every sample, rows first (for classifiers the
            per-sample probabilities); only when the call asked for ``return_samples``.
        aleatoric_variance: (B, ...) float64, the mean predicted variance; heteroscedastic
            regression outputs only (the model also predicts a variance for this output).
        total_variance: (B, ...) float64, ``variance + aleatoric_variance``, the predictive
            variance; heteroscedastic outputs only.
        intervals: per requested level, the gaussian then the empirical interval; regression
            outputs of a call with ``interval_levels`` only.
    """

    name: str
    semantics: Semantics
    mean: FloatArray
    variance: FloatArray
    std: FloatArray
    predicted_class: NDArray[np.int64] | None = None
    predicted_label: tuple[str, ...] | None = None
    predictive_entropy: FloatArray | None = None
    expected_entropy: FloatArray | None = None
    mutual_information: FloatArray | None = None
    variation_ratio: FloatArray | None = None
    samples: FloatArray | None = None
    aleatoric_variance: FloatArray | None = None
    total_variance: FloatArray | None = None
    intervals: tuple[Interval, ...] = ()

    @property
    def is_classification(self) -> bool:
        """True for logits or probabilities outputs (the classification measures are set)."""
        return self.predicted_class is not None

    @property
    def num_rows(self) -> int:
        """B, the number of rows."""
        return int(self.mean.shape[0])

    def interval(self, level: float, method: IntervalMethod = "empirical") -> Interval:
        """The interval at ``level`` by ``method``.

        Raises:
            KeyError: the call did not ask for this level (or the output is not regression).
        """
        for interval in self.intervals:
            if interval.method == method and math.isclose(interval.level, level):
                return interval
        have = sorted({i.level for i in self.intervals})
        raise KeyError(f"output {self.name!r} has no {method} interval at {level} (levels: {have})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays as nested lists, NaN and infinities as None; fields the call did
        not produce are None (``intervals``: an empty list)."""
        result: dict[str, Any] = {"name": self.name, "semantics": self.semantics}
        for key in ("mean", "variance", "std", "predicted_class"):
            result[key] = _jsonable(getattr(self, key))
        result["predicted_label"] = (
            None if self.predicted_label is None else list(self.predicted_label)
        )
        for key in _OPTIONAL_FLOAT_FIELDS:
            result[key] = _jsonable(getattr(self, key))
        result["intervals"] = [interval.to_dict() for interval in self.intervals]
        return result


_OPTIONAL_FLOAT_FIELDS = (
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
    "samples",
    "aleatoric_variance",
    "total_variance",
)


@dataclass(frozen=True, eq=False)
class Prediction:
    """The answer to one ``predict`` call.

    For single-output models, ``mean``, ``std``, ``predicted_label``, ... read the only output;
    with several outputs, pick one from ``outputs``.

    Attributes:
        model: the model name.
        version: the version that answered (decimal string).
        num_samples: T, the stochastic passes run per row (with adaptive sampling, the
            largest T of any row).
        outputs: one entry per model output, in the model's output order.
        num_samples_per_row: (B,) int64, the T of each row; adaptive sampling
            (``target_standard_error``) only, else None.
        seed: the seed the call sampled with (reproducible answers), or None.
    """

    model: str
    version: str
    num_samples: int
    outputs: Mapping[str, OutputPrediction]
    num_samples_per_row: NDArray[np.int64] | None = None
    seed: int | None = None

    @property
    def output(self) -> OutputPrediction:
        """The only output of a single-output model.

        Raises:
            ValueError: the model has several outputs.
        """
        if len(self.outputs) != 1:
            raise ValueError(
                f"model {self.model!r} has outputs {list(self.outputs)}: pick one from .outputs"
            )
        return next(iter(self.outputs.values()))

    @property
    def num_rows(self) -> int:
        """B, the number of rows."""
        return next(iter(self.outputs.values())).num_rows if self.outputs else 0

    @property
    def mean(self) -> FloatArray:
        return self.output.mean

    @property
    def variance(self) -> FloatArray:
        return self.output.variance

    @property
    def std(self) -> FloatArray:
        return self.output.std

    @property
    def predicted_class(self) -> NDArray[np.int64] | None:
        return self.output.predicted_class

    @property
    def predicted_label(self) -> tuple[str, ...] | None:
        return self.output.predicted_label

    @property
    def predictive_entropy(self) -> FloatArray | None:
        return self.output.predictive_entropy

    @property
    def expected_entropy(self) -> FloatArray | None:
        return self.output.expected_entropy

    @property
    def mutual_information(self) -> FloatArray | None:
        return self.output.mutual_information

    @property
    def variation_ratio(self) -> FloatArray | None:
        return self.output.variation_ratio

    @property
    def samples(self) -> FloatArray | None:
        return self.output.samples

    @property
    def aleatoric_variance(self) -> FloatArray | None:
        return self.output.aleatoric_variance

    @property
    def total_variance(self) -> FloatArray | None:
        return self.output.total_variance

    @property
    def intervals(self) -> tuple[Interval, ...]:
        return self.output.intervals

    def interval(self, level: float, method: IntervalMethod = "empirical") -> Interval:
        """The only output's interval at ``level`` (see :meth:`OutputPrediction.interval`)."""
        return self.output.interval(level, method)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays as nested lists, NaN and infinities as None."""
        return {
            "model": self.model,
            "version": self.version,
            "num_samples": self.num_samples,
            "num_samples_per_row": _jsonable(self.num_samples_per_row),
            "seed": self.seed,
            "outputs": {name: out.to_dict() for name, out in self.outputs.items()},
        }


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a model.

    Attributes:
        name: the tensor's name.
        dtype: its numpy dtype (inputs must be sent with exactly this dtype).
        shape: its shape, -1 for the batch dimension (first) and for dynamic axes.
        semantics: for outputs, what the values mean; None for inputs.
        max_shape: inputs with dynamic axes: the shape with each dynamic axis's largest size.
        labels: class outputs: the name of each class, when the model has them.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    semantics: Semantics | None = None
    max_shape: tuple[int, ...] | None = None
    labels: tuple[str, ...] = ()

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one row: ``shape`` without the batch dimension."""
        return self.shape[1:]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "dtype": self.dtype.name,
            "shape": list(self.shape),
            "semantics": self.semantics,
            "max_shape": None if self.max_shape is None else list(self.max_shape),
            "labels": list(self.labels),
        }


@dataclass(frozen=True)
class DropoutLayer:
    """A dropout module of the exported model: its path, type and rate p."""

    module: str
    type: str
    p: float


@dataclass(frozen=True)
class ModelInfo:
    """One model version as ``GetModelMetadata`` describes it.

    Attributes:
        name: the model name.
        version: the version described.
        versions: every loaded version, newest first.
        task: classification or regression.
        description: free text from the model's config.
        inputs: what ``predict`` takes.
        outputs: what the model computes (statistics are answered per output).
        labels: class labels of a classifier (may be empty).
        default_num_samples: T when a call gives none.
        max_num_samples: the largest T a call may ask for (the cap of adaptive sampling).
        provider: the ONNX Runtime execution provider that really runs the model
            (``CUDAExecutionProvider`` or ``CPUExecutionProvider``).
        opset: the ONNX opset of the exported graph.
        dropout: the dropout layers of the exported model.
        verified: True when the export verification against PyTorch MC dropout passed.
        weights_sha256: SHA-256 (hex) of the PyTorch model's floating-point weights
            (its state_dict tensors, in order) as exported, from ``metadata.json``; not a
            digest of ``model.onnx``. Empty when the version has no ``metadata.json``.
        precision: "fp32", or "fp16" (the graph computes in float16 behind float32 inputs
            and outputs).
    """

    name: str
    version: str
    versions: tuple[str, ...]
    task: Task
    description: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    labels: tuple[str, ...]
    default_num_samples: int
    max_num_samples: int
    provider: str
    opset: int
    dropout: tuple[DropoutLayer, ...]
    verified: bool
    weights_sha256: str
    precision: str = "fp32"

    def input(self, name: str | None = None) -> TensorInfo:
        """The input called ``name``, or the only input when ``name`` is None.

        Raises:
            ValueError: no such input, or ``name`` is None and the model has several.
        """
        names = [spec.name for spec in self.inputs]
        if name is None:
            if len(self.inputs) != 1:
                raise ValueError(
                    f"model {self.name!r} has inputs {names}: pass a dict or input_name"
                )
            return self.inputs[0]
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise ValueError(f"model {self.name!r} has no input {name!r} (inputs: {names})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "version": self.version,
            "versions": list(self.versions),
            "task": self.task,
            "description": self.description,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "labels": list(self.labels),
            "default_num_samples": self.default_num_samples,
            "max_num_samples": self.max_num_samples,
            "provider": self.provider,
            "opset": self.opset,
            "dropout": [{"module": d.module, "type": d.type, "p": d.p} for d in self.dropout],
            "verified": self.verified,
            "weights_sha256": self.weights_sha256,
            "precision": self.precision,
        }


@dataclass(frozen=True)
class ModelSummary:
    """One entry of ``list_models``.

    Attributes:
        name: the model name.
        versions: loaded versions, newest first.
        task: classification, regression or mixed ("unspecified" when none is loaded).
        ready: True when a version is loaded and serving.
        reason: when not ready, why (the newest version's load failure, say).
        version_states: every version the server holds: (version, state, reason), state one
            of "ready", "loading", "unavailable", "unloading".
    """

    name: str
    versions: tuple[str, ...]
    task: Task
    ready: bool
    reason: str = ""
    version_states: tuple[tuple[str, str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "name": self.name,
            "versions": list(self.versions),
            "task": self.task,
            "ready": self.ready,
            "reason": self.reason,
            "version_states": [list(v) for v in self.version_states],
        }


def _jsonable(array: NDArray[Any] | None) -> Any:
    """Nested lists with NaN and infinities as None (strict JSON has neither)."""
    if array is None:
        return None
    if array.dtype.kind != "f":
        return array.tolist()
    return _replace_non_finite(array.tolist())


def _replace_non_finite(value: Any) -> Any:
    if isinstance(value, list):
        return [_replace_non_finite(v) for v in value]
    return value if math.isfinite(value) else None
