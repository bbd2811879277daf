"""``mcdropout.v1.Tensor`` <-> numpy arrays, through the one dtype table and the one decoder
(``service.tensors``)."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from service import tensors
from service.errors import InvalidInput, quote
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb

__all__ = ["DTYPE_OF", "PB_DTYPE_OF", "decode_tensor", "encode_tensor", "wire_tensor"]

_TYPE_OF: dict[pb.DataType, tensors.DType] = {
    cast("pb.DataType", pb.DataType.Value(d.proto)): d for d in tensors.DTYPES if d.proto
}
#: wire enum -> numpy dtype (explicitly little-endian: the wire format); a view of the table.
DTYPE_OF: dict[pb.DataType, np.dtype[Any]] = {code: d.numpy for code, d in _TYPE_OF.items()}
#: numpy dtype name -> wire enum; a view of the table.
PB_DTYPE_OF: dict[str, pb.DataType] = {d.numpy.name: code for code, d in _TYPE_OF.items()}


def wire_tensor(tensor: pb.Tensor, name: str) -> tensors.WireTensor:
    """The dtype, shape and data of a wire tensor, for the decoder.

    Raises:
        InvalidInput: a dtype the enum does not have (or UNSPECIFIED).
    """
    dtype = _TYPE_OF.get(tensor.dtype)
    if dtype is None:
        known = tensor.dtype in pb.DataType.values()
        label = pb.DataType.Name(tensor.dtype) if known else str(tensor.dtype)
        raise InvalidInput(f"input {quote(name)}: unsupported dtype {label}")
    return tensors.WireTensor(
        name=name,
        dtype=dtype,
        shape=tuple(tensor.shape),
        data=tensor.data,
        dtype_name=dtype.numpy.name,
    )


def decode_tensor(tensor: pb.Tensor, name: str) -> NDArray[Any]:
    """Decode a wire tensor into a read-only numpy array in native byte order.

    Raises:
        InvalidInput: unknown dtype, or a shape or byte length the decoder refuses
            (``service.tensors.decode``). The message names the tensor.
    """
    return tensors.decode(wire_tensor(tensor, name))


def encode_tensor(array: NDArray[Any]) -> pb.Tensor:
    """Encode a numpy array as a little-endian, row-major wire tensor.

    Raises:
        TypeError: a dtype the enum does not have.
    """
    code = PB_DTYPE_OF.get(array.dtype.name)
    if code is None:
        raise TypeError(f"cannot encode dtype {array.dtype}")
    return pb.Tensor(dtype=code, shape=list(array.shape), data=tensors.encode(array))
