"""The cross-request batcher through the data plane, with a fake engine: merging, limits, drops,
failures, cancellation, per-version queues, and the config section.

The engine answers every row with its own first input value as the mean, so a caller can check
that it got exactly its rows back. Runs are held at a threading.Event gate, never with sleeps:
a "blocker" request occupies the only compute worker while the others queue up behind it. The
only waiting on time is the batcher's own max delay (set to 0 where it does not matter) and a
request's own deadline.
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

from service import metrics
from service.core.dataplane import DataPlane, PredictInput
from service.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelLoadError,
    ModelNotReady,
    ResourceExhausted,
)
from service.maths.uncertainty import RegressionStats, classification_stats, slice_rows
from service.repository import DEFAULT_MAX_QUEUE_DELAY_US, DynamicBatchingConfig, parse_config
from tests.support.fake_engine import CONFIG, SAFETY_TIMEOUT_S, make_core
from tests.support.fake_engine import FakeEngine as RowEngine  # the fake engine of every core test
from tests.support.plane import make_plane, source, wire

NO_DELAY = {"max_queue_delay_us": 0}
#: So long that a test would time out if the batcher waited it out instead of cutting at the cap.
LONG_DELAY = {"max_queue_delay_us": 10_000_000}


def config(batching: dict[str, Any] | None) -> dict[str, Any]:
    return CONFIG if batching is None else dict(CONFIG, dynamic_batching=batching)


def rows(first: float, count: int) -> NDArray[np.float32]:
    """``count`` rows whose first values are first, first + 1, ... (the row's identity)."""
    x = np.zeros((count, 3), np.float32)
    x[:, 0] = first + np.arange(count)
    return x


def request(x: NDArray[Any], **kw: Any) -> PredictInput:
    return PredictInput(**{"model": "m", "version": None, "inputs": [wire("x", x)], **kw})


def means(result: Any) -> list[float]:
    mean: NDArray[np.float64] = result.outputs[0].stats.mean
    return mean[:, 0].tolist()


def depth() -> float | None:
    return metrics.REGISTRY.get_sample_value("mcd_queue_depth")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def start(core: DataPlane, x: NDArray[Any], **kw: Any) -> asyncio.Future[Any]:
    return asyncio.ensure_future(core.predict(request(x, **kw)))


async def occupy_the_worker(core: DataPlane, engine: RowEngine) -> asyncio.Future[Any]:
    """Start a request with T = 1 and wait until its run holds the only compute worker."""
    blocker = start(core, rows(-1, 1), num_samples=1)
    await engine.wait_started()
    return blocker


# -- merging ----------------------------------------------------------------------------------


def test_a_row_with_non_finite_outputs_fails_only_its_request(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Three requests merged into one run; row 1 of the second overflows the model. That
    request gets INVALID_ARGUMENT naming its row; the others get their answers."""
    engine = RowEngine()
    core = make_core(engine, {"max_batch_rows": 6, **LONG_DELAY})
    poisoned = rows(10, 2)
    poisoned[1, 1] = 3e38

    async def scenario() -> list[Any]:
        tasks = [start(core, rows(0, 2)), start(core, poisoned), start(core, rows(20, 2))]
        return list(await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), SAFETY_TIMEOUT_S))  # fmt: skip

    first, second, third = loop.run_until_complete(scenario())
    assert engine.run_rows() == [[0, 1, 10, 11, 20, 21]]  # they did share the run
    assert means(first) == [0, 1]
    assert means(third) == [20, 21]
    assert isinstance(second, InvalidInput)
    assert "non-finite outputs for row 1 " in second.message


def test_concurrent_requests_with_the_same_t_share_one_run(
    loop: asyncio.AbstractEventLoop,
) -> None:
    engine = RowEngine()
    core = make_core(engine, {"max_batch_rows": 6, **LONG_DELAY})

    async def scenario() -> list[Any]:
        tasks = [start(core, rows(0, 2)), start(core, rows(10, 1)), start(core, rows(20, 3))]
        # 6 rows reach max_batch_rows: the batch is cut at once, not after the long delay.
        return list(await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_TIMEOUT_S))

    results = loop.run_until_complete(scenario())
    assert engine.run_rows() == [[0, 1, 10, 20, 21, 22]]  # one run, arrival order
    assert [means(r) for r in results] == [[0, 1], [10], [20, 21, 22]]
    assert [r.num_samples for r in results] == [10, 10, 10]
    assert depth() == 0


def test_requests_queued_behind_a_busy_worker_are_merged(
    loop: asyncio.AbstractEventLoop,
) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, NO_DELAY)

    async def scenario() -> list[Any]:
        blocker = await occupy_the_worker(core, engine)
        tasks = [start(core, rows(10 * i, 2)) for i in range(4)]
        await asyncio.sleep(0)  # let them be admitted
        gate.set()
        return list(await asyncio.gather(blocker, *tasks))

    results = loop.run_until_complete(scenario())
    assert engine.run_rows() == [[-1], [0, 1, 10, 11, 20, 21, 30, 31]]
    assert [means(r) for r in results[1:]] == [[0, 1], [10, 11], [20, 21], [30, 31]]


def test_different_t_or_version_is_never_merged(loop: asyncio.AbstractEventLoop) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, NO_DELAY)

    async def scenario() -> list[Any]:
        blocker = await occupy_the_worker(core, engine)
        tasks = [
            start(core, rows(0, 1), num_samples=5),
            start(core, rows(10, 1), num_samples=7),
            start(core, rows(20, 1), num_samples=5, version="1"),
            start(core, rows(30, 1), num_samples=5),  # joins the first
        ]
        await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.gather(blocker, *tasks))

    results = loop.run_until_complete(scenario())
    runs = sorted((x[:, 0].tolist(), t) for x, t in engine.runs[1:])
    assert runs == [([0, 30], 5), ([10], 7), ([20], 5)]
    assert [means(r) for r in results[1:]] == [[0], [10], [20], [30]]
    assert [(r.version, r.num_samples) for r in results[1:]] == [(2, 5), (2, 7), (1, 5), (2, 5)]


def test_max_batch_rows_is_respected_and_a_large_request_runs_alone(
    loop: asyncio.AbstractEventLoop,
) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, {"max_batch_rows": 4, **NO_DELAY})

    async def scenario() -> list[Any]:
        blocker = await occupy_the_worker(core, engine)
        sizes = (2, 2, 1, 6, 1, 3)
        tasks = [start(core, rows(10 * i, n)) for i, n in enumerate(sizes)]
        await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.gather(blocker, *tasks))

    results = loop.run_until_complete(scenario())
    # In arrival order: 2+2 fill the batch; 1 cannot take the 6 along; 6 runs alone; 1+3.
    assert [len(r) for r in engine.run_rows()] == [1, 4, 1, 6, 4]
    assert engine.run_rows()[3] == [30, 31, 32, 33, 34, 35]
    assert [len(means(r)) for r in results[1:]] == [2, 2, 1, 6, 1, 3]
    assert means(results[4]) == [30, 31, 32, 33, 34, 35]


def test_a_batch_stays_within_max_row_samples(loop: asyncio.AbstractEventLoop) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, NO_DELAY, max_row_samples=40)

    async def scenario() -> None:
        blocker = await occupy_the_worker(core, engine)
        tasks = [start(core, rows(10 * i, 2), num_samples=10) for i in range(3)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(blocker, *tasks)

    loop.run_until_complete(scenario())
    # 40 row-samples at T = 10: at most 4 rows per run.
    assert [len(r) for r in engine.run_rows()] == [1, 4, 2]


def test_disabled_batching_runs_every_request_alone(loop: asyncio.AbstractEventLoop) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, {"enabled": False})

    async def scenario() -> list[Any]:
        blocker = await occupy_the_worker(core, engine)
        tasks = [start(core, rows(10 * i, 1)) for i in range(3)]
        await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.gather(blocker, *tasks))

    results = loop.run_until_complete(scenario())
    assert engine.run_rows() == [[-1], [0], [10], [20]]
    assert [means(r) for r in results[1:]] == [[0], [10], [20]]


def test_each_version_runs_on_its_own_engine_with_its_own_policy(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Engine and policy are the version's, fixed when it loads: version 1 batches nothing,
    version 2 merges, and neither sees the other's rows."""
    gate = threading.Event()
    blocking, one, two = RowEngine(gate), RowEngine(), RowEngine()
    core = make_plane(
        [
            (source(config(NO_DELAY), name="b"), blocking),
            (source(config({"enabled": False}), version=1), one),
            (source(config({"max_batch_rows": 2, **LONG_DELAY}), version=2), two),
        ],
        compute_workers=1,
    )

    async def scenario() -> list[Any]:
        blocker = asyncio.ensure_future(
            core.predict(PredictInput("b", None, [wire("x", rows(-1, 1))], num_samples=1))
        )
        await blocking.wait_started()
        tasks = [
            start(core, rows(0, 1), version="1"),
            start(core, rows(10, 1), version="2"),
            start(core, rows(20, 1), version="1"),
            start(core, rows(30, 1), version="2"),
        ]
        await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.wait_for(asyncio.gather(blocker, *tasks), SAFETY_TIMEOUT_S))

    results = loop.run_until_complete(scenario())
    assert one.run_rows() == [[0], [20]]
    assert two.run_rows() == [[10, 30]]
    assert [(r.version, means(r)) for r in results[1:]] == [
        (1, [0]), (2, [10]), (1, [20]), (2, [30])
    ]  # fmt: skip


# -- requests that leave before their run -----------------------------------------------------


def test_cancelled_requests_are_dropped_before_the_run(loop: asyncio.AbstractEventLoop) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, NO_DELAY)

    async def scenario() -> list[Any]:
        blocker = await occupy_the_worker(core, engine)
        kept, gone, also_kept = (
            start(core, rows(0, 1)),
            start(core, rows(10, 1)),
            start(core, rows(20, 1)),
        )
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        gate.set()
        return list(await asyncio.gather(blocker, kept, also_kept))

    results = loop.run_until_complete(scenario())
    assert engine.run_rows() == [[-1], [0, 20]]  # the engine never saw row 10
    assert [means(r) for r in results[1:]] == [[0], [20]]
    assert depth() == 0


