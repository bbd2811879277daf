"""Arguments and numpy inputs -> request messages, and response messages -> result types.

No I/O here: the shared core of the sync and asyncio clients, the CLI and the Open Inference
Protocol helpers use these functions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
import numpy as np
from numpy.typing import NDArray

from mcdropout_client._gen.mcdropout.v1 import mcdropout_pb2 as pb
from mcdropout_client._tensors import DTYPE_OF, decode_tensor, encode_tensor, native
from mcdropout_client.errors import ServerError
from mcdropout_client.types import (
    DropoutLayer,
    Interval,
    ModelInfo,
    ModelSummary,
    OutputPrediction,
    Prediction,
    Semantics,
    Task,
    TensorInfo,
)

#: One input: an ndarray with the model's dtype, or nested lists / tuples of numbers.
ArrayLike: TypeAlias = NDArray[Any] | Sequence[Any]
#: What ``predict`` accepts: one array for a single-input model, or input name -> array.
Inputs: TypeAlias = ArrayLike | Mapping[str, ArrayLike]

#: The largest seed: the wire field is a uint64.
MAX_SEED = 2**64 - 1

TASK_OF: dict[int, Task] = {
    pb.TASK_CLASSIFICATION: "classification",
    pb.TASK_REGRESSION: "regression",
    pb.TASK_MIXED: "mixed",
}
SEMANTICS_OF: dict[int, Semantics] = {
    pb.OUTPUT_SEMANTICS_LOGITS: "logits",
    pb.OUTPUT_SEMANTICS_PROBABILITIES: "probabilities",
    pb.OUTPUT_SEMANTICS_VALUES: "values",
    pb.OUTPUT_SEMANTICS_VARIANCE: "variance",
    pb.OUTPUT_SEMANTICS_LOG_VARIANCE: "log_variance",
}
#: (B,) statistics of classification outputs.
CLASSIFICATION_FIELDS = (
    "predicted_class",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
)
#: Statistics a call may or may not produce, besides the classification ones.
OPTIONAL_FIELDS = ("samples", "aleatoric_variance", "total_variance")


# --- arguments ------------------------------------------------------------------------------


def version_str(version: str | int | None) -> str:
    """The wire form of a version: a decimal string, empty for the newest."""
    if version is None:
        return ""
    if isinstance(version, bool) or not isinstance(version, int | str):
        raise TypeError(f"version must be a str, an int or None, got {version!r}")
    return str(version)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


@dataclass(frozen=True)
class PredictOptions:
    """The sampling options of one Predict call, checked.

    Build it with :meth:`of`. What only the model can tell (T above its maximum, intervals of a
    classifier, more than 8 levels, a level outside (0, 1), adaptive sampling combined with
    other options) is the server's to refuse, with INVALID_ARGUMENT.

    Attributes:
        num_samples: T; 0 selects the model's default (with adaptive sampling: the cap on T,
            0 for the model's maximum).
        return_samples: also answer every sample.
        interval_levels: central prediction interval levels (regression outputs).
        target_standard_error: adaptive sampling target, or None.
        seed: reproducible sampling, or None.
    """

    num_samples: int = 0
    return_samples: bool = False
    interval_levels: tuple[float, ...] = ()
    target_standard_error: float | None = None
    seed: int | None = None

    @classmethod
    def of(
        cls,
        num_samples: int | None = None,
        return_samples: bool = False,
        interval_levels: Iterable[float] = (),
        target_standard_error: float | None = None,
        seed: int | None = None,
    ) -> PredictOptions:
        """Check the options of a call (None: the server's default).

        Raises:
            ValueError: T < 1, a target standard error that is not a positive finite number,
                a seed outside 0..2^64-1, an interval level that is not finite.
            TypeError: an option of the wrong type.
        """
        if num_samples is None:
            samples = 0
        elif not _is_int(num_samples) or int(num_samples) < 1:
            raise ValueError(f"num_samples must be an integer >= 1 or None, got {num_samples!r}")
        else:
            samples = int(num_samples)
        if not isinstance(return_samples, bool | np.bool_):
            raise TypeError(f"return_samples must be a bool, got {return_samples!r}")
        if isinstance(interval_levels, str | bytes):
            raise TypeError(f"interval_levels must be numbers, got {interval_levels!r}")
        levels = tuple(interval_levels)
        if not all(_is_real(level) for level in levels):
            raise TypeError(f"interval_levels must be numbers, got {levels!r}")
        if not all(math.isfinite(level) for level in levels):
            raise ValueError(f"interval_levels must be finite, got {levels!r}")
        target = target_standard_error
        if target is not None and (
            not _is_real(target) or not (math.isfinite(target) and target > 0)
        ):
            raise ValueError(
                "target_standard_error must be a positive number (None turns adaptive sampling "
                f"off), got {target!r}"
            )
        if seed is not None and (not _is_int(seed) or not 0 <= int(seed) <= MAX_SEED):
            raise ValueError(f"seed must be an integer in 0..2^64-1 or None, got {seed!r}")
        return cls(
            num_samples=samples,
            return_samples=bool(return_samples),
            interval_levels=tuple(float(level) for level in levels),
            target_standard_error=None if target is None else float(target),
            seed=None if seed is None else int(seed),
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
    model: str, version: str, inputs: Mapping[str, NDArray[Any]], options: PredictOptions
) -> pb.PredictRequest:
    """The Predict message of checked inputs and options."""
    request = pb.PredictRequest(
        model=model,
        version=version,
        num_samples=options.num_samples,
        inputs=[pb.NamedTensor(name=k, tensor=encode_tensor(v)) for k, v in inputs.items()],
        return_samples=options.return_samples,
        interval_levels=options.interval_levels,
        target_standard_error=options.target_standard_error or 0.0,
    )
    if options.seed is not None:
        request.seed = options.seed
    return request


# --- responses ------------------------------------------------------------------------------


def _malformed(error: ValueError) -> ServerError:
    return ServerError(grpc.StatusCode.INTERNAL, f"malformed response: {error}")


def model_info_from_proto(metadata: pb.ModelMetadata) -> ModelInfo:
    """Decode GetModelMetadata's answer.

    Raises:
        ServerError: INTERNAL, a tensor spec with an unknown dtype.
    """
    try:
        inputs = tuple(_tensor_info(spec, output=False) for spec in metadata.inputs)
        outputs = tuple(_tensor_info(spec, output=True) for spec in metadata.outputs)
    except ValueError as error:
        raise _malformed(error) from error
    return ModelInfo(
        name=metadata.name,
        version=metadata.version,
        versions=tuple(metadata.versions),
        task=TASK_OF.get(metadata.task, "unspecified"),
        description=metadata.description,
        inputs=inputs,
        outputs=outputs,
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
        raise ValueError(f"tensor {spec.name!r}: unknown dtype {spec.dtype}")
    return TensorInfo(
        name=spec.name,
        dtype=native(dtype),
        shape=tuple(spec.shape),
        semantics=SEMANTICS_OF.get(spec.semantics, "unspecified") if output else None,
        max_shape=tuple(spec.max_shape) or None,
        labels=tuple(spec.labels),
    )


def model_summary_from_proto(summary: pb.ModelSummary) -> ModelSummary:
    """Decode one entry of ListModels' answer."""
    return ModelSummary(
        name=summary.name,
        versions=tuple(summary.versions),
        task=TASK_OF.get(summary.task, "unspecified"),
        ready=summary.ready,
    )


def prediction_from_proto(response: pb.PredictResponse, seed: int | None = None) -> Prediction:
    """Decode every statistic of a Predict answer.

    Args:
        response: the answer.
        seed: the seed of the request (the answer does not repeat it).

    Raises:
        ServerError: INTERNAL when a tensor of the response is malformed.
    """
    try:
        outputs = {out.name: _output_from_proto(out) for out in response.outputs}
        per_row = (
            decode_tensor(response.num_samples_per_row, "num_samples_per_row")
            if response.HasField("num_samples_per_row")
            else None
        )
    except ValueError as error:
        raise _malformed(error) from error
    return Prediction(
        model=response.model,
        version=response.version,
        num_samples=response.num_samples,
        outputs=outputs,
        num_samples_per_row=per_row,
        seed=seed,
    )


def _output_from_proto(out: pb.OutputStatistics) -> OutputPrediction:
    optional: dict[str, Any] = {
        name: decode_tensor(getattr(out, name), f"{out.name}.{name}")
        for name in (*CLASSIFICATION_FIELDS, *OPTIONAL_FIELDS)
        if out.HasField(name)
    }
    intervals = tuple(
        Interval(
            level=interval.level,
            method=interval.method,
            lower=decode_tensor(interval.lower, f"{out.name}.intervals[{i}].lower"),
            upper=decode_tensor(interval.upper, f"{out.name}.intervals[{i}].upper"),
        )
        for i, interval in enumerate(out.intervals)
    )
    return OutputPrediction(
        name=out.name,
        semantics=SEMANTICS_OF.get(out.semantics, "unspecified"),
        mean=decode_tensor(out.mean, f"{out.name}.mean"),
        variance=decode_tensor(out.variance, f"{out.name}.variance"),
        std=decode_tensor(out.std, f"{out.name}.std"),
        predicted_label=tuple(out.predicted_label) if out.predicted_label else None,
        intervals=intervals,
        **optional,
    )


# --- joining batches ------------------------------------------------------------------------


def _join(arrays: Sequence[NDArray[Any] | None], what: str) -> NDArray[Any] | None:
    if all(a is None for a in arrays):
        return None
    if any(a is None for a in arrays):
        raise ValueError(f"cannot join predictions where only some have {what}")
    return _join_all([a for a in arrays if a is not None])


def _join_all(arrays: Sequence[NDArray[Any]]) -> NDArray[Any]:
    joined = np.concatenate(arrays)
    joined.flags.writeable = False
    return joined


def concat_predictions(parts: Sequence[Prediction]) -> Prediction:
    """Join the predictions of consecutive batches of rows into one (rows in order).

    With adaptive sampling the parts may have different T; ``num_samples`` is then the
    largest, as in one answer.

    Raises:
        ValueError: no parts, or parts from different models, versions, outputs, seeds, T
            (without adaptive sampling) or options.
    """
    if not parts:
        raise ValueError("no predictions to join")
    first = parts[0]
    adaptive = first.num_samples_per_row is not None
    for part in parts[1:]:
        key = (part.model, part.version, list(part.outputs), part.seed)
        if key != (first.model, first.version, list(first.outputs), first.seed) or (
            not adaptive and part.num_samples != first.num_samples
        ):
            raise ValueError("cannot join predictions of different models, versions, T or outputs")
    outputs: dict[str, OutputPrediction] = {}
    for name, out in first.outputs.items():
        pieces = [part.outputs[name] for part in parts]
        arrays: dict[str, Any] = {
            key: _join([getattr(piece, key) for piece in pieces], key)
            for key in ("mean", "variance", "std", *CLASSIFICATION_FIELDS, *OPTIONAL_FIELDS)
        }
        labels = [piece.predicted_label for piece in pieces]
        if any((label is None) != (labels[0] is None) for label in labels):
            raise ValueError("cannot join predictions where only some have labels")
        keys = [[(i.level, i.method) for i in piece.intervals] for piece in pieces]
        if any(k != keys[0] for k in keys):
            raise ValueError("cannot join predictions with different interval levels")
        intervals = tuple(
            Interval(
                level=interval.level,
                method=interval.method,
                lower=_join_all([piece.intervals[i].lower for piece in pieces]),
                upper=_join_all([piece.intervals[i].upper for piece in pieces]),
            )
            for i, interval in enumerate(out.intervals)
        )
        outputs[name] = OutputPrediction(
            name=name,
            semantics=out.semantics,
            predicted_label=None
            if labels[0] is None
            else tuple(label for part in labels for label in part or ()),
            intervals=intervals,
            **arrays,
        )
    return Prediction(
        model=first.model,
        version=first.version,
        num_samples=max(part.num_samples for part in parts),
        outputs=outputs,
        num_samples_per_row=_join([p.num_samples_per_row for p in parts], "num_samples_per_row"),
        seed=first.seed,
    )
