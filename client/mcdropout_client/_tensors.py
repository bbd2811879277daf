"""``mcdropout.v1.Tensor`` <-> numpy arrays: little-endian, row-major, length-checked."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from mcdropout_client._gen.mcdropout.v1 import mcdropout_pb2 as pb

__all__ = ["DTYPE_OF", "decode_tensor", "encode_tensor"]

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
_CODE_OF: dict[str, pb.DataType] = {dtype.name: code for code, dtype in DTYPE_OF.items()}


def native(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The same dtype in the machine's byte order (what users compare against)."""
    return dtype.newbyteorder("=")


def decode_tensor(tensor: pb.Tensor, name: str) -> NDArray[Any]:
    """A wire tensor as a read-only numpy array in native byte order.

    Args:
        tensor: the wire tensor.
        name: what it is, for error messages (``"logits.mean"``).

    Raises:
        ValueError: unknown dtype, negative dimension, a byte length that does not match the
            shape and dtype, or BOOL bytes other than 0 and 1. The message names the tensor.
    """
    dtype = DTYPE_OF.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"tensor {name!r}: unsupported dtype {tensor.dtype}")
    shape = tuple(tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"tensor {name!r}: invalid shape {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"tensor {name!r}: {len(tensor.data)} bytes of data for shape {list(shape)} of "
            f"{dtype.name} (expected {expected})"
        )
    if dtype == np.dtype("?") and count and np.frombuffer(tensor.data, np.uint8).max() > 1:
        raise ValueError(f"tensor {name!r}: BOOL bytes must be 0 or 1")
    array = np.frombuffer(tensor.data, dtype=dtype, count=count).reshape(shape)
    array = array.astype(native(dtype), copy=False)
    array.flags.writeable = False
    return array


def encode_tensor(array: NDArray[Any]) -> pb.Tensor:
    """A numpy array as a little-endian, row-major wire tensor.

    Raises:
        TypeError: a dtype the protocol has no code for.
    """
    code = _CODE_OF.get(array.dtype.name)
    if code is None:
        raise TypeError(f"cannot send dtype {array.dtype} (the protocol has {sorted(_CODE_OF)})")
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(dtype=code, shape=list(array.shape), data=data)