def test_expired_requests_are_dropped_before_the_run(loop: asyncio.AbstractEventLoop) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, NO_DELAY)

    async def scenario() -> list[Any]:
        blocker = await occupy_the_worker(core, engine)
        expiring = asyncio.ensure_future(core.predict(request(rows(10, 1)), timeout_s=0.01))
        kept = start(core, rows(20, 1))
        with pytest.raises(DeadlineExceeded):
            await expiring  # its own deadline passes while the worker is busy
        gate.set()
        return list(await asyncio.gather(blocker, kept))

    results = loop.run_until_complete(scenario())
    assert engine.run_rows() == [[-1], [20]]
    assert means(results[1]) == [20]


def test_a_cancelled_waiting_request_frees_its_queue_slot_at_once(
    loop: asyncio.AbstractEventLoop,
) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, NO_DELAY, compute_workers=1, max_queue_size=1)

    async def scenario() -> None:
        blocker = await occupy_the_worker(core, engine)
        waiting = start(core, rows(0, 1))
        await asyncio.sleep(0)
        assert depth() == 2
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0)  # the future's done callback runs
        assert depth() == 1
        replacement = start(core, rows(10, 1))  # admitted: the slot is free again
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(blocker, replacement)

    loop.run_until_complete(scenario())
    assert engine.run_rows() == [[-1], [10]]


