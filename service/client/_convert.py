"""numpy inputs -> ``PredictRequest``, and responses -> the result types of ``types.py``.

No I/O here: the sync and asyncio clients, and the CLI, share these functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias, cast

import grpc
import numpy as np
from numpy.typing import NDArray

from service.client.errors import ClientError
from service.client.types import (
    DropoutLayer,
    ModelInfo,
    ModelSummary,
    OutputPrediction,
    Prediction,
    Semantics,
    Task,
    TensorInfo,
)
from service.errors import InvalidInput
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.protocol.codec import DTYPE_OF, decode_tensor, encode_tensor

#: One input: an ndarray with the model's dtype, or nested lists / tuples of numbers.
ArrayLike: TypeAlias = NDArray[Any] | Sequence[Any]
#: What ``predict`` accepts: one array for a single-input model, or input name -> array.
Inputs: TypeAlias = ArrayLike | Mapping[str, ArrayLike]

_TASKS: dict[int, Task] = {
    pb.TASK_CLASSIFICATION: "classification",
    pb.TASK_REGRESSION: "regression",
}
_SEMANTICS: dict[int, Semantics] = {
    pb.OUTPUT_SEMANTICS_LOGITS: "logits",
    pb.OUTPUT_SEMANTICS_PROBABILITIES: "probabilities",
    pb.OUTPUT_SEMANTICS_VALUES: "values",
}
_CLASSIFICATION_FIELDS = (
    "predicted_class",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
)


def version_str(version: str | int | None) -> str:
    """The wire form of a version: a decimal string, empty for the newest."""
    if version is None:
        return ""
    if isinstance(version, bool) or not isinstance(version, int | str):
        raise TypeError(f"version must be a str, an int or None, got {version!r}")
    return str(version)


def num_samples_field(num_samples: int | None) -> int:
    """The wire form of T: 0 selects the model's default."""
    if num_samples is None:
        return 0
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1 or None, got {num_samples!r}")
    return num_samples


def model_info_from_proto(metadata: pb.ModelMetadata) -> ModelInfo:
    return ModelInfo(
        name=metadata.name,
        version=metadata.version,
        versions=tuple(metadata.versions),
        task=_TASKS.get(metadata.task, "unspecified"),
        description=metadata.description,
        inputs=tuple(_tensor_info(spec, output=False) for spec in metadata.inputs),
        outputs=tuple(_tensor_info(spec, output=True) for spec in metadata.outputs),
        labels=tuple(metadata.labels),
        default_num_samples=metadata.default_num_samples,
        max_num_samples=metadata.max_num_samples,
        provider=metadata.provider,
        opset=metadata.opset,
        dropout=tuple(DropoutLayer(d.module, d.type, d.p) for d in metadata.dropout),
        verified=metadata.verified,
        weights_sha256=metadata.weights_sha256,
    )


def _tensor_info(spec: pb.TensorSpec, *, output: bool) -> TensorInfo:
    dtype = DTYPE_OF.get(spec.dtype)
    if dtype is None:
        raise ClientError(
            grpc.StatusCode.INTERNAL, f"tensor {spec.name!r}: unknown dtype {spec.dtype}"
        )
    return TensorInfo(
        name=spec.name,
        dtype=dtype.newbyteorder("="),
        shape=tuple(spec.shape),
        semantics=_SEMANTICS.get(spec.semantics, "unspecified") if output else None,
    )


def model_summary_from_proto(summary: pb.ModelSummary) -> ModelSummary:
    return ModelSummary(
        name=summary.name,
        versions=tuple(summary.versions),
        task=_TASKS.get(summary.task, "unspecified"),
        ready=summary.ready,
    )


def prediction_from_proto(response: pb.PredictResponse) -> Prediction:
    """Decode every statistic of a response.

    Raises:
        ClientError: INTERNAL when a tensor of the response is malformed.
    """
    try:
        outputs = {out.name: _output_from_proto(out) for out in response.outputs}
    except InvalidInput as error:
        raise ClientError(grpc.StatusCode.INTERNAL, f"malformed response: {error}") from error
    return Prediction(
        model=response.model,
        version=response.version,
        num_samples=response.num_samples,
        outputs=outputs,
    )


def _output_from_proto(out: pb.OutputStatistics) -> OutputPrediction:
    classification: dict[str, Any] = {
        name: decode_tensor(getattr(out, name), f"{out.name}.{name}")
        for name in _CLASSIFICATION_FIELDS
        if out.HasField(name)
    }
    return OutputPrediction(
        name=out.name,
        semantics=_SEMANTICS.get(out.semantics, "unspecified"),
        mean=decode_tensor(out.mean, f"{out.name}.mean"),
        variance=decode_tensor(out.variance, f"{out.name}.variance"),
        std=decode_tensor(out.std, f"{out.name}.std"),
        predicted_label=tuple(out.predicted_label) if out.predicted_label else None,
        **classification,
    )


