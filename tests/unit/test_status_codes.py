from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any
from unittest.mock import MagicMock

import grpc
import numpy as np
import pytest

from service import errors, metrics
from service.gen.inference import grpc_service_pb2 as oip
from service.maths.uncertainty import regression_stats
from service.protocol.grpc_server import OIP_SERVICE_NAME, StatusInterceptor, status_of
from service.protocol.oip_servicer import OpenInferenceServicer
from tests.support.plane import make_plane, source


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidInput("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFound("m"), grpc.StatusCode.NOT_FOUND),
        (errors.VersionNotFound("m", "3", ["1"]), grpc.StatusCode.NOT_FOUND),
        (errors.ResourceExhausted("big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ModelNotReady("m", "1"), grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Cancelled("gone"), grpc.StatusCode.CANCELLED),
    ],
)
def test_each_error_maps_to_its_status_with_its_message(
    exc: errors.ServiceError, code: grpc.StatusCode
) -> None:
    assert status_of(exc) == (code, exc.message)


@pytest.mark.parametrize(
    "exc", [errors.InternalError("db password is hunter2"), KeyError("hunter2"), RuntimeError("x")]
)
def test_internal_errors_never_leak_details(exc: Exception) -> None:
    code, message = status_of(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert "hunter2" not in message
    assert message.startswith("internal error")


def test_every_error_class_maps_to_a_real_error_status() -> None:
    checked = []
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.ServiceError):
            assert cls.code in grpc.StatusCode.__members__, (
                f"{name}.code {cls.code!r}: no such status"
            )
            assert cls.code != "OK", f"{name} would answer a failure with OK"
            exc = cls.__new__(cls)  # the subclasses' constructors differ; the base's is enough
            errors.ServiceError.__init__(exc, "message")
            assert status_of(exc)[0] == grpc.StatusCode[cls.code], name
            checked.append(name)
    # The scan found the tree (the base and its leaves).
    assert "ServiceError" in checked, checked
    assert "InvalidInput" in checked, checked


# -- one bookkeeping for unary calls and stream messages ----------------------------------------

CONFIG = {
    "task": "regression",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1], "semantics": "values"}],
}


class GatedEngine:
    """Holds every run at a gate, so a call can be cut off while it runs."""

    provider = "FakeExecutionProvider"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()

    def run(self, inputs: Any, num_samples: int, cancel: Any = None, **_: Any) -> list[Any]:
        self.started.set()
        assert self.gate.wait(10), "test gate never opened"
        samples = np.zeros((num_samples, len(inputs["x"]), 1))
        return [regression_stats(samples)]


class FakeContext:
    """A servicer context whose time left is set by the test."""

    def __init__(self) -> None:
        self.remaining_s: float | None = 30.0

    def time_remaining(self) -> float | None:
        return self.remaining_s

    def cancelled(self) -> bool:
        return False

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"unexpected abort {code}: {details}")


def infer_request() -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    request.raw_input_contents.append(np.zeros((1, 3), "<f4").tobytes())
    return request


async def unary(servicer: OpenInferenceServicer, plane: Any, context: FakeContext) -> Any:
    """ModelInfer as grpc.aio runs it: through the interceptor."""
    details = MagicMock(method=f"/{OIP_SERVICE_NAME}/ModelInfer")

    async def continuation(_: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(servicer.ModelInfer)

    handler = await StatusInterceptor(plane.model_label).intercept_service(continuation, details)
    return await handler.unary_unary(infer_request(), context)


async def stream(servicer: OpenInferenceServicer, plane: Any, context: FakeContext) -> Any:
    """One message on a ModelStreamInfer stream."""

    async def requests() -> AsyncIterator[oip.ModelInferRequest]:
        yield infer_request()

    return [answer async for answer in servicer.ModelStreamInfer(requests(), context)]


def recorded(method: str, code: str) -> float:
    # A call that failed has no answering version.
    labels = {"model": "m", "version": "", "method": method, "code": code}
    count = metrics.REGISTRY.get_sample_value("mcd_request_duration_seconds_count", labels)
    return count or 0.0


@pytest.mark.parametrize(("call", "method"), [(unary, "ModelInfer"), (stream, "ModelStreamInfer")])
@pytest.mark.parametrize(("remaining_s", "code"), [(0.0, "DEADLINE_EXCEEDED"), (5.0, "CANCELLED")])
def test_a_call_cut_off_while_it_runs_is_recorded_the_same_way_unary_or_streamed(
    call: Any, method: str, remaining_s: float, code: str
) -> None:
    """A call cancelled when its deadline has passed counts as DEADLINE_EXCEEDED, one cancelled
    with time left as CANCELLED: for a unary call and for a message of a stream alike."""
    engine = GatedEngine()
    plane = make_plane([(source(CONFIG), engine)])
    servicer = OpenInferenceServicer(plane)
    context = FakeContext()
    before = recorded(method, code)

    async def scenario() -> None:
        task = asyncio.ensure_future(call(servicer, plane, context))
        started = await asyncio.get_running_loop().run_in_executor(None, engine.started.wait, 5)
        assert started, "the engine never started"
        context.remaining_s = remaining_s
        task.cancel()  # what grpc.aio does at the deadline, or when the client cancels
        with pytest.raises(asyncio.CancelledError):
            await task
        engine.gate.set()
        await plane.close()

    asyncio.run(scenario())
    assert recorded(method, code) == before + 1
    gauge = metrics.REGISTRY.get_sample_value("mcd_requests_in_flight", {"method": method})
    assert gauge == 0