# -- limits and failures ------------------------------------------------------------------------


def test_a_full_queue_answers_resource_exhausted(loop: asyncio.AbstractEventLoop) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, NO_DELAY, compute_workers=1, max_queue_size=2)

    async def scenario() -> list[Any]:
        blocker = await occupy_the_worker(core, engine)
        waiting = [start(core, rows(0, 1)), start(core, rows(10, 1))]
        await asyncio.sleep(0)
        assert depth() == 3
        with pytest.raises(ResourceExhausted, match="limit of 3 queued and running"):
            await core.predict(request(rows(20, 1)))
        gate.set()
        return list(await asyncio.gather(blocker, *waiting))

    results = loop.run_until_complete(scenario())
    assert len(results) == 3
    assert depth() == 0
    loop.run_until_complete(core.predict(request(rows(30, 1))))  # the slots were released


def test_an_engine_failure_reaches_every_caller_as_internal_error(
    loop: asyncio.AbstractEventLoop,
) -> None:
    engine = RowEngine(fail=True)
    core = make_core(engine, {"max_batch_rows": 3, **LONG_DELAY})

    async def scenario() -> list[BaseException | Any]:
        tasks = [start(core, rows(10 * i, 1)) for i in range(3)]
        gathered = asyncio.gather(*tasks, return_exceptions=True)
        return list(await asyncio.wait_for(gathered, SAFETY_TIMEOUT_S))

    errors = loop.run_until_complete(scenario())
    assert len(engine.runs) == 1
    assert all(isinstance(e, InternalError) for e in errors)
    assert len({id(e) for e in errors}) == 3  # one error object per caller
    assert all("secret" not in e.message for e in errors)
    assert depth() == 0


