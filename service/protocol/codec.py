"""``mcdropout.v1.Tensor`` <-> numpy arrays, checking dtype, shape and byte length."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from service.errors import InvalidInput
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb

__all__ = ["DTYPE_OF", "PB_DTYPE_OF", "decode_tensor", "encode_tensor"]

#: wire enum -> numpy dtype (explicitly little-endian: the wire format).
DTYPE_OF: dict[pb.DataType, np.dtype[Any]] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT8: np.dtype("i1"),
    pb.DATA_TYPE_UINT8: np.dtype("u1"),
    pb.DATA_TYPE_BOOL: np.dtype("?"),
}
#: numpy dtype name -> wire enum.
PB_DTYPE_OF: dict[str, pb.DataType] = {dtype.name: code for code, dtype in DTYPE_OF.items()}


def decode_tensor(tensor: pb.Tensor, name: str) -> NDArray[Any]:
    """Decode a wire tensor into a read-only numpy array in native byte order.

    Raises:
        InvalidInput: unknown dtype, negative dimension, or a byte length that does not match
            the shape and dtype. The message names the tensor.
    """
    dtype = DTYPE_OF.get(tensor.dtype)
    if dtype is None:
        known = tensor.dtype in pb.DataType.values()
        label = pb.DataType.Name(tensor.dtype) if known else str(tensor.dtype)
        raise InvalidInput(f"input {name!r}: unsupported dtype {label}")
    shape = tuple(tensor.shape)
    if not shape:
        raise InvalidInput(f"input {name!r}: shape is empty; a batch needs at least one dimension")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r}: negative dimension in shape {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidInput(
            f"input {name!r}: {len(tensor.data)} bytes of data for shape {list(shape)} of "
            f"{dtype.name} (expected {expected})"
        )
    array = np.frombuffer(tensor.data, dtype=dtype, count=count).reshape(shape)
    if dtype == np.dtype("?") and count and np.frombuffer(tensor.data, np.uint8).max() > 1:
        raise InvalidInput(f"input {name!r}: BOOL bytes must be 0 or 1")
    return array.astype(dtype.newbyteorder("="), copy=False)


def encode_tensor(array: NDArray[Any]) -> pb.Tensor:
    """Encode a numpy array as a little-endian, row-major wire tensor."""
    dtype = array.dtype
    code = PB_DTYPE_OF.get(dtype.name)
    if code is None:
        raise TypeError(f"cannot encode dtype {dtype}")
    data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=code, shape=list(array.shape), data=data)
