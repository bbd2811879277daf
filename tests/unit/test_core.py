"""The data plane with a fake engine: validation, limits, admission, cancellation, deadlines,
listing and metadata.

Engines are gated with threading.Event, never with sleeps, so the tests do not depend on
timing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from service.core.dataplane import DataPlane, PredictInput, validate_inputs
from service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ResourceExhausted,
    VersionNotFound,
)
from service.repository import Task, parse_config
from service.settings import Settings
from tests.support.fake_engine import CONFIG, FakeEngine, make_core
from tests.support.plane import wire


def request(x: NDArray[Any] | None = None, **kw: Any) -> PredictInput:
    x = np.ones((2, 3), np.float32) if x is None else x
    return PredictInput(**{"model": "m", "version": None, "inputs": [wire("x", x)], **kw})


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_predict_uses_newest_version_and_default_samples(loop: asyncio.AbstractEventLoop) -> None:
    result = loop.run_until_complete(make_core(FakeEngine()).predict(request()))
    assert (result.version, result.num_samples) == (2, 10)
    assert result.outputs[0].stats.mean.shape == (2, 1)
    one = loop.run_until_complete(make_core(FakeEngine()).predict(request(version="1")))
    assert one.version == 1


@pytest.mark.parametrize(
    ("req", "error", "fragment"),
    [
        (request(model="zzz"), ModelNotFound, "model 'zzz' not found"),
        (
            request(version="7"),
            VersionNotFound,
            r"version '7' of model 'm' not found \(available: 2, 1\)",
        ),
        (request(version="x"), InvalidInput, "version must be a positive integer"),
        (request(num_samples=101), InvalidInput, r"num_samples must be in 1..100"),
        (request(np.ones((2, 3), np.float64)), InvalidInput, "must be float32, got float64"),
        (request(np.ones((2, 3, 1), np.float32)), InvalidInput, "must have rank 2"),
        (request(np.ones((2, 4), np.float32)), InvalidInput, r"must have shape \[-1, 3\]"),
        (request(np.ones((0, 3), np.float32)), InvalidInput, "the batch is empty"),
        (request(np.array([[1, np.nan, 0]], np.float32)), InvalidInput, "NaN or infinite"),
        (request(np.array([[1, np.inf, 0]], np.float32)), InvalidInput, "NaN or infinite"),
        (
            PredictInput("m", None, [wire("z", np.ones((1, 3), np.float32))]),
            InvalidInput,
            "missing",
        ),
        (
            PredictInput("m", None, [wire("x", np.ones((1, 3), np.float32))] * 2),
            InvalidInput,
            "input 'x' is given twice",
        ),
        (request(outputs=["y_mean", "y_std", "y_mean"]), InvalidInput, "requested twice"),
        (request(outputs=["y_entropy"]), InvalidInput, "has no output 'y_entropy'"),
        (request(interval_levels=(0.9,), num_samples=1), InvalidInput, "num_samples >= 2"),
        (
            request(np.ones((9, 3), np.float32)),
            ResourceExhausted,
            "9 rows is more than the limit of 8",
        ),
        (
            request(np.ones((5, 3), np.float32), num_samples=100),
            ResourceExhausted,
            "rows x samples",
        ),
    ],
)
def test_bad_requests_raise_the_right_error(
    loop: asyncio.AbstractEventLoop, req: PredictInput, error: type[Exception], fragment: str
) -> None:
    engine = FakeEngine()
    core = make_core(engine, max_batch_rows=8, max_row_samples=400)
    with pytest.raises(error, match=fragment):
        loop.run_until_complete(core.predict(req))
    assert not engine.runs
    loop.run_until_complete(core.predict(request()))  # and the next good request is served


def test_not_ready_core_answers_unavailable(loop: asyncio.AbstractEventLoop) -> None:
    core = DataPlane(Settings())
    with pytest.raises(ModelNotReady):
        loop.run_until_complete(core.predict(request()))


def test_engine_failure_becomes_a_generic_internal_error(loop: asyncio.AbstractEventLoop) -> None:
    with pytest.raises(InternalError) as info:
        loop.run_until_complete(make_core(FakeEngine(fail=True)).predict(request()))
    assert "secret" not in info.value.message
    assert not info.value.public


def test_full_queue_answers_resource_exhausted(loop: asyncio.AbstractEventLoop) -> None:
    gate = threading.Event()
    engine = FakeEngine(gate)
    core = make_core(engine, compute_workers=1, max_queue_size=1)

    async def scenario() -> list[object]:
        first = asyncio.ensure_future(core.predict(request()))
        # Another T, so the batcher cannot merge the two into one run.
        second = asyncio.ensure_future(core.predict(request(num_samples=11)))
        await asyncio.sleep(0)  # let both be admitted (1 running + 1 queued)
        with pytest.raises(ResourceExhausted, match="limit of 2 queued and running"):
            await core.predict(request())
        gate.set()
        return list(await asyncio.gather(first, second))

    results = loop.run_until_complete(scenario())
    assert len(results) == 2
    assert len(engine.runs) == 2
    loop.run_until_complete(core.predict(request()))  # slots were released


def test_deadline_while_running_cancels_the_work(loop: asyncio.AbstractEventLoop) -> None:
    gate = threading.Event()
    engine = FakeEngine(gate)
    core = make_core(engine)

    async def scenario() -> None:
        task = asyncio.ensure_future(core.predict(request(), timeout_s=0.05))
        await engine.wait_started()
        with pytest.raises(DeadlineExceeded):
            await task
        await asyncio.sleep(0)  # the caller's done callback runs
        (token,) = engine.tokens
        assert token is not None
        assert token.cancelled, "the deadline passed but the running work was not cancelled"
        gate.set()
        await core.close()  # the cancelled run ends before the loop closes

    loop.run_until_complete(scenario())


def test_expired_deadline_is_not_run(loop: asyncio.AbstractEventLoop) -> None:
    engine = FakeEngine()
    with pytest.raises(DeadlineExceeded):
        loop.run_until_complete(make_core(engine).predict(request(), timeout_s=0.0))
    assert not engine.runs


def test_cancelled_queued_request_is_dropped_before_it_runs(
    loop: asyncio.AbstractEventLoop,
) -> None:
    gate = threading.Event()
    engine = FakeEngine(gate)
    core = make_core(engine, compute_workers=1)

    async def scenario() -> None:
        first = asyncio.ensure_future(core.predict(request()))
        await engine.wait_started()
        queued = asyncio.ensure_future(core.predict(request()))
        await asyncio.sleep(0)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        gate.set()
        await first

    loop.run_until_complete(scenario())
    loop.run_until_complete(core.close())
    assert len(engine.runs) == 1  # the cancelled request never reached the engine


# -- what protocol layers ask besides predict ---------------------------------------------------


def test_listing_metadata_and_readiness(loop: asyncio.AbstractEventLoop) -> None:
    core = make_core(FakeEngine())
    [summary] = core.list_models()
    assert (summary.name, summary.versions, summary.task, summary.ready) == (
        "m", (2, 1), Task.REGRESSION, True
    )  # fmt: skip
    metadata = core.metadata("m", "1")
    assert (metadata.name, metadata.version, metadata.versions) == ("m", 1, (2, 1))
    assert metadata.provider == "FakeExecutionProvider"
    assert [(a.name, a.statistic.dtype.oip, a.shape) for a in metadata.statistics] == [
        ("y", "FP32", (-1, 1)),
        ("y_mean", "FP64", (-1, 1)),
        ("y_variance", "FP64", (-1, 1)),
        ("y_std", "FP64", (-1, 1)),
    ]
    assert core.metadata("m").version == 2
    assert core.model_ready("m")
    assert core.model_ready("m", "1")
    assert not core.model_ready("m", "7")
    assert not core.model_ready("zzz")
    with pytest.raises(InvalidInput, match="version must be a positive integer"):
        core.model_ready("m", "x")
    with pytest.raises(ModelNotFound):
        core.metadata("zzz")
    assert core.model_label("m") == "m"
    assert core.model_label("zzz") == "_unknown"
    core.set_not_ready()
    assert not core.model_ready("m")
    assert not core.list_models()[0].ready


def test_requested_outputs_are_answered_in_the_requested_order(
    loop: asyncio.AbstractEventLoop,
) -> None:
    result = loop.run_until_complete(
        make_core(FakeEngine()).predict(request(outputs=["y_std", "y_mean"]))
    )
    assert [a.name for a in result.answer] == ["y_std", "y_mean"]
    stats = result.outputs[0].stats
    np.testing.assert_array_equal(result.read(result.answer[0]), stats.std)
    np.testing.assert_array_equal(result.read(result.answer[1]), stats.mean)
    everything = loop.run_until_complete(make_core(FakeEngine()).predict(request()))
    assert [a.name for a in everything.answer] == ["y", "y_mean", "y_variance", "y_std"]


def test_wire_errors_are_invalid_input_and_nothing_runs(loop: asyncio.AbstractEventLoop) -> None:
    engine = FakeEngine()
    short = dataclasses.replace(wire("x", np.ones((2, 3), np.float32)), data=b"\0" * 23)
    with pytest.raises(InvalidInput, match=r"23 bytes of data for shape \[2, 3\] of float32"):
        loop.run_until_complete(make_core(engine).predict(request(inputs=[short])))
    assert not engine.runs


def test_unknown_model_is_reported_before_the_inputs_are_decoded(
    loop: asyncio.AbstractEventLoop,
) -> None:
    short = dataclasses.replace(wire("x", np.ones((2, 3), np.float32)), data=b"")
    with pytest.raises(ModelNotFound):
        loop.run_until_complete(
            make_core(FakeEngine()).predict(request(model="zzz", inputs=[short]))
        )


def test_a_dynamic_axis_beyond_the_batch_takes_any_size() -> None:
    """The shape check reads -1 as "any size" on every axis, not only the first."""
    config = parse_config(dict(CONFIG, name="m"), "m")
    spec = dataclasses.replace(config.inputs[0], shape=(-1, -1, 3))
    dynamic = dataclasses.replace(config, inputs=(spec,))
    assert validate_inputs(dynamic, {"x": np.ones((2, 5, 3), np.float32)}, 8) == 2
    assert validate_inputs(dynamic, {"x": np.ones((2, 1, 3), np.float32)}, 8) == 2
    with pytest.raises(InvalidInput, match=r"must have shape \[-1, -1, 3\], got \[2, 5, 4\]"):
        validate_inputs(dynamic, {"x": np.ones((2, 5, 4), np.float32)}, 8)


def test_client_names_in_messages_are_cut(loop: asyncio.AbstractEventLoop) -> None:
    """An unexpected input name of 100,000 characters, and many of them, come back cut: a
    status message never carries a client's string whole (service.errors.quote)."""
    long = "z" * 100_000
    many = [wire(f"{long}{i}", np.ones((1, 3), np.float32)) for i in range(20)]
    core = make_core(FakeEngine())
    with pytest.raises(InvalidInput) as raised:
        loop.run_until_complete(
            core.predict(request(inputs=[wire("x", np.ones((1, 3), np.float32)), *many]))
        )
    assert "unexpected [" in raised.value.message
    assert len(raised.value.message) < 1500
    with pytest.raises(InvalidInput, match="version must be a positive integer") as bad:
        loop.run_until_complete(core.predict(request(version=long)))
    assert len(bad.value.message) < 200