def test_an_answer_with_the_wrong_number_of_rows_is_an_internal_error(
    loop: asyncio.AbstractEventLoop,
) -> None:
    core = make_core(RowEngine(drop_a_row=True), {"max_batch_rows": 3, **LONG_DELAY})

    async def scenario() -> list[BaseException | Any]:
        tasks = [start(core, rows(0, 1)), start(core, rows(10, 2))]
        gathered = asyncio.gather(*tasks, return_exceptions=True)
        return list(await asyncio.wait_for(gathered, SAFETY_TIMEOUT_S))

    errors = loop.run_until_complete(scenario())
    assert all(isinstance(e, InternalError) for e in errors)


# -- callers leaving a running batch ------------------------------------------------------------


def test_one_caller_leaving_does_not_stop_the_run_for_the_others(
    loop: asyncio.AbstractEventLoop,
) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, {"max_batch_rows": 2, **LONG_DELAY})

    async def scenario() -> Any:
        leaving, staying = start(core, rows(0, 1)), start(core, rows(10, 1))
        await engine.wait_started()  # both are in the running batch
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        await asyncio.sleep(0)
        gate.set()
        return await staying

    result = loop.run_until_complete(scenario())
    assert means(result) == [10]
    token = engine.tokens[0]
    assert token is not None
    assert not token.cancelled
    assert depth() == 0


def test_when_every_caller_leaves_the_run_is_cancelled(loop: asyncio.AbstractEventLoop) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, {"max_batch_rows": 2, **LONG_DELAY})

    async def scenario() -> None:
        tasks = [start(core, rows(0, 1)), start(core, rows(10, 1))]
        await engine.wait_started()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # the futures' done callbacks run
        token = engine.tokens[0]
        assert token is not None
        assert token.cancelled
        gate.set()
        await core.close()  # waits for the cancelled run to end

    loop.run_until_complete(scenario())
    assert depth() == 0


def test_close_answers_waiting_requests_unavailable(loop: asyncio.AbstractEventLoop) -> None:
    gate = threading.Event()
    engine = RowEngine(gate)
    core = make_core(engine, NO_DELAY)

    async def scenario() -> None:
        blocker = await occupy_the_worker(core, engine)
        waiting = start(core, rows(0, 1))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(core.close())
        with pytest.raises(ModelNotReady):
            await waiting
        gate.set()
        await closing
        assert means(await blocker) == [-1]  # the running batch finished

    loop.run_until_complete(scenario())
    assert engine.run_rows() == [[-1]]


# -- metrics, row slicing, config ---------------------------------------------------------------


def test_batch_metrics_count_rows_and_requests_per_run(loop: asyncio.AbstractEventLoop) -> None:
    def sample(name: str) -> float:
        # The queue time is labelled with the version that ran (the newest, 2).
        labels = {"model": "m", **({"version": "2"} if "queue" in name else {})}
        return metrics.REGISTRY.get_sample_value(name, labels) or 0.0

    before = {n: sample(n) for n in ("mcd_batch_rows_sum", "mcd_batch_requests_count",
                                     "mcd_batch_requests_sum", "mcd_queue_duration_seconds_count")}  # fmt: skip
    core = make_core(RowEngine(), {"max_batch_rows": 5, **LONG_DELAY})

    async def scenario() -> None:
        tasks = [start(core, rows(0, 2)), start(core, rows(10, 3))]
        await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_TIMEOUT_S)

    loop.run_until_complete(scenario())
    assert sample("mcd_batch_rows_sum") - before["mcd_batch_rows_sum"] == 5
    assert sample("mcd_batch_requests_count") - before["mcd_batch_requests_count"] == 1
    assert sample("mcd_batch_requests_sum") - before["mcd_batch_requests_sum"] == 2
    queued = sample("mcd_queue_duration_seconds_count") - before["mcd_queue_duration_seconds_count"]
    assert queued == 2  # one queue wait per request


def test_slice_rows_cuts_every_per_row_array() -> None:
    rng = np.random.default_rng(0)
    stats = classification_stats(rng.standard_normal((7, 5, 3)), from_logits=True)
    part = slice_rows(stats, 1, 4)
    assert part.num_samples == 7
    for name in ("mean", "variance", "std", "predicted_class", "predictive_entropy",
                 "expected_entropy", "mutual_information", "variation_ratio", "vote_counts"):  # fmt: skip
        np.testing.assert_array_equal(getattr(part, name), getattr(stats, name)[1:4])


