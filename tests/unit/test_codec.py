from __future__ import annotations

import numpy as np
import pytest

from service.errors import InvalidInput
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.protocol.codec import decode_tensor, encode_tensor


@pytest.mark.parametrize(
    "dtype", ["float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool"]
)
def test_round_trip_every_dtype(dtype: str) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 2, 4)) * 10).astype(dtype)
    y = decode_tensor(encode_tensor(x), "x")
    assert y.dtype == x.dtype
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, x)


def test_wire_format_is_little_endian_row_major() -> None:
    t = encode_tensor(np.array([[1, 2], [3, 256]], dtype=np.int32))
    assert t.dtype == pb.DATA_TYPE_INT32
    assert list(t.shape) == [2, 2]
    assert t.data == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0])
    big_endian = np.array([1.5, -2.0], dtype=">f4")
    assert decode_tensor(encode_tensor(big_endian), "x").tolist() == [1.5, -2.0]


def test_byte_length_mismatch_names_the_input() -> None:
    t = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(InvalidInput, match=r"input 'image': 20 bytes of data for shape \[2, 3\]"):
        decode_tensor(t, "image")


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        (pb.Tensor(dtype=pb.DATA_TYPE_UNSPECIFIED, shape=[1], data=b"\0"), "unsupported dtype"),
        (pb.Tensor(dtype=99, shape=[1], data=b"\0"), "unsupported dtype 99"),  # type: ignore[arg-type]
        (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[], data=b""), "shape is empty"),
        (pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 2], data=b""), "negative dimension"),
        (pb.Tensor(dtype=pb.DATA_TYPE_BOOL, shape=[2], data=b"\x00\x02"), "0 or 1"),
    ],
)
def test_malformed_tensors(tensor: pb.Tensor, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        decode_tensor(tensor, "x")


def test_zero_rows_decode_to_an_empty_batch() -> None:
    x = decode_tensor(pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[0, 4], data=b""), "x")
    assert x.shape == (0, 4)
