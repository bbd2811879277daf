"""Every bad input gets its status code with a clear message, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from mcdropout_client import (
    Client,
    ClientError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from service.gen.mcdropout.v1 import mcdropout_pb2 as pb
from service.gen.mcdropout.v1 import mcdropout_pb2_grpc as pb_grpc
from service.protocol.codec import encode_tensor

Code = grpc.StatusCode
GOOD = np.zeros((2, 6), np.float32)


def predict_raw(client: Client, request: pb.PredictRequest, timeout: float = 60) -> None:
    """Send a Predict message as it is, on the client's connection: the client itself refuses
    to send what it can tell is wrong (a wrong dtype, an unknown input), the server must too."""
    pb_grpc.MCDropoutServiceStub(client.channel).Predict(request, timeout=timeout)


def req(x: Any = GOOD, **kw: Any) -> pb.PredictRequest:
    inputs = {"x": x} if x is not None else {}
    return pb.PredictRequest(
        model=kw.pop("model", "tiny_cls"),
        inputs=[pb.NamedTensor(name=k, tensor=encode_tensor(v)) for k, v in inputs.items()],
        **kw,
    )


def raw_tensor(**kw: Any) -> pb.PredictRequest:
    return pb.PredictRequest(
        model="tiny_cls", inputs=[pb.NamedTensor(name="x", tensor=pb.Tensor(**kw))]
    )


#: (case, request, code, message fragment, the call through the client or None when the
#: client refuses to send it).
CASES: list[tuple[str, pb.PredictRequest, Code, str, Callable[[Client], Any] | None]] = [
    ("wrong dtype", req(GOOD.astype(np.float64)), Code.INVALID_ARGUMENT, "must be float32, got float64", None),
    ("wrong rank", req(np.zeros((2, 6, 1), np.float32)), Code.INVALID_ARGUMENT, "must have rank 2", lambda c: c.predict("tiny_cls", np.zeros((2, 6, 1), np.float32))),
    ("wrong shape", req(np.zeros((2, 5), np.float32)), Code.INVALID_ARGUMENT, r"must have shape [-1, 6], got [2, 5]", lambda c: c.predict("tiny_cls", np.zeros((2, 5), np.float32))),
    ("byte length", raw_tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=[2, 6], data=b"\0" * 47), Code.INVALID_ARGUMENT, "47 bytes of data", None),
    ("unknown dtype", raw_tensor(dtype=pb.DATA_TYPE_UNSPECIFIED, shape=[1], data=b"\0"), Code.INVALID_ARGUMENT, "unsupported dtype", None),
    ("NaN", req(np.full((2, 6), np.nan, np.float32)), Code.INVALID_ARGUMENT, "NaN or infinite", lambda c: c.predict("tiny_cls", np.full((2, 6), np.nan, np.float32))),
    ("infinity", req(np.full((1, 6), -np.inf, np.float32)), Code.INVALID_ARGUMENT, "NaN or infinite", lambda c: c.predict("tiny_cls", np.full((1, 6), -np.inf, np.float32))),
    ("empty batch", req(np.zeros((0, 6), np.float32)), Code.INVALID_ARGUMENT, "the batch is empty", lambda c: c.predict("tiny_cls", np.zeros((0, 6), np.float32))),
    ("missing input", req(None), Code.INVALID_ARGUMENT, "missing ['x']", None),
    ("unexpected input", pb.PredictRequest(model="tiny_cls", inputs=[pb.NamedTensor(name=n, tensor=encode_tensor(GOOD)) for n in "xy"]), Code.INVALID_ARGUMENT, "unexpected ['y']", None),
    ("T above max", req(num_samples=20_001), Code.INVALID_ARGUMENT, "num_samples must be in 1..20000", lambda c: c.predict("tiny_cls", GOOD, num_samples=20_001)),
    ("no model name", req(model=""), Code.NOT_FOUND, "model '' not found", lambda c: c.predict("", GOOD)),
    ("unknown model", req(model="nope"), Code.NOT_FOUND, "model 'nope' not found", lambda c: c.predict("nope", GOOD)),
    ("unknown version", req(version="9"), Code.NOT_FOUND, "version '9' of model 'tiny_cls' not found", lambda c: c.predict("tiny_cls", GOOD, version=9)),
    ("bad version", req(version="latest"), Code.INVALID_ARGUMENT, "version must be a positive integer", lambda c: c.predict("tiny_cls", GOOD, version="latest")),
    ("too many rows", req(np.zeros((65, 6), np.float32)), Code.RESOURCE_EXHAUSTED, "65 rows is more than the limit of 64", lambda c: c.predict("tiny_cls", np.zeros((65, 6), np.float32))),
    ("rows x samples", req(np.zeros((64, 6), np.float32), num_samples=10_000), Code.RESOURCE_EXHAUSTED, "rows x samples = 64 x 10000", lambda c: c.predict("tiny_cls", np.zeros((64, 6), np.float32), num_samples=10_000)),
    ("message size", req(np.zeros((50_000, 6), np.float32)), Code.RESOURCE_EXHAUSTED, "", lambda c: c.predict("tiny_cls", np.zeros((50_000, 6), np.float32))),
]  # fmt: skip

#: The client's exception class of each status code above.
FAMILY: dict[Code, type[ClientError]] = {
    Code.INVALID_ARGUMENT: InvalidArgumentError,
    Code.NOT_FOUND: NotFoundError,
    Code.RESOURCE_EXHAUSTED: ResourceExhaustedError,
}


@pytest.mark.parametrize(
    ("case", "request_", "code", "fragment", "call"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_gets_its_status_and_the_server_keeps_serving(  # noqa: PLR0917 (parametrized)
    client: Client,
    case: str,
    request_: pb.PredictRequest,
    code: Code,
    fragment: str,
    call: Callable[[Client], Any] | None,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        predict_raw(client, request_)
    assert info.value.code() == code, info.value.details()
    assert fragment in (info.value.details() or "")
    if call is not None:  # the same through the client: its exception class, code and message
        with pytest.raises(FAMILY[code]) as error:
            call(client)
        assert error.value.code == code
        assert fragment in error.value.details
    answer = client.predict("tiny_cls", GOOD, num_samples=5)
    assert answer.mean.shape == (2, 4)


def test_duplicate_input_is_invalid(client: Client) -> None:
    tensor = encode_tensor(GOOD)
    request = pb.PredictRequest(
        model="tiny_cls", inputs=[pb.NamedTensor(name="x", tensor=tensor)] * 2
    )
    with pytest.raises(grpc.RpcError) as info:
        predict_raw(client, request)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "given twice" in (info.value.details() or "")


def test_deadline_exceeded(client: Client) -> None:
    client.model_metadata("tiny_cls")  # kept: the deadline then covers Predict alone
    with pytest.raises(DeadlineExceededError):
        client.predict("tiny_cls", np.zeros((40, 6), np.float32), num_samples=10_000, timeout=0.001)
    assert client.predict("tiny_cls", GOOD, num_samples=5).num_samples == 5


def test_cancelled_request_does_not_disturb_the_server(client: Client) -> None:
    stub = pb_grpc.MCDropoutServiceStub(client.channel)
    future = stub.Predict.future(req(np.zeros((40, 6), np.float32), num_samples=10_000))
    future.cancel()
    assert future.cancelled() or future.code() == Code.CANCELLED or future.done()
    assert client.predict("tiny_cls", GOOD, num_samples=5).num_samples == 5
