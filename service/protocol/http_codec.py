"""The REST form of the Open Inference Protocol's inference messages: JSON documents, nested
JSON tensor data and Triton's binary tensor data extension, to and from the data plane's
requests and answers. Only each input's datatype, shape and data are found here
(``service.tensors.WireTensor``); decoding and the checks against the model are the data
plane's, the parameters ``service.protocol.parameters``'s."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import tensors
from service.core.dataplane import PredictResult
from service.errors import InvalidInput
from service.protocol.oip_codec import check_tensor_parameters, input_dtype
from service.protocol.parameters import MC_SAMPLES

__all__ = [
    "BINARY_SIZE",
    "HEADER_LENGTH",
    "Requested",
    "encode_answer",
    "json_object",
    "parameters_of",
    "parse_json",
    "requested_outputs",
    "wire_inputs",
]

#: Triton's binary tensor data header: the length of the JSON part of a body.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: The tensor parameter giving the size of a tensor's binary data.
BINARY_SIZE = "binary_data_size"


def parse_json(data: bytes | memoryview, what: str) -> Any:
    """A JSON document (``what`` names it in the error).

    Raises:
        InvalidInput: not valid JSON.
    """
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None


def json_object(value: Any, what: str) -> dict[str, Any]:
    """``value``, which must be a JSON object.

    Raises:
        InvalidInput: it is not.
    """
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _flatten(data: Any, name: str) -> list[Any]:
    """Row-major values of ``data`` (a flat or nested JSON array)."""
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: data must be an array, got {type(data).__name__}")
    flat: list[Any] = []
    pending: list[tuple[list[Any], int]] = [(data, 1)]
    while pending:
        values, depth = pending.pop()
        if depth > tensors.MAX_RANK:
            raise InvalidInput(f"input {name!r}: data nested deeper than {tensors.MAX_RANK}")
        if any(isinstance(v, list) for v in values):
            if not all(isinstance(v, list) for v in values):
                raise InvalidInput(f"input {name!r}: data mixes arrays and values at one level")
            pending.extend((v, depth + 1) for v in reversed(values))
        else:
            flat.extend(values)
    return flat


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise InvalidInput(f"input {name!r}: shape must be an array of integers, got {shown}")
    return tuple(value)


def parameters_of(tensor: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The ``parameters`` object of a request or tensor (empty when absent)."""
    return json_object(tensor.get("parameters", {}), f"the parameters of {what}")


def wire_inputs(document: Mapping[str, Any], binary: memoryview) -> list[tensors.WireTensor]:
    """The inputs of an inference request (JSON document and binary section), as found.

    Raises:
        InvalidInput: a malformed input, a binary size that overruns the binary section or
            leaves bytes unread, an unknown datatype, data both binary and in JSON, or an
            unsupported tensor parameter.
    """
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("the request needs 'inputs': a non-empty array of tensors")
    found = []
    offset = 0
    for index, raw in enumerate(inputs):
        tensor = json_object(raw, f"inputs[{index}]")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"inputs[{index}] needs a 'name' (a string)")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            raise InvalidInput(f"input {name!r} needs a 'datatype' (a string)")
        parameters = parameters_of(tensor, f"input {name!r}")
        check_tensor_parameters("input", name, parameters)
        dtype = input_dtype(name, datatype)
        shape = _shape(tensor.get("shape"), name)
        size = parameters.get(BINARY_SIZE)
        data: bytes | Sequence[Any]
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInput(f"input {name!r}: {BINARY_SIZE} must be an integer >= 0")
            if "data" in tensor:
                raise InvalidInput(f"input {name!r} has both {BINARY_SIZE} and JSON data")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: {BINARY_SIZE} {size} overruns the binary data "
                    f"({len(binary) - offset} bytes left after the JSON header of "
                    f"{HEADER_LENGTH})"
                )
            data, data_name = bytes(binary[offset : offset + size]), "binary data"
            offset += size
        else:
            if "data" not in tensor:
                raise InvalidInput(f"input {name!r} needs 'data' (or {BINARY_SIZE})")
            data, data_name = _flatten(tensor["data"], name), "data"
        found.append(
            tensors.WireTensor(name, dtype, shape, data, dtype_name=datatype, data_name=data_name)
        )
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} bytes of binary data are not claimed by any input's "
            f"{BINARY_SIZE}"
        )
    return found


@dataclass(frozen=True)
class Requested:
    """The outputs a request names, and whether each is wanted binary (None: the default)."""

    names: list[str]
    binary: dict[str, bool]


def requested_outputs(document: Mapping[str, Any]) -> Requested:
    """The outputs a request names, with their ``binary_data`` choices.

    Raises:
        InvalidInput: a malformed output, or an unsupported output parameter.
    """
    outputs = document.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be an array of {\"name\": ...} objects")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for index, raw in enumerate(outputs):
        output = json_object(raw, f"outputs[{index}]")
        name = output.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"outputs[{index}] needs a 'name' (a string)")
        parameters = parameters_of(output, f"output {name!r}")
        check_tensor_parameters("output", name, parameters)
        if "binary_data" in parameters:
            if not isinstance(parameters["binary_data"], bool):
                raise InvalidInput(f"output {name!r}: binary_data must be a boolean")
            binary[name] = parameters["binary_data"]
        names.append(name)
    return Requested(names, binary)


def _json_values(value: np.ndarray[Any, Any], dtype: tensors.DType) -> list[Any]:
    if dtype.is_bytes:
        return [x if isinstance(x, str) else bytes(x).decode() for x in value.ravel()]
    values: list[Any] = np.ascontiguousarray(value, dtype=dtype.numpy).ravel().tolist()
    return values


def encode_answer(
    result: PredictResult, request_id: Any, requested: Requested, binary_default: bool
) -> tuple[bytes, bytes | None]:
    """The answer's JSON and its binary section (None when every output is in the JSON).

    Args:
        result: the data plane's answer.
        request_id: the request's ``id`` (echoed when given).
        requested: the outputs named, with their binary choices.
        binary_default: the request's ``binary_data_output``.
    """
    document: dict[str, Any] = {
        "model_name": result.model,
        "model_version": str(result.version),
    }
    if request_id is not None:
        document["id"] = request_id
    document["parameters"] = {MC_SAMPLES: result.num_samples}
    outputs = []
    blobs: list[bytes] = []
    for answer in result.answer:
        value = result.read(answer)
        dtype = answer.statistic.dtype
        output: dict[str, Any] = {
            "name": answer.name,
            "datatype": dtype.oip,
            "shape": list(value.shape),
        }
        if requested.binary.get(answer.name, binary_default):
            blob = tensors.encode(value, dtype)
            output["parameters"] = {BINARY_SIZE: len(blob)}
            blobs.append(blob)
        else:
            output["data"] = _json_values(value, dtype)
        outputs.append(output)
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    return header, (b"".join(blobs) if blobs else None)
