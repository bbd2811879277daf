from __future__ import annotations

import numpy as np
import pytest

from service import tensors
from service.core.catalogue import Catalogue
from service.core.dataplane import OutputResult, PredictResult
from service.errors import InvalidInput
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.maths.uncertainty import classification_stats
from service.protocol.codec import decode_tensor, encode_tensor
from service.protocol.mcdropout_servicer import encode_result
from service.protocol.oip_codec import encode_outputs
from service.repository import parse_config


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


def test_shapes_that_overflow_or_exceed_numpy_are_invalid_not_internal() -> None:
    """int64 arithmetic made [2^32, 2^32] count 0 elements, so an empty blob passed the byte
    check and numpy's reshape failed (INTERNAL)."""
    huge = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2**32, 2**32], data=b"")
    with pytest.raises(InvalidInput, match="too large for any array"):
        decode_tensor(huge, "x")
    deep = pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[1] * 65, data=b"\0" * 4)
    with pytest.raises(InvalidInput, match="65 dimensions"):
        decode_tensor(deep, "x")


@pytest.mark.parametrize("labels", [["ant", "bee", "cat", "dog"], []])
def test_predict_and_oip_answer_the_catalogues_statistics_alike(labels: list[str]) -> None:
    """Both encoders read one catalogue: Predict sets exactly the catalogue's fields, and each
    holds the bytes of the OIP output of the same statistic."""
    config = parse_config(
        {
            "task": "classification",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
            "outputs": [{"name": "p", "dtype": "float32", "shape": [-1, 4], "semantics": "logits"}],
            "labels": labels,
        },
        "cls",
    )
    catalogue = Catalogue(config)
    logits = np.random.default_rng(1).standard_normal((20, 3, 4))
    stats = classification_stats(logits, from_logits=True)
    result = PredictResult(
        model="cls",
        version=1,
        num_samples=20,
        outputs=(OutputResult(config.outputs[0], stats, catalogue.statistics("p")),),
        answer=catalogue.answers,
    )
    [message] = encode_result(result).outputs
    fields = {f.name for f, _ in message.ListFields()} - {"name", "semantics"}
    assert fields == {s.field for s in catalogue.statistics("p")}
    for output in encode_outputs(result):
        statistic = next(a.statistic for a in catalogue.answers if a.name == output.name)
        if statistic.dtype.is_bytes:
            expected = tensors.encode(np.array(list(message.predicted_label), dtype=object))
            assert output.raw == expected
        elif output.name == "p":  # the graph's own output: its mean, in the graph's dtype
            mean = np.frombuffer(message.mean.data, "<f8")
            assert output.raw == mean.astype("<f4").tobytes()
        else:
            assert getattr(message, statistic.field).data == output.raw
