"""Open Inference Protocol messages <-> the data plane's requests and answers.

Inputs arrive either raw (one little-endian, row-major blob per input, in the order of
``inputs``) or as typed contents; never both in one request. This module only finds each
input's datatype, shape and data (``service.tensors.WireTensor``); decoding and every check
against the model are the data plane's. Outputs always leave raw: tritonclient decodes only
``raw_output_contents``.

Output names, datatypes and shapes are the statistics catalogue's (``service.core.catalogue``):
every model output ``<out>`` gives ``<out>_<statistic>`` outputs, plus ``<out>_samples``,
``<out>_interval_<method>_<level>_<bound>`` and ``mc_samples_per_row`` when the request's
parameters ask for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service import tensors
from service.core.dataplane import PredictResult
from service.errors import InvalidInput, quote
from service.gen.inference import grpc_service_pb2 as oip
from service.protocol.parameters import (
    MC_INTERVAL_LEVELS,
    MC_RETURN_SAMPLES,
    MC_SAMPLES,
    MC_SEED,
    MC_TARGET_STANDARD_ERROR,
    RequestOptions,
    request_options,
)

__all__ = [
    "MC_INTERVAL_LEVELS",
    "MC_RETURN_SAMPLES",
    "MC_SAMPLES",
    "MC_SEED",
    "MC_TARGET_STANDARD_ERROR",
    "OutputTensor",
    "check_tensor_parameters",
    "encode_outputs",
    "input_dtype",
    "mc_options_of",
    "parameter_values",
    "requested_output_names",
    "wire_inputs",
]

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
#: The datatypes an input may have (BYTES and BF16 are not inputs any model here takes).
_INPUT_DATATYPES = tuple(d.oip for d in tensors.DTYPES if not d.is_bytes)


def _has_typed_contents(tensor: oip.ModelInferRequest.InferInputTensor) -> bool:
    return any(len(getattr(tensor.contents, f)) for f in _ALL_CONTENTS_FIELDS)


def check_tensor_parameters(kind: str, name: str, parameters: Mapping[str, Any]) -> None:
    """Refuse tensor parameters that ask for features this server does not have (both forms
    of the protocol: shared memory, classification).

    Args:
        kind: "input" or "output", for the message.
        name: the tensor's name.
        parameters: its parameters (any mapping: only the names are read).

    Raises:
        InvalidInput: an unsupported parameter.
    """
    for key, reason in _UNSUPPORTED_TENSOR_PARAMETERS.items():
        if key in parameters:
            raise InvalidInput(f"{kind} {quote(name)}: parameter {key!r}: {reason}")


def input_dtype(name: str, datatype: str) -> tensors.DType:
    """The type of an input's OIP datatype (both forms of the protocol).

    Raises:
        InvalidInput: an unknown datatype, or BYTES (no model here takes it).
    """
    dtype = tensors.from_oip(datatype)
    if dtype is None or dtype.is_bytes:
        raise InvalidInput(
            f"input {quote(name)}: unsupported datatype {quote(datatype)} (supported: "
            f"{', '.join(_INPUT_DATATYPES)})"
        )
    return dtype


def _typed_values(tensor: oip.ModelInferRequest.InferInputTensor) -> tuple[str, Sequence[Any]]:
    """The typed-contents field of the tensor's datatype and its values."""
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(
            f"input {quote(tensor.name)}: {tensor.datatype} has no typed contents; send it in "
            "raw_input_contents"
        )
    present = [f for f in _ALL_CONTENTS_FIELDS if f != field and len(getattr(tensor.contents, f))]
    if present:
        raise InvalidInput(
            f"input {quote(tensor.name)}: {tensor.datatype} goes in contents.{field}, got "
            f"{', '.join(present)}"
        )
    values: Sequence[Any] = getattr(tensor.contents, field)
    return field, values


def wire_inputs(request: oip.ModelInferRequest) -> list[tensors.WireTensor]:
    """The input tensors of a ModelInfer request, as found (decoded by the data plane).

    Raises:
        InvalidInput: raw and typed contents mixed, a raw blob count that is not one per
            input, an unknown datatype (BYTES included), typed values in another field than
            the datatype's, or an unsupported tensor parameter (shared memory).
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
    found: list[tensors.WireTensor] = []
    for index, tensor in enumerate(request.inputs):
        check_tensor_parameters("input", tensor.name, tensor.parameters)
        dtype = input_dtype(tensor.name, tensor.datatype)
        data: bytes | Sequence[Any]
        if raw:
            data_name, data = "raw contents", raw[index]
        else:
            field, data = _typed_values(tensor)
            data_name = f"contents.{field}"
        found.append(
            tensors.WireTensor(
                name=tensor.name,
                dtype=dtype,
                shape=tuple(tensor.shape),
                data=data,
                dtype_name=tensor.datatype,
                data_name=data_name,
            )
        )
    return found


def requested_output_names(
    requested: Sequence[oip.ModelInferRequest.InferRequestedOutputTensor],
) -> list[str]:
    """The names of the requested outputs (the data plane checks them against the model).

    Raises:
        InvalidInput: an unsupported output parameter (classification, shared memory).
    """
    for output in requested:
        check_tensor_parameters("output", output.name, output.parameters)
    return [output.name for output in requested]


@dataclass(frozen=True)
class OutputTensor:
    """One encoded output: metadata plus its raw contents."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes


def encode_outputs(result: PredictResult) -> list[OutputTensor]:
    """The outputs the request asked for (``result.answer``), in answer order."""
    encoded = []
    for answer in result.answer:
        value = result.read(answer)
        dtype = answer.statistic.dtype
        encoded.append(
            OutputTensor(answer.name, dtype.oip, tuple(value.shape), tensors.encode(value, dtype))
        )
    return encoded


def parameter_values(parameters: Mapping[str, oip.InferParameter]) -> dict[str, Any]:
    """The plain values of an ``InferParameter`` map (None for an unset one), as
    ``service.protocol.parameters`` reads them."""
    values: dict[str, Any] = {}
    for name, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[name] = None if choice is None else getattr(parameter, choice)
    return values


def mc_options_of(parameters: Mapping[str, oip.InferParameter]) -> RequestOptions:
    """The options of a ModelInfer request's parameters (``service.protocol.parameters``).

    Raises:
        InvalidInput: see :func:`service.protocol.parameters.request_options`.
    """
    return request_options(parameter_values(parameters))