def prepare_inputs(
    info: ModelInfo, x: Inputs, input_name: str | None = None
) -> dict[str, NDArray[Any]]:
    """Name, check and shape the inputs of one request against the model's metadata.

    Args:
        info: the model version's metadata.
        x: one array (single-input models, or with ``input_name``) or input name -> array.
            An ndarray must have the model's dtype exactly; nested lists are converted to it
            when that loses no kind (ints to floats: yes; floats to ints: no). An array
            holding one row, without the batch dimension, gets one (B = 1).
        input_name: the input that ``x`` feeds, when ``x`` is not a dict.

    Returns:
        Input name -> array of shape (B, ...), in the order given.

    Raises:
        ValueError: unknown input name, several inputs but no dict, a dtype mismatch.
    """
    if isinstance(x, Mapping):
        if input_name is not None:
            raise ValueError("input_name is for a single array; a dict already names its inputs")
        named = dict(x)
        if not named:
            raise ValueError(f"no inputs given for model {info.name!r}")
    else:
        named = {info.input(input_name).name: x}
    return {name: _as_input_array(info, info.input(name), value) for name, value in named.items()}


def _as_input_array(info: ModelInfo, spec: TensorInfo, value: ArrayLike) -> NDArray[Any]:
    if isinstance(value, np.ndarray):
        if value.dtype != spec.dtype:
            raise ValueError(
                f"input {spec.name!r} of model {info.name!r} is {spec.dtype.name}, got "
                f"{value.dtype.name} (no silent casts: convert with .astype(np.{spec.dtype.name}))"
            )
        array = value
    else:
        array = as_dtype(np.asarray(value), spec.dtype, spec.name)
    if array.ndim == len(spec.shape) - 1:
        array = array[np.newaxis]  # one row without its batch dimension
    return array


def as_dtype(array: NDArray[Any], dtype: np.dtype[Any], name: str) -> NDArray[Any]:
    """Convert parsed numbers (lists, JSON, CSV) to the model's dtype when no kind is lost.

    Floats that hold whole numbers may become integers (CSV and JSON numbers are often
    written ``1.0``); other float values may not.

    Raises:
        ValueError: the values are not numbers, or would change kind.
    """
    if array.dtype == dtype:
        return array
    if array.dtype.kind not in "biuf":
        raise ValueError(f"input {name!r}: values must be numbers, got {array.dtype.name}")
    if np.can_cast(array.dtype, dtype, casting="same_kind"):
        return array.astype(dtype)
    if array.dtype.kind == "f" and dtype.kind in "iu" and np.array_equal(array, np.round(array)):
        return array.astype(dtype)
    raise ValueError(f"input {name!r}: cannot convert {array.dtype.name} values to {dtype.name}")


def predict_request(
    model: str, version: str, inputs: Mapping[str, NDArray[Any]], num_samples: int
) -> pb.PredictRequest:
    return pb.PredictRequest(
        model=model,
        version=version,
        num_samples=num_samples,
        inputs=[pb.NamedTensor(name=k, tensor=encode_tensor(v)) for k, v in inputs.items()],
    )


def concat_predictions(parts: Sequence[Prediction]) -> Prediction:
    """Join the predictions of consecutive batches of rows into one (rows in order).

    Raises:
        ValueError: no parts, or parts from different models, versions, T or outputs.
    """
    if not parts:
        raise ValueError("no predictions to join")
    first = parts[0]
    for part in parts[1:]:
        same = (part.model, part.version, part.num_samples, list(part.outputs))
        if same != (first.model, first.version, first.num_samples, list(first.outputs)):
            raise ValueError("cannot join predictions of different models, versions, T or outputs")
    outputs: dict[str, OutputPrediction] = {}
    for name, out in first.outputs.items():
        pieces = [part.outputs[name] for part in parts]
        arrays: dict[str, Any] = {}
        for key in ("mean", "variance", "std", *_CLASSIFICATION_FIELDS):
            values = [getattr(piece, key) for piece in pieces]
            arrays[key] = None if values[0] is None else np.concatenate(values)
        labels = [piece.predicted_label for piece in pieces]
        outputs[name] = OutputPrediction(
            name=name,
            semantics=out.semantics,
            predicted_label=None
            if labels[0] is None
            else tuple(label for part in labels for label in cast(tuple[str, ...], part)),
            **arrays,
        )
    return Prediction(first.model, first.version, first.num_samples, outputs)