def test_config_section_defaults_and_values() -> None:
    assert parse_config(dict(CONFIG), "m").dynamic_batching == DynamicBatchingConfig(
        enabled=True, max_batch_rows=None, max_queue_delay_us=DEFAULT_MAX_QUEUE_DELAY_US
    )
    section = {"enabled": False, "max_batch_rows": 256, "max_queue_delay_us": 1000}
    parsed = parse_config(dict(CONFIG, dynamic_batching=section), "m").dynamic_batching
    assert parsed == DynamicBatchingConfig(False, 256, 1000)


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ([], r"dynamic_batching must be an object, got \[\]"),
        ({"max_queue_delay_microseconds": 5}, r"unknown keys \['max_queue_delay_microseconds'\]"),
        ({"enabled": "yes"}, "dynamic_batching.enabled must be true or false, got 'yes'"),
        ({"max_batch_rows": 0}, "dynamic_batching.max_batch_rows must be an integer >= 1, got 0"),
        ({"max_batch_rows": 2.5}, "max_batch_rows must be an integer >= 1, got 2.5"),
        ({"max_batch_rows": True}, "max_batch_rows must be an integer >= 1, got True"),
        (
            {"max_queue_delay_us": -1},
            r"max_queue_delay_us must be an integer in 0..10000000, got -1",
        ),
        ({"max_queue_delay_us": 10**8}, "max_queue_delay_us must be an integer in"),
        ({"max_queue_delay_us": "1ms"}, "got '1ms'"),
    ],
)
def test_config_section_errors_name_the_bad_value(section: Any, fragment: str) -> None:
    with pytest.raises(ModelLoadError, match=fragment):
        parse_config(dict(CONFIG, dynamic_batching=section), "m")


def test_slice_rows_slices_the_intervals_too() -> None:
    from service.maths.predictive import gaussian_interval
    from service.maths.uncertainty import regression_stats

    stats = regression_stats(np.arange(12.0).reshape(3, 4, 1))  # T=3, B=4
    interval = gaussian_interval(stats.mean, stats.variance, 0.9)
    with_intervals = dataclasses.replace(stats, intervals=(interval,))
    part = slice_rows(with_intervals, 1, 3)
    assert isinstance(part, RegressionStats)
    np.testing.assert_array_equal(part.intervals[0].lower, interval.lower[1:3])
    np.testing.assert_array_equal(part.intervals[0].upper, interval.upper[1:3])
    assert part.intervals[0].level == 0.9


PADDED: dict[str, Any] = {
    "task": "regression",
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, -1], "max_shape": [-1, 8]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 1], "semantics": "values"}],
    "num_samples": {"default": 10, "max": 100},
}


@pytest.mark.parametrize("pad", [None, -9.0])
def test_requests_of_different_lengths_share_a_run_only_when_the_model_pads(
    loop: asyncio.AbstractEventLoop, pad: float | None
) -> None:
    # Padded: the two requests fill the cap of 3 rows and run at once. Not padded: each waits
    # the delay in its own queue.
    batching: dict[str, Any] = {"max_batch_rows": 3, "max_queue_delay_us": 200_000}
    if pad is not None:
        batching["pad"] = {"x": pad}
    engine = RowEngine()
    core = make_plane([(source(dict(PADDED, dynamic_batching=batching)), engine)])
    short, long = np.zeros((1, 3), np.float32), np.ones((2, 5), np.float32)
    short[0, 0], long[:, 0] = 7.0, 8.0

    async def scenario() -> list[Any]:
        tasks = [start(core, short), start(core, long)]
        return list(await asyncio.wait_for(asyncio.gather(*tasks), SAFETY_TIMEOUT_S))

    first, second = loop.run_until_complete(scenario())
    assert means(first) == [7.0]
    assert means(second) == [8.0, 8.0]
    if pad is None:  # different lengths: two runs
        assert sorted(x.shape for x, _ in engine.runs) == [(1, 3), (2, 5)]
    else:  # one run, the short row padded at the end with the model's pad value
        ((x, _),) = engine.runs
        assert x.shape == (3, 5)
        np.testing.assert_array_equal(x[0], [7.0, 0.0, 0.0, pad, pad])
