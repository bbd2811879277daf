"""Open Inference Protocol tensors <-> numpy, and the statistic outputs of a Predict result.

Inputs arrive either raw (one little-endian, row-major blob per input, in the order of
``inputs``) or as typed contents; never both in one request. Outputs always leave raw:
tritonclient decodes only ``raw_output_contents``.

Output naming: every model output ``<out>`` gives the statistic outputs

==============================  ========  ================  ==================================
name                            datatype  shape             what
==============================  ========  ================  ==================================
``<out>_mean``                  FP64      the output's      mean over the T samples
``<out>_variance``              FP64      the output's      unbiased variance (ddof = 1)
``<out>_std``                   FP64      the output's      its square root
``<out>_aleatoric_variance``    FP64      the output's      mean predicted variance (models
                                                            with a variance output for <out>)
``<out>_total_variance``        FP64      the output's      variance + aleatoric_variance
``<out>_predicted_class``       INT64     [B]               argmax of the mean (classifiers)
``<out>_predicted_label``       BYTES     [B]               its label (classifiers with labels)
``<out>_entropy``               FP64      [B]               predictive entropy, nats
``<out>_expected_entropy``      FP64      [B]               mean per-sample entropy (aleatoric)
``<out>_mutual_information``    FP64      [B]               their difference (BALD, epistemic)
``<out>_variation_ratio``       FP64      [B]               1 - modal votes / T
==============================  ========  ================  ==================================

Names cannot collide: a classification model has exactly one output, and the regression
suffixes all end differently.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.core.dataplane import OutputResult, PredictResult
from service.errors import InvalidInput
from service.gen.inference import grpc_service_pb2 as oip
from service.maths.uncertainty import RegressionStats
from service.repository import ModelConfig, Semantics, Task, TensorSpec

__all__ = [
    "DTYPE_OF",
    "MC_INTERVAL_LEVELS",
    "MC_RETURN_SAMPLES",
    "MC_SAMPLES",
    "MC_SEED",
    "MC_TARGET_STANDARD_ERROR",
    "OIP_DATATYPE_OF",
    "SAMPLES_PER_ROW",
    "McOptions",
    "OutputTensor",
    "decode_inputs",
    "encode_extra_outputs",
    "encode_outputs",
    "extra_output_names",
    "mc_options_of",
    "mc_samples_of",
    "output_metadata",
    "requested_outputs",
    "tensor_metadata",
]

#: The request parameter that sets T (int64; 0 or absent: the model's default).
MC_SAMPLES = "mc_samples"

#: OIP datatype -> numpy dtype (little-endian: the wire order). BYTES and BF16 are not inputs
#: any model here takes.
DTYPE_OF: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: numpy dtype name -> OIP datatype.
OIP_DATATYPE_OF: dict[str, str] = {dtype.name: name for name, dtype in DTYPE_OF.items()}

#: OIP datatype -> the typed-contents field that carries it (FP16 travels only raw).
_CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_ALL_CONTENTS_FIELDS = (*sorted(set(_CONTENTS_FIELD.values())), "bytes_contents")
#: Tensor parameters that ask for features this server does not have: refused, not ignored.
_UNSUPPORTED_TENSOR_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported; send the data in the request",
    "classification": "the classification extension is not supported; request "
    "<out>_predicted_class or <out>_predicted_label instead",
}


def _has_typed_contents(tensor: oip.ModelInferRequest.InferInputTensor) -> bool:
    return any(len(getattr(tensor.contents, f)) for f in _ALL_CONTENTS_FIELDS)


def _check_tensor_parameters(kind: str, name: str, parameters: Mapping[str, Any]) -> None:
    for key, reason in _UNSUPPORTED_TENSOR_PARAMETERS.items():
        if key in parameters:
            raise InvalidInput(f"{kind} {name!r}: parameter {key!r}: {reason}")


def _input_shape(tensor: oip.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if not shape:
        raise InvalidInput(
            f"input {tensor.name!r}: shape is empty; a batch needs at least one dimension"
        )
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {tensor.name!r}: negative dimension in shape {list(shape)}")
    return shape


def _dtype_of(tensor: oip.ModelInferRequest.InferInputTensor) -> np.dtype[Any]:
    dtype = DTYPE_OF.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(
            f"input {tensor.name!r}: unsupported datatype {tensor.datatype!r} (supported: "
            f"{', '.join(DTYPE_OF)})"
        )
    return dtype


def _decode_raw(
    tensor: oip.ModelInferRequest.InferInputTensor, blob: bytes, dtype: np.dtype[Any]
) -> NDArray[Any]:
    shape = _input_shape(tensor)
    count = int(np.prod(shape, dtype=np.int64))
    expected = count * dtype.itemsize
    if len(blob) != expected:
        raise InvalidInput(
            f"input {tensor.name!r}: {len(blob)} bytes of raw contents for shape {list(shape)} "
            f"of {tensor.datatype} (expected {expected})"
        )
    if dtype == np.dtype("?") and count and np.frombuffer(blob, np.uint8).max() > 1:
        raise InvalidInput(f"input {tensor.name!r}: BOOL bytes must be 0 or 1")
    array = np.frombuffer(blob, dtype=dtype, count=count).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _decode_typed(
    tensor: oip.ModelInferRequest.InferInputTensor, dtype: np.dtype[Any]
) -> NDArray[Any]:
    shape = _input_shape(tensor)
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(
            f"input {tensor.name!r}: {tensor.datatype} has no typed contents; send it in "
            "raw_input_contents"
        )
    present = [f for f in _ALL_CONTENTS_FIELDS if f != field and len(getattr(tensor.contents, f))]
    if present:
        raise InvalidInput(
            f"input {tensor.name!r}: {tensor.datatype} goes in contents.{field}, got "
            f"{', '.join(present)}"
        )
    values = getattr(tensor.contents, field)
    count = int(np.prod(shape, dtype=np.int64))
    if len(values) != count:
        raise InvalidInput(
            f"input {tensor.name!r}: {len(values)} values in contents.{field} for shape "
            f"{list(shape)} (expected {count})"
        )
    wide = np.asarray(list(values), dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and count:
        # int_contents / uint_contents are 32 bits wide: narrower types must be range-checked.
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(
                f"input {tensor.name!r}: values outside the range of {tensor.datatype} "
                f"({info.min}..{info.max})"
            )
    return wide.astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def decode_inputs(request: oip.ModelInferRequest) -> dict[str, NDArray[Any]]:
    """The input tensors of a ModelInfer request, by name, in native byte order.

    Datatype and shape are decoded as sent; whether they fit the model is the core's check.

    Raises:
        InvalidInput: raw and typed contents mixed, a raw blob count that is not one per
            input, a repeated input name, an unknown datatype (BYTES included), a negative or
            empty shape, a byte length or value count that does not match the shape, typed
            values out of range, or an unsupported tensor parameter (shared memory).
    """
    raw = request.raw_input_contents
    typed = [t.name for t in request.inputs if _has_typed_contents(t)]
    if raw and typed:
        raise InvalidInput(
            "a request carries either raw_input_contents or typed contents, not both (typed "
            f"contents in {typed})"
        )
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs (one per input, "
            "in order)"
        )
    inputs: dict[str, NDArray[Any]] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name in inputs:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        _check_tensor_parameters("input", tensor.name, tensor.parameters)
        dtype = _dtype_of(tensor)
        inputs[tensor.name] = (
            _decode_raw(tensor, raw[index], dtype) if raw else _decode_typed(tensor, dtype)
        )
    return inputs


def mc_samples_of(parameters: Mapping[str, oip.InferParameter]) -> int | None:
    """T from the request parameter ``mc_samples``; None for the model's default.

    Raises:
        InvalidInput: the parameter is not an integer (int64_param or uint64_param), or is
            negative.
    """
    if MC_SAMPLES not in parameters:
        return None
    parameter = parameters[MC_SAMPLES]
    choice = parameter.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidInput(
            f"parameter {MC_SAMPLES!r} must be an integer (int64_param), got {choice or 'unset'}"
        )
    value = int(getattr(parameter, choice))
    if value < 0:
        raise InvalidInput(f"parameter {MC_SAMPLES!r} must be >= 0 (0: model default), got {value}")
    return value or None


@dataclass(frozen=True)
class _Statistic:
    """One statistic output: its name suffix, datatype, and where it is read from."""

    suffix: str
    datatype: str
    #: the attribute of the output's stats (RegressionStats / ClassificationStats)
    attribute: str
    #: shape [B] rather than the model output's shape
    per_row: bool = False
    classification_only: bool = False
    #: only for values outputs with a declared variance output (heteroscedastic models)
    heteroscedastic_only: bool = False


_STATISTICS: tuple[_Statistic, ...] = (
    _Statistic("mean", "FP64", "mean"),
    _Statistic("variance", "FP64", "variance"),
    _Statistic("std", "FP64", "std"),
    _Statistic("aleatoric_variance", "FP64", "aleatoric_variance", heteroscedastic_only=True),
    _Statistic("total_variance", "FP64", "total_variance", heteroscedastic_only=True),
    _Statistic("predicted_class", "INT64", "predicted_class", True, True),
    # Read from predicted_class and the model's labels.
    _Statistic("predicted_label", "BYTES", "predicted_class", True, True),
    _Statistic("entropy", "FP64", "predictive_entropy", True, True),
    _Statistic("expected_entropy", "FP64", "expected_entropy", True, True),
    _Statistic("mutual_information", "FP64", "mutual_information", True, True),
    _Statistic("variation_ratio", "FP64", "variation_ratio", True, True),
)


def _read(stat: _Statistic, result: OutputResult, labels: tuple[str, ...]) -> NDArray[Any]:
    value: NDArray[Any] = getattr(result.stats, stat.attribute)
    if stat.datatype == "BYTES":
        return np.array([labels[int(c)].encode() for c in value], dtype=object)
    return value


def _statistics_of(config: ModelConfig) -> list[tuple[str, TensorSpec, _Statistic]]:
    """(output name, model output, statistic) for every statistic output, in order."""
    classifier = config.task is Task.CLASSIFICATION
    return [
        (f"{spec.name}_{stat.suffix}", spec, stat)
        for spec in config.outputs
        for stat in _STATISTICS
        if (classifier or not stat.classification_only)
        and (stat.suffix != "predicted_label" or config.labels)
        and (not stat.heteroscedastic_only or config.variance_output(spec.name) is not None)
    ]


def tensor_metadata(spec: TensorSpec) -> oip.ModelMetadataResponse.TensorMetadata:
    """Metadata of a model input: OIP datatype, shape with -1 for the batch."""
    return oip.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=OIP_DATATYPE_OF[spec.dtype.name], shape=list(spec.shape)
    )


def output_metadata(config: ModelConfig) -> list[oip.ModelMetadataResponse.TensorMetadata]:
    """Metadata of every statistic output of a model, in answer order."""
    return [
        oip.ModelMetadataResponse.TensorMetadata(
            name=name, datatype=stat.datatype, shape=[-1] if stat.per_row else list(spec.shape)
        )
        for name, spec, stat in _statistics_of(config)
    ]


MC_RETURN_SAMPLES = "mc_return_samples"
MC_INTERVAL_LEVELS = "mc_interval_levels"
MC_TARGET_STANDARD_ERROR = "mc_target_standard_error"
MC_SEED = "mc_seed"
SAMPLES_PER_ROW = "mc_samples_per_row"


@dataclass(frozen=True)
class McOptions:
    """The optional request parameters beyond ``mc_samples`` (see the Predict fields of the
    same names)."""

    return_samples: bool = False
    interval_levels: tuple[float, ...] = ()
    target_standard_error: float | None = None
    seed: int | None = None


def _parameter(
    parameters: Mapping[str, oip.InferParameter], name: str, kinds: tuple[str, ...]
) -> Any:
    if name not in parameters:
        return None
    choice = parameters[name].WhichOneof("parameter_choice")
    if choice not in kinds:
        raise InvalidInput(
            f"parameter {name!r} must be one of {', '.join(kinds)}, got {choice or 'unset'}"
        )
    return getattr(parameters[name], choice)


def mc_options_of(parameters: Mapping[str, oip.InferParameter]) -> McOptions:
    """``mc_return_samples`` (bool), ``mc_interval_levels`` (string, e.g. "0.9,0.95") and
    ``mc_target_standard_error`` (double or int).

    Raises:
        InvalidInput: a parameter of the wrong type or an unparsable level list (the values
            themselves are checked by the core).
    """
    levels_text = _parameter(parameters, MC_INTERVAL_LEVELS, ("string_param",))
    try:
        levels = tuple(float(x) for x in levels_text.split(",")) if levels_text else ()
    except ValueError:
        raise InvalidInput(
            f"parameter {MC_INTERVAL_LEVELS!r} must be comma-separated numbers, got {levels_text!r}"
        ) from None
    target = _parameter(
        parameters, MC_TARGET_STANDARD_ERROR, ("double_param", "int64_param", "uint64_param")
    )
    seed = _parameter(parameters, MC_SEED, ("int64_param", "uint64_param"))
    if seed is not None and not 0 <= seed < 2**64:
        raise InvalidInput(f"parameter {MC_SEED!r} must be in 0..2^64-1, got {seed}")
    return McOptions(
        seed=seed,
        return_samples=bool(_parameter(parameters, MC_RETURN_SAMPLES, ("bool_param",))),
        interval_levels=levels,
        target_standard_error=None if target is None else float(target),
    )


def _interval_name(output: str, method: str, level: float, bound: str) -> str:
    return f"{output}_interval_{method}_{level:g}_{bound}"


def extra_output_names(config: ModelConfig, options: McOptions) -> list[str]:
    """The outputs that exist only when the request asks for them, in answer order: raw
    samples, interval bounds, and the per-row T of adaptive sampling."""
    names: list[str] = []
    for spec in config.outputs:
        if options.return_samples:
            names.append(f"{spec.name}_samples")
        if spec.semantics is Semantics.VALUES:
            for level in options.interval_levels:
                for method in ("gaussian", "empirical"):
                    names += [
                        _interval_name(spec.name, method, level, b) for b in ("lower", "upper")
                    ]
    if options.target_standard_error is not None:
        names.append(SAMPLES_PER_ROW)
    return names


def encode_extra_outputs(result: PredictResult, names: Sequence[str]) -> list[OutputTensor]:
    """The outputs ``names`` among :func:`extra_output_names` of a Predict result."""
    arrays: dict[str, NDArray[Any]] = {}
    for out in result.outputs:
        if out.stats.samples is not None:
            arrays[f"{out.spec.name}_samples"] = out.stats.samples
        if isinstance(out.stats, RegressionStats):
            for interval in out.stats.intervals:
                arrays[_interval_name(out.spec.name, interval.method, interval.level, "lower")] = (
                    interval.lower
                )
                arrays[_interval_name(out.spec.name, interval.method, interval.level, "upper")] = (
                    interval.upper
                )
    if result.num_samples_per_row is not None:
        arrays[SAMPLES_PER_ROW] = result.num_samples_per_row
    encoded = []
    for name in names:
        array = arrays[name]
        datatype = "INT64" if name == SAMPLES_PER_ROW else "FP64"
        encoded.append(
            OutputTensor(name, datatype, tuple(array.shape), _raw_bytes(array, datatype))
        )
    return encoded


def requested_outputs(
    config: ModelConfig,
    requested: Sequence[oip.ModelInferRequest.InferRequestedOutputTensor],
    extra: Sequence[str] = (),
) -> list[str]:
    """The statistic outputs to answer, in answer order: all of them when none is requested.

    Raises:
        InvalidInput: an unknown or repeated name, or an unsupported output parameter.
    """
    available = [name for name, _, _ in _statistics_of(config)] + list(extra)
    if not requested:
        return available
    names: list[str] = []
    for output in requested:
        if output.name not in available:
            raise InvalidInput(
                f"model {config.name!r} has no output {output.name!r} (outputs: "
                f"{', '.join(available)})"
            )
        if output.name in names:
            raise InvalidInput(f"output {output.name!r} is requested twice")
        _check_tensor_parameters("output", output.name, output.parameters)
        names.append(output.name)
    return names


@dataclass(frozen=True)
class OutputTensor:
    """One encoded output: metadata plus its raw contents."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes


def _raw_bytes(array: NDArray[Any], datatype: str) -> bytes:
    if datatype == "BYTES":
        # Each element: a 4-byte little-endian length, then the bytes.
        return b"".join(struct.pack("<I", len(item)) + item for item in array.ravel())
    dtype = DTYPE_OF[datatype]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def encode_outputs(
    result: PredictResult, config: ModelConfig, names: Sequence[str]
) -> list[OutputTensor]:
    """The outputs ``names`` (from :func:`requested_outputs`) of a Predict result."""
    by_output = {r.spec.name: r for r in result.outputs}
    table = {name: (spec, stat) for name, spec, stat in _statistics_of(config)}
    extras = {t.name: t for t in encode_extra_outputs(result, [n for n in names if n not in table])}
    encoded = []
    for name in names:
        if name in extras:
            encoded.append(extras[name])
            continue
        spec, stat = table[name]
        array = _read(stat, by_output[spec.name], result.labels)
        encoded.append(
            OutputTensor(name, stat.datatype, tuple(array.shape), _raw_bytes(array, stat.datatype))
        )
    return encoded
