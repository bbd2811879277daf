"""The one dtype table and the one decoder (service.tensors), which both protocols use."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
import pytest

from service import tensors
from service.errors import InvalidInput, ModelLoadError
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.repository import parse_config
from service.tensors import WireTensor

CONFIG_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool")


def raw(dtype: str, shape: tuple[int, ...], data: bytes) -> WireTensor:
    wire = tensors.from_oip(dtype)
    assert wire is not None
    return WireTensor("x", wire, shape, data, dtype_name=dtype)


def typed(dtype: str, shape: tuple[int, ...], values: list[Any]) -> WireTensor:
    wire = tensors.from_oip(dtype)
    assert wire is not None
    return WireTensor("x", wire, shape, values, dtype_name=dtype, data_name="contents")


# -- the table ----------------------------------------------------------------------------------


def test_every_config_dtype_has_a_name_in_every_column() -> None:
    """A model may use a type only if both protocols and ONNX Runtime can name it."""
    names = {d.config for d in tensors.DTYPES if d.config is not None}
    assert names == set(CONFIG_DTYPES)
    for name in CONFIG_DTYPES:
        dtype = tensors.from_config(name)
        assert dtype is not None
        assert dtype.numpy == np.dtype(name)
        assert dtype.proto is not None
        assert dtype.onnx is not None
        assert tensors.from_oip(dtype.oip) is dtype
        assert tensors.from_proto(dtype.proto) is dtype
        assert tensors.from_onnx(dtype.onnx) is dtype
        assert tensors.from_numpy(np.dtype(name)) is dtype


def test_the_onnx_element_types_are_onnxs() -> None:
    for dtype in tensors.DTYPES:
        if dtype.onnx is not None:
            assert onnx.helper.tensor_dtype_to_np_dtype(dtype.onnx) == dtype.numpy


def test_the_proto_enum_and_the_table_agree() -> None:
    """Every mcdropout.v1.DataType but UNSPECIFIED is in the table, and nothing else is."""
    proto = set(pb.DataType.keys()) - {"DATA_TYPE_UNSPECIFIED"}
    assert proto == {d.proto for d in tensors.DTYPES if d.proto is not None}


def test_the_config_parser_takes_exactly_the_tables_config_types() -> None:
    base = {"task": "regression", "outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}]}
    for name in CONFIG_DTYPES:
        inputs = [{"name": "x", "dtype": name, "shape": [-1, 2]}]
        config = parse_config(dict(base, inputs=inputs), "m")
        assert config.inputs[0].dtype == np.dtype(name)
    with pytest.raises(ModelLoadError, match="dtype must be one of bool, float16, float32"):
        parse_config(dict(base, inputs=[{"name": "x", "dtype": "uint16", "shape": [-1]}]), "m")


def test_wire_dtypes_are_little_endian_and_any_byte_order_finds_its_row() -> None:
    for dtype in tensors.DTYPES:
        if not dtype.is_bytes:
            assert dtype.numpy == dtype.numpy.newbyteorder("<")
            assert tensors.from_numpy(dtype.numpy.newbyteorder(">")) is dtype
    assert tensors.from_numpy(np.dtype(object)) is tensors.BYTES
    assert tensors.from_numpy(np.dtype("complex64")) is None
    assert tensors.from_oip("BF16") is None
    assert tensors.from_onnx(onnx.TensorProto.STRING) is None


# -- decoding bytes -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [d for d in tensors.DTYPES if not d.is_bytes], ids=str)
def test_bytes_round_trip_every_type(dtype: tensors.DType) -> None:
    x = (np.random.default_rng(0).random((3, 2, 2)) * 100).astype(dtype.numpy)
    wire = WireTensor("x", dtype, x.shape, tensors.encode(x), dtype_name=dtype.oip)
    decoded = tensors.decode(wire)
    assert decoded.dtype == dtype.numpy.newbyteorder("=")
    np.testing.assert_array_equal(decoded, x)


def test_big_endian_arrays_are_encoded_little_endian() -> None:
    assert tensors.encode(np.array([1, 256], dtype=">i4")) == bytes([1, 0, 0, 0, 0, 1, 0, 0])


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (raw("FP32", (), b""), "input 'x': shape is empty"),
        (raw("FP32", (-1, 2), b""), "input 'x': negative dimension in shape [-1, 2]"),
        (
            raw("FP32", (2, 3), b"\0" * 20),
            "20 bytes of data for shape [2, 3] of FP32 (expected 24)",
        ),
        (raw("BOOL", (2,), b"\0\2"), "input 'x': BOOL bytes must be 0 or 1"),
        (raw("FP32", (1,) * 33, b"\0" * 4), "input 'x': 33 dimensions, more than 32"),
        # The element count overflows int64 to 0, which matched an empty blob.
        (raw("FP32", (2**32, 2**32), b""), "is too large for any array"),
        # No element at all, but numpy still refuses the shape.
        (raw("FP32", (0, 2**62), b""), "is too large for any array"),
        (raw("BYTES", (1,), b"\1\0\0\0a"), "input 'x': BYTES is not a model input type"),
    ],
)
def test_malformed_bytes_are_invalid_input(tensor: WireTensor, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        tensors.decode(tensor)


def test_zero_rows_decode_to_an_empty_batch() -> None:
    assert tensors.decode(raw("FP32", (0, 4), b"")).shape == (0, 4)


def test_decoded_bytes_are_read_only_views() -> None:
    decoded = tensors.decode(raw("FP32", (2,), np.array([1, 2], "<f4").tobytes()))
    assert not decoded.flags.writeable


# -- decoding values (typed contents, JSON) -----------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        ("FP32", [1.5, -2]),
        ("FP16", [0.5, 2.0]),
        ("INT8", [127, -128]),
        ("UINT64", [2**64 - 1, 0]),  # beyond int64: exact, not through a float
        ("INT64", [2**62 + 1, -3]),
        ("BOOL", [True, False]),
    ],
)
def test_values_decode_exactly(dtype: str, values: list[Any]) -> None:
    decoded = tensors.decode(typed(dtype, (1, 2), values))
    wire = tensors.from_oip(dtype)
    assert wire is not None
    assert decoded.dtype == wire.numpy.newbyteorder("=")
    assert decoded.tolist() == [values]


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (typed("FP32", (2, 2), [1.0] * 3), "3 values in contents for shape [2, 2] (expected 4)"),
        (typed("INT8", (1,), [128]), "values outside the range of INT8 (-128..127)"),
        (typed("UINT8", (1,), [-1]), "values outside the range of UINT8 (0..255)"),
        (typed("INT32", (1,), [1.5]), "INT32 takes integers, got float64 values"),
        (typed("BOOL", (1,), [1]), "BOOL takes booleans, got int64 values"),
        (typed("FP32", (1,), ["1"]), "FP32 takes numbers, got str32 values"),
        (typed("UINT64", (1,), [2**64]), "values outside the range of UINT64"),
    ],
)
def test_bad_values_are_invalid_input(tensor: WireTensor, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)):
        tensors.decode(tensor)


# -- encoding -----------------------------------------------------------------------------------


def test_bytes_are_length_prefixed_and_str_is_utf8() -> None:
    labels = np.array(["ant", "bée"], dtype=object)
    assert tensors.encode(labels, tensors.BYTES) == b"\3\0\0\0ant\4\0\0\0b\xc3\xa9e"
    assert tensors.encode(np.array([b"x"], dtype=object)) == b"\1\0\0\0x"


def test_encode_converts_to_the_wire_type() -> None:
    assert tensors.encode(np.array([1.5], np.float32), tensors.FP64) == np.float64(1.5).tobytes()
    with pytest.raises(TypeError, match="cannot encode dtype complex64"):
        tensors.encode(np.zeros(1, np.complex64))
