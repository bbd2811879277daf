"""Tensors on the wire: the one dtype table, and the one decoder every protocol uses.

The dtype table (:data:`DTYPES`) names each element type once for every place that needs a
name for it: numpy, the Open Inference Protocol (``FP32``, also KServe v2 HTTP), the project's
``mcdropout.v1.DataType`` enum, ONNX's element types (``TensorProto.FLOAT``, what the graph
declares and ONNX Runtime runs) and ``config.json``. A type missing from a column is not
accepted there (``config.json`` takes the eight types the proto can carry; BYTES is an output
type only).

A protocol layer only finds an input's dtype, shape and data in its message and hands them over
as a :class:`WireTensor`; :func:`decode` checks them and makes the array. Whether the array
fits a model is the data plane's business, not the decoder's: it decodes any shape.

Base layer: numpy only, no protocol, no model.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import InvalidInput, quote

__all__ = [
    "BOOL",
    "BYTES",
    "DTYPES",
    "FP64",
    "INT64",
    "MAX_RANK",
    "DType",
    "WireTensor",
    "check_shape",
    "decode",
    "encode",
    "from_config",
    "from_numpy",
    "from_oip",
    "from_onnx",
    "from_proto",
]


@dataclass(frozen=True)
class DType:
    """One element type and its name in each place that names it.

    Attributes:
        numpy: the wire dtype, explicitly little-endian (object for BYTES).
        oip: the Open Inference Protocol datatype (gRPC and KServe v2 HTTP).
        proto: the ``mcdropout.v1.DataType`` enum name; None when that enum lacks the type.
        onnx: the ONNX element type (``onnx.TensorProto.DataType``); None when no model here
            may use the type.
        config: the name in ``config.json`` (numpy's name); None when a model may not use it.
    """

    numpy: np.dtype[Any]
    oip: str
    proto: str | None = None
    onnx: int | None = None
    config: str | None = None

    @property
    def is_bytes(self) -> bool:
        """Variable-length byte strings (BYTES): no fixed item size, never a model input."""
        return self.numpy.kind == "O"


# The ONNX numbers are the spec's (onnx.proto's TensorProto.DataType); a test checks them
# against the onnx package, which this base module does not import.
BOOL = DType(np.dtype("?"), "BOOL", "DATA_TYPE_BOOL", 9, "bool")
INT64 = DType(np.dtype("<i8"), "INT64", "DATA_TYPE_INT64", 7, "int64")
FP64 = DType(np.dtype("<f8"), "FP64", "DATA_TYPE_FLOAT64", 11, "float64")
BYTES = DType(np.dtype(object), "BYTES")

#: The one dtype table.
DTYPES: tuple[DType, ...] = (
    BOOL,
    DType(np.dtype("u1"), "UINT8", "DATA_TYPE_UINT8", 2, "uint8"),
    DType(np.dtype("<u2"), "UINT16"),
    DType(np.dtype("<u4"), "UINT32"),
    DType(np.dtype("<u8"), "UINT64"),
    DType(np.dtype("i1"), "INT8", "DATA_TYPE_INT8", 3, "int8"),
    DType(np.dtype("<i2"), "INT16"),
    DType(np.dtype("<i4"), "INT32", "DATA_TYPE_INT32", 6, "int32"),
    INT64,
    DType(np.dtype("<f2"), "FP16", "DATA_TYPE_FLOAT16", 10, "float16"),
    DType(np.dtype("<f4"), "FP32", "DATA_TYPE_FLOAT32", 1, "float32"),
    FP64,
    BYTES,
)

_BY_OIP = {d.oip: d for d in DTYPES}
_BY_PROTO = {d.proto: d for d in DTYPES if d.proto is not None}
_BY_ONNX = {d.onnx: d for d in DTYPES if d.onnx is not None}
_BY_CONFIG = {d.config: d for d in DTYPES if d.config is not None}
_BY_NUMPY = {d.numpy.name: d for d in DTYPES if not d.is_bytes}


def from_oip(datatype: str) -> DType | None:
    """The type of an OIP datatype name (``"FP32"``), or None."""
    return _BY_OIP.get(datatype)


def from_proto(name: str) -> DType | None:
    """The type of a ``mcdropout.v1.DataType`` enum name (``"DATA_TYPE_FLOAT32"``), or None."""
    return _BY_PROTO.get(name)


def from_onnx(elem_type: int) -> DType | None:
    """The type of an ONNX element type (``onnx.TensorProto.FLOAT``), or None when no model
    here may use it."""
    return _BY_ONNX.get(elem_type)


def from_config(name: str) -> DType | None:
    """The type of a ``config.json`` dtype name (``"float32"``), or None."""
    return _BY_CONFIG.get(name)


def from_numpy(dtype: np.dtype[Any]) -> DType | None:
    """The type of a numpy dtype, whatever its byte order (object arrays are BYTES)."""
    return BYTES if dtype.kind == "O" else _BY_NUMPY.get(dtype.name)


#: Most dimensions of a tensor (numpy 1's limit; numpy 2 takes 64). Model tensors have a few.
MAX_RANK = 32
#: numpy refuses arrays whose size in bytes, zero dimensions counted as one, passes this.
_MAX_ARRAY_BYTES = int(np.iinfo(np.intp).max)


@dataclass(frozen=True)
class WireTensor:
    """One input tensor as a protocol layer found it in its message.

    Attributes:
        name: the input's name.
        dtype: its element type (the protocol refuses names it does not know).
        shape: as sent, not yet checked.
        data: raw bytes (little-endian, row-major), or a flat sequence of values (typed
            contents, JSON).
        dtype_name: the type as the client named it, for messages (``"FP32"``, ``"float32"``).
        data_name: where the data was, for messages (``"data"``, ``"raw contents"``,
            ``"contents.fp32_contents"``).
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    data: bytes | Sequence[Any]
    dtype_name: str
    data_name: str = "data"


def check_shape(name: str, shape: Sequence[int], itemsize: int = 1) -> int:
    """Check a shape as sent and count its elements.

    Args:
        name: the input's name, for messages.
        shape: the dimensions.
        itemsize: bytes per element (an array of the shape must fit numpy's address space).

    Returns:
        The number of elements (a Python int: no overflow however large the dimensions).

    Raises:
        InvalidInput: no dimension (a batch needs one), more than :data:`MAX_RANK`, a negative
            dimension, or dimensions too large for any array.
    """
    if not shape:
        raise InvalidInput(
            f"input {quote(name)}: shape is empty; a batch needs at least one dimension"
        )
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {quote(name)}: {len(shape)} dimensions, more than {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {quote(name)}: negative dimension in shape {list(shape)}")
    if math.prod(max(d, 1) for d in shape) * itemsize > _MAX_ARRAY_BYTES:
        raise InvalidInput(f"input {quote(name)}: shape {list(shape)} is too large for any array")
    return math.prod(shape)


def decode(tensor: WireTensor) -> NDArray[Any]:
    """The array of a wire tensor, in native byte order (read-only when decoded from bytes).

    Raises:
        InvalidInput: a bad shape (:func:`check_shape`), BYTES, a byte length or value count
            that does not match the shape, BOOL bytes other than 0 and 1, typed values that are
            not of the dtype's kind or outside its range. Messages name the input.
    """
    dtype = tensor.dtype
    if dtype.is_bytes:
        raise InvalidInput(
            f"input {quote(tensor.name)}: {tensor.dtype_name} is not a model input type"
        )
    count = check_shape(tensor.name, tensor.shape, dtype.numpy.itemsize)
    if isinstance(tensor.data, bytes | bytearray | memoryview):
        array = _from_bytes(tensor, bytes(tensor.data), count)
    else:
        array = _from_values(tensor, tensor.data, count)
    return array.reshape(tensor.shape)


def _from_bytes(tensor: WireTensor, data: bytes, count: int) -> NDArray[Any]:
    dtype = tensor.dtype.numpy
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input {quote(tensor.name)}: {len(data)} bytes of {tensor.data_name} for shape "
            f"{list(tensor.shape)} of {tensor.dtype_name} (expected {expected})"
        )
    if dtype.kind == "b" and count and np.frombuffer(data, np.uint8).max() > 1:
        raise InvalidInput(f"input {quote(tensor.name)}: {tensor.dtype_name} bytes must be 0 or 1")
    array = np.frombuffer(data, dtype=dtype, count=count)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _from_values(tensor: WireTensor, values: Sequence[Any], count: int) -> NDArray[Any]:
    dtype = tensor.dtype.numpy
    if len(values) != count:
        raise InvalidInput(
            f"input {quote(tensor.name)}: {len(values)} values in {tensor.data_name} for shape "
            f"{list(tensor.shape)} (expected {count})"
        )
    items = list(values)
    wide = np.asarray(items)
    if dtype.kind in "iu" and wide.dtype.kind in "fO" and all(_is_int(v) for v in items):
        # numpy turns integers beyond int64 into floats (inexact); keep them as Python ints.
        wide = np.asarray(items, dtype=object)
    elif count and wide.dtype.kind not in _VALUE_KINDS[dtype.kind]:
        # Converting would truncate (a float for an integer) or fail with a numpy error.
        raise InvalidInput(
            f"input {quote(tensor.name)}: {tensor.dtype_name} takes {_KIND_NAMES[dtype.kind]}, got "
            f"{wide.dtype.name} values"
        )
    if dtype.kind in "iu" and count:
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(
                f"input {quote(tensor.name)}: values outside the range of {tensor.dtype_name} "
                f"({info.min}..{info.max})"
            )
    return wide.astype(dtype.newbyteorder("="))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: numpy kinds of the values each dtype kind accepts (an integer is a fine float value).
_VALUE_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}
_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers"}


def encode(array: NDArray[Any], dtype: DType | None = None) -> bytes:
    """An array as wire bytes: little-endian, row-major.

    BYTES (an object array of ``bytes`` or ``str``, str sent as UTF-8) is the OIP layout: each
    element a 4-byte little-endian length, then its bytes.

    Args:
        array: the values.
        dtype: the wire type (converting the values); None for the array's own.

    Raises:
        TypeError: a dtype the table does not have.
    """
    wire = dtype or from_numpy(array.dtype)
    if wire is None:
        raise TypeError(f"cannot encode dtype {array.dtype}")
    if wire.is_bytes:
        items = [x.encode() if isinstance(x, str) else bytes(x) for x in array.ravel()]
        return b"".join(struct.pack("<I", len(item)) + item for item in items)
    return np.ascontiguousarray(array, dtype=wire.numpy).tobytes()
