"""Every bad input gets its status code with a clear message, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.protocol.codec import encode_tensor
from tests.integration.client import Client

Code = grpc.StatusCode
GOOD = np.zeros((2, 6), np.float32)


def req(client: Client, x: Any = GOOD, **kw: Any) -> pb.PredictRequest:
    return client.request(kw.pop("model", "tiny_cls"), {"x": x} if x is not None else {}, **kw)


def raw_tensor(**kw: Any) -> pb.PredictRequest:
    return pb.PredictRequest(
        model="tiny_cls", inputs=[pb.NamedTensor(name="x", tensor=pb.Tensor(**kw))]
    )


CASES: list[tuple[str, Callable[[Client], pb.PredictRequest], Code, str]] = [
    ("wrong dtype", lambda c: req(c, GOOD.astype(np.float64)), Code.INVALID_ARGUMENT, "must be float32, got float64"),
    ("wrong rank", lambda c: req(c, np.zeros((2, 6, 1), np.float32)), Code.INVALID_ARGUMENT, "must have rank 2"),
    ("wrong shape", lambda c: req(c, np.zeros((2, 5), np.float32)), Code.INVALID_ARGUMENT, r"must have shape [-1, 6], got [2, 5]"),
    ("byte length", lambda c: raw_tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 6], data=b"\0" * 47), Code.INVALID_ARGUMENT, "47 bytes of data"),
    ("unknown dtype", lambda c: raw_tensor(dtype=pb.DATA_TYPE_UNSPECIFIED, shape=[1], data=b"\0"), Code.INVALID_ARGUMENT, "unsupported dtype"),
    ("NaN", lambda c: req(c, np.full((2, 6), np.nan, np.float32)), Code.INVALID_ARGUMENT, "NaN or infinite"),
    ("infinity", lambda c: req(c, np.full((1, 6), -np.inf, np.float32)), Code.INVALID_ARGUMENT, "NaN or infinite"),
    ("empty batch", lambda c: req(c, np.zeros((0, 6), np.float32)), Code.INVALID_ARGUMENT, "the batch is empty"),
    ("missing input", lambda c: req(c, None), Code.INVALID_ARGUMENT, "missing ['x']"),
    ("unexpected input", lambda c: c.request("tiny_cls", {"x": GOOD, "y": GOOD}), Code.INVALID_ARGUMENT, "unexpected ['y']"),
    ("T above max", lambda c: req(c, num_samples=20_001), Code.INVALID_ARGUMENT, "num_samples must be in 1..20000"),
    ("no model name", lambda c: req(c, model=""), Code.NOT_FOUND, "model '' not found"),
    ("unknown model", lambda c: req(c, model="nope"), Code.NOT_FOUND, "model 'nope' not found"),
    ("unknown version", lambda c: req(c, version="9"), Code.NOT_FOUND, "version '9' of model 'tiny_cls' not found"),
    ("bad version", lambda c: req(c, version="latest"), Code.INVALID_ARGUMENT, "version must be a positive integer"),
    ("too many rows", lambda c: req(c, np.zeros((65, 6), np.float32)), Code.RESOURCE_EXHAUSTED, "65 rows is more than the limit of 64"),
    ("rows x samples", lambda c: req(c, np.zeros((64, 6), np.float32), num_samples=10_000), Code.RESOURCE_EXHAUSTED, "rows x samples = 64 x 10000"),
    ("message size", lambda c: c.request("tiny_cls", {"x": np.zeros((50_000, 6), np.float32)}), Code.RESOURCE_EXHAUSTED, ""),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "code", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_its_status_and_the_server_keeps_serving(
    client: Client,
    case: str,
    make: Callable[[Client], pb.PredictRequest],
    code: Code,
    fragment: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.predict_raw(make(client))
    assert info.value.code() == code, info.value.details()
    assert fragment in (info.value.details() or "")
    answer = client.predict("tiny_cls", {"x": GOOD}, num_samples=5)
    assert answer["logits"]["mean"].shape == (2, 4)


def test_duplicate_input_is_invalid(client: Client) -> None:
    tensor = encode_tensor(GOOD)
    request = pb.PredictRequest(
        model="tiny_cls", inputs=[pb.NamedTensor(name="x", tensor=tensor)] * 2
    )
    with pytest.raises(grpc.RpcError) as info:
        client.predict_raw(request)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "given twice" in (info.value.details() or "")


def test_deadline_exceeded(client: Client) -> None:
    request = req(client, np.zeros((40, 6), np.float32), num_samples=10_000)
    with pytest.raises(grpc.RpcError) as info:
        client.predict_raw(request, timeout=0.001)
    assert info.value.code() == Code.DEADLINE_EXCEEDED
    assert client.predict("tiny_cls", {"x": GOOD}, num_samples=5)["num_samples"] == 5


def test_cancelled_request_does_not_disturb_the_server(client: Client) -> None:
    future = client.stub.Predict.future(
        req(client, np.zeros((40, 6), np.float32), num_samples=10_000)
    )
    future.cancel()
    assert future.cancelled() or future.code() == Code.CANCELLED or future.done()
    assert client.predict("tiny_cls", {"x": GOOD}, num_samples=5)["num_samples"] == 5
