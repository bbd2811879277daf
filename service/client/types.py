"""What the client returns: frozen dataclasses holding read-only numpy arrays.

Shapes: B is the number of rows sent, C the number of classes; every statistic keeps the batch
dimension first, even for a single row.
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
    "ModelInfo",
    "ModelSummary",
    "OutputPrediction",
    "Prediction",
    "Semantics",
    "Task",
    "TensorInfo",
]

Task = Literal["classification", "regression", "unspecified"]
Semantics = Literal["logits", "probabilities", "values", "unspecified"]


@dataclass(frozen=True, eq=False)
class OutputPrediction:
    """The statistics of one model output over the T stochastic passes.

    Attributes:
        name: the output's name.
        semantics: ``"logits"`` or ``"probabilities"`` (a classifier output) or ``"values"``.
        mean: (B, ...) float64, the mean over samples; for classifiers the mean of the
            per-sample probabilities, (B, C).
        variance: (B, ...) float64, unbiased (divisor T - 1); NaN when T = 1.
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
    """

    name: str
    semantics: Semantics
    mean: NDArray[np.float64]
    variance: NDArray[np.float64]
    std: NDArray[np.float64]
    predicted_class: NDArray[np.int64] | None = None
    predicted_label: tuple[str, ...] | None = None
    predictive_entropy: NDArray[np.float64] | None = None
    expected_entropy: NDArray[np.float64] | None = None
    mutual_information: NDArray[np.float64] | None = None
    variation_ratio: NDArray[np.float64] | None = None

    @property
    def is_classification(self) -> bool:
        """True for logits or probabilities outputs (the classification measures are set)."""
        return self.predicted_class is not None

    @property
    def num_rows(self) -> int:
        """B, the number of rows."""
        return int(self.mean.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays as nested lists, NaN and infinities as None."""
        result: dict[str, Any] = {"name": self.name, "semantics": self.semantics}
        for key in ("mean", "variance", "std", "predicted_class"):
            result[key] = _jsonable(getattr(self, key))
        result["predicted_label"] = (
            None if self.predicted_label is None else list(self.predicted_label)
        )
        for key in (
            "predictive_entropy",
            "expected_entropy",
            "mutual_information",
            "variation_ratio",
        ):
            result[key] = _jsonable(getattr(self, key))
        return result


@dataclass(frozen=True, eq=False)
class Prediction:
    """The answer to one ``predict`` call.

    For single-output models, ``mean``, ``std``, ``predicted_label``, ... read the only output;
    with several outputs, pick one from ``outputs``.

    Attributes:
        model: the model name.
        version: the version that answered (decimal string).
        num_samples: T, the stochastic passes run per row.
        outputs: one entry per model output, in the model's output order.
    """

    model: str
    version: str
    num_samples: int
    outputs: Mapping[str, OutputPrediction]

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
    def mean(self) -> NDArray[np.float64]:
        return self.output.mean

    @property
    def variance(self) -> NDArray[np.float64]:
        return self.output.variance

    @property
    def std(self) -> NDArray[np.float64]:
        return self.output.std

    @property
    def predicted_class(self) -> NDArray[np.int64] | None:
        return self.output.predicted_class

    @property
    def predicted_label(self) -> tuple[str, ...] | None:
        return self.output.predicted_label

    @property
    def predictive_entropy(self) -> NDArray[np.float64] | None:
        return self.output.predictive_entropy

    @property
    def expected_entropy(self) -> NDArray[np.float64] | None:
        return self.output.expected_entropy

    @property
    def mutual_information(self) -> NDArray[np.float64] | None:
        return self.output.mutual_information

    @property
    def variation_ratio(self) -> NDArray[np.float64] | None:
        return self.output.variation_ratio

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: arrays as nested lists, NaN and infinities as None."""
        return {
            "model": self.model,
            "version": self.version,
            "num_samples": self.num_samples,
            "outputs": {name: out.to_dict() for name, out in self.outputs.items()},
        }


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of a model.

    Attributes:
        name: the tensor's name.
        dtype: its numpy dtype (inputs must be sent with exactly this dtype).
        shape: its shape, -1 for the batch dimension (first).
        semantics: for outputs, what the values mean; None for inputs.
    """

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    semantics: Semantics | None = None

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one row: ``shape`` without the batch dimension."""
        return self.shape[1:]


@dataclass(frozen=True)
class DropoutLayer:
    """A dropout module of the exported model: its path, type and rate p."""

    module: str
    type: str
    p: float


@dataclass(frozen=True)
class ModelInfo:
    """One model version as ``GetModelMetadata`` describes it."""

    name: str
    version: str
    #: every loaded version, newest first
    versions: tuple[str, ...]
    task: Task
    description: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    labels: tuple[str, ...]
    default_num_samples: int
    max_num_samples: int
    #: the ONNX Runtime execution provider that runs the model
    provider: str
    opset: int
    dropout: tuple[DropoutLayer, ...]
    #: True when the export verification against PyTorch MC dropout passed
    verified: bool
    weights_sha256: str

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


@dataclass(frozen=True)
class ModelSummary:
    """One entry of ``list_models``."""

    name: str
    #: loaded versions, newest first
    versions: tuple[str, ...]
    task: Task
    #: True when the newest version is loaded and serving
    ready: bool


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
