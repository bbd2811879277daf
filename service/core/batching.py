"""Cross-request dynamic batching: concurrent requests for one model version and one T share
one engine run.

::

    VersionQueue.submit() --admit--> _Queue per RunKey (T, ...) --dispatcher--> _Batch --> run
       ^                              waiting requests,              when rows >= cap, or the
       |                              arrival order                  oldest waited the delay,
       |                                                             and a worker is free
       +---------- rows [start:stop) of every output <------ _deliver (the one place answers
                                                             are cut per request)

Each loaded version owns a :class:`VersionQueue`, built at load time with its engine and its
:class:`BatchPolicy`; a request is submitted with its own data only. The :class:`Batcher` holds
what every version shares: admission, the compute workers and their executor.

Merging cannot change an answer's distribution: the engine tiles the merged rows to
[T*B_total, ...] and draws dropout masks per element, so every row gets T independent masks
whoever shares its run, and every statistic is computed per row.

Rules:
    * Admission is bounded: at most ``compute_workers + max_queue_size`` requests are admitted
      and unfinished; one more gets ResourceExhausted instead of growing a queue.
    * A batch takes waiting requests in arrival order while their rows fit the cap
      (``max_batch_rows``, and never more rows x T than ``max_row_samples``, the limit of one
      request); the first one that does not fit waits for the next batch. A single request
      above the cap runs alone.
    * A batch is cut only when a compute worker is free, so under load it grows up to the cap
      instead of queueing small runs behind each other; at most ``compute_workers`` runs
      execute at once, on the executor, never on the event loop.
    * Requests whose caller is gone (cancelled, deadline passed) are dropped before the run;
      their rows never reach the engine.
    * Every admitted request's future gets a result or an exception, whatever happens to the
      run; a caller that gives up never stops the run for the others, but when every caller
      of a running batch is gone its CancelToken is cancelled.
    * A version's queue counts its users (data plane calls holding it, requests admitted and
      not finished): a version swapped out or unloaded is retired (:meth:`Batcher.retire`)
      once that count is zero, so what was in flight on it finishes on it, and the batcher
      then forgets it (its engine is freed with the last reference).

All the queue state lives on the event loop thread (only the engine run happens on a worker
thread), so it needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service import metrics
from service.core.statistics import StatisticsStore, VersionStatistics
from service.engine.runtime import CancelToken, Engine, OutputStats
from service.errors import (
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotReady,
    ResourceExhausted,
    ServiceError,
)
from service.maths.uncertainty import slice_rows
from service.repository import DynamicBatchingConfig

__all__ = ["BatchPolicy", "Batcher", "RunKey", "VersionQueue"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    """How one model version batches (its config.json section, resolved against the settings).

    Attributes:
        enabled: False runs every request on its own, at once.
        max_batch_rows: most rows in one merged run.
        max_queue_delay_s: longest time the oldest waiting request is held back for others.
    """

    enabled: bool
    max_batch_rows: int
    max_queue_delay_s: float
    #: per input, the value padding its dynamic axes when requests of different lengths share
    #: a run (``dynamic_batching.pad``); empty: they never do
    pad: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_config(cls, config: DynamicBatchingConfig, default_max_batch_rows: int) -> BatchPolicy:
        """The policy of a model's ``dynamic_batching`` section.

        Args:
            config: the parsed section.
            default_max_batch_rows: the cap when the section sets none (``--max-batch-rows``).
        """
        return cls(
            enabled=config.enabled,
            max_batch_rows=config.max_batch_rows or default_max_batch_rows,
            max_queue_delay_s=config.max_queue_delay_us / 1e6,
            pad=config.pad,
        )


@dataclass(frozen=True)
class RunKey:
    """Requests of one version can share a run only with equal keys: the same T and options."""

    num_samples: int
    #: requests that want their raw samples run apart: keeping samples costs memory.
    return_samples: bool = False
    #: prediction interval levels (they need every sample too)
    interval_levels: tuple[float, ...] = ()
    #: seeded requests share runs only with the same seed (each row's noise depends on it)
    seed: int | None = None
    #: models with dynamic axes: the inputs' row shapes (rows of different lengths cannot be
    #: stacked into one run); empty for models without
    row_shapes: tuple[tuple[int, ...], ...] = ()


class _State(enum.Enum):
    WAITING = "waiting"  # in its queue's pending deque
    RUNNING = "running"  # in a batch handed to the executor
    DONE = "done"  # admission slot released


@dataclass(eq=False)
class _Request:
    """One admitted request. ``future`` gets exactly one outcome."""

    inputs: Mapping[str, NDArray[Any]]
    rows: int
    future: asyncio.Future[list[OutputStats]]
    arrived_ns: int  # time.perf_counter_ns(), for the queue time (read on a worker thread)
    arrived_at: float  # loop.time(), for the delay timer
    expires_at: float | None  # loop.time() of the caller's deadline
    state: _State = _State.WAITING
    batch: _Batch | None = None


@dataclass(eq=False)
class _Batch:
    """Requests merged into one engine run, in arrival order."""

    requests: list[_Request]
    token: CancelToken = field(default_factory=CancelToken)
    finished: bool = False

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.requests)


class _Queue:
    """The waiting requests of one version and one :class:`RunKey`, with the task that cuts
    their batches."""

    def __init__(self, version: VersionQueue, run: RunKey, cap_rows: int) -> None:
        self.version = version
        self.run = run
        self.policy = version.policy
        self.cap_rows = cap_rows
        self.pending: deque[_Request] = deque()
        self.pending_rows = 0
        self.arrived = asyncio.Event()  # wakes the dispatcher to recheck the row count
        self.dispatcher: asyncio.Task[None] | None = None

    def add(self, request: _Request) -> None:
        self.pending.append(request)
        self.pending_rows += request.rows
        self.arrived.set()

    def remove(self, request: _Request) -> None:
        self.pending.remove(request)
        self.pending_rows -= request.rows

    def ready(self) -> bool:
        """Whether a batch should be cut now, without waiting out the delay."""
        return not self.policy.enabled or self.pending_rows >= self.cap_rows

    def fits(self, taken: list[_Request], rows: int, request: _Request) -> bool:
        """Whether ``request`` may join a batch that already holds ``taken`` (``rows`` rows)."""
        if not taken:
            return True  # the first request always runs, even above the cap: alone
        return self.policy.enabled and rows + request.rows <= self.cap_rows


class VersionQueue:
    """One loaded version's batching: its engine, its policy, and its waiting requests.

    Built once, at load time, by :meth:`Batcher.version_queue`; requests are submitted with
    their own data only. Waiting requests are kept per :class:`RunKey` (only equal keys merge),
    in queues made when a key is first seen and forgotten when they empty.

    Its users are counted (:meth:`hold`, and each admitted request until it finishes), so that
    a version taken out of service can wait until nothing uses it (:meth:`drained`).

    Attributes:
        model: the model's name (metrics label).
        version: the version number.
        engine: the version's engine; the only caller of its ``run`` is the batcher.
        policy: the version's batching policy.
        statistics: the version's statistics (Triton's statistics extension), fed by its runs
            and by the data plane's requests.
    """

    def __init__(
        self, batcher: Batcher, model: str, version: int, engine: Engine, policy: BatchPolicy
    ) -> None:
        self._batcher = batcher
        self.model = model
        self.version = version
        self.engine = engine
        self.policy = policy
        self.statistics: VersionStatistics = batcher.statistics.version(model, version)
        self._queues: dict[RunKey, _Queue] = {}
        self._users = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def users(self) -> int:
        """Data plane calls holding this version plus its requests admitted and not finished."""
        return self._users

    def _use(self) -> None:
        self._users += 1
        self._idle.clear()

    def _release(self) -> None:
        self._users -= 1
        if self._users == 0:
            self._idle.set()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Count a data plane call as a user of this version for as long as it uses it (an
        adaptive request submits several rounds: it holds the version between them)."""
        self._use()
        try:
            yield
        finally:
            self._release()

    async def drained(self) -> None:
        """Return once nothing uses this version: no call holds it, no request waits or runs."""
        while self._users:
            await self._idle.wait()

    async def submit(
        self,
        inputs: Mapping[str, NDArray[Any]],
        rows: int,
        run: RunKey,
        *,
        timeout_s: float | None = None,
    ) -> list[OutputStats]:
        """Admit one validated request, wait for its batch to run, return its rows.

        Args:
            inputs: one (B, ...) array per model input.
            rows: B.
            run: T and the options; only requests with equal keys are merged.
            timeout_s: time left until the caller's deadline; None for none.

        Returns:
            One statistics object per model output, each with this request's B rows.

        Raises:
            ResourceExhausted: the queue is full.
            DeadlineExceeded: the deadline passed before the answer was ready.
            ModelNotReady: the batcher is closed.
            ServiceError: the run failed (InternalError, with the details in the log).
        """
        batcher = self._batcher
        if batcher._closed:
            raise ModelNotReady(self.model, str(self.version))
        batcher._admit()
        self._use()  # released with the admission slot (Batcher._finish)
        loop = asyncio.get_running_loop()
        now = loop.time()
        request = _Request(
            inputs=inputs,
            rows=rows,
            future=loop.create_future(),
            arrived_ns=time.perf_counter_ns(),
            arrived_at=now,
            expires_at=None if timeout_s is None else now + timeout_s,
        )
        queue = self._queue(run)
        request.future.add_done_callback(lambda _: batcher._on_caller_done(queue, request))
        queue.add(request)
        if queue.dispatcher is None:
            queue.dispatcher = asyncio.create_task(batcher._dispatch(queue))
        try:
            # Cancelling the caller (or its deadline) cancels only this future: the batch
            # runs in its own task and goes on for the others.
            return await asyncio.wait_for(request.future, timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"the deadline passed before the answer was ready ({run.num_samples} samples)"
            ) from None

    def _queue(self, run: RunKey) -> _Queue:
        queue = self._queues.get(run)
        if queue is None:
            cap = max(1, self._batcher._max_row_samples // run.num_samples)
            queue = self._queues[run] = _Queue(self, run, min(self.policy.max_batch_rows, cap))
        return queue

    def _forget(self, queue: _Queue) -> None:
        """Drop an empty queue (its dispatcher ended)."""
        if not queue.pending and self._queues.get(queue.run) is queue:
            del self._queues[queue.run]

    def _close(self) -> list[_Queue]:
        """Hand over the waiting queues and forget them (the batcher is closing)."""
        queues = list(self._queues.values())
        self._queues.clear()
        return queues


class Batcher:
    """Merges concurrent requests into engine runs; owned by the data plane, protocol-neutral.

    It holds what every version shares; each version's queue comes from
    :meth:`version_queue`, at load time.

    Args:
        executor: runs the engine (its thread count should be ``compute_workers``).
        compute_workers: engine runs executing at once.
        max_queue_size: requests admitted beyond those running; one more is refused.
        max_row_samples: most rows x T of one run (the limit of one request), so that merging
            never makes a run longer than the largest single request could.
        statistics: where the versions' statistics are kept (a new store by default).
    """

    def __init__(
        self,
        executor: Executor,
        *,
        compute_workers: int,
        max_queue_size: int,
        max_row_samples: int,
        statistics: StatisticsStore | None = None,
    ) -> None:
        #: every version's statistics (kept across reloads of a version)
        self.statistics = statistics or StatisticsStore()
        self._executor = executor
        self._limit = compute_workers + max_queue_size
        self._max_row_samples = max_row_samples
        self._workers = asyncio.Semaphore(compute_workers)
        self._admitted = 0
        self._versions: list[VersionQueue] = []
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    def version_queue(
        self, model: str, version: int, engine: Engine, policy: BatchPolicy
    ) -> VersionQueue:
        """The queue of one loaded version (call once per version, when it loads).

        Its requests share this batcher's admission limit and compute workers.
        """
        queue = VersionQueue(self, model, version, engine, policy)
        self._versions.append(queue)
        return queue

    async def retire(self, queue: VersionQueue) -> None:
        """Forget a version taken out of service, once nothing uses it any more: calls and
        requests in flight on it finish on it first. Closing the batcher meanwhile answers its
        waiting requests as it answers every other's."""
        await queue.drained()
        if queue in self._versions:
            self._versions.remove(queue)

    async def close(self) -> None:
        """Refuse new requests, answer waiting ones UNAVAILABLE, let running batches finish."""
        self._closed = True
        queues = [q for version in self._versions for q in version._close()]
        dispatchers = [q.dispatcher for q in queues if q.dispatcher is not None]
        for dispatcher in dispatchers:
            dispatcher.cancel()
        for queue in queues:
            while queue.pending:
                request = queue.pending[0]
                self._drop(queue, request)
                if not request.future.done():
                    request.future.set_exception(
                        ModelNotReady(queue.version.model, str(queue.version.version))
                    )
        await asyncio.gather(*dispatchers, *self._running, return_exceptions=True)

    # -- admission ---------------------------------------------------------------------------

    def _admit(self) -> None:
        """Take an admission slot for a new request, or refuse it (ResourceExhausted)."""
        if self._admitted >= self._limit:
            raise ResourceExhausted(
                f"the server is at its limit of {self._limit} queued and running requests; "
                "retry later"
            )
        self._admitted += 1
        metrics.QUEUE_DEPTH.set(self._admitted)

    def _finish(self, queue: _Queue, request: _Request) -> None:
        """Release the request's admission slot and its use of its version, once."""
        if request.state is _State.DONE:
            return
        request.state = _State.DONE
        self._admitted -= 1
        metrics.QUEUE_DEPTH.set(self._admitted)
        queue.version._release()

    def _drop(self, queue: _Queue, request: _Request) -> None:
        """Take a waiting request out of its queue without running it."""
        queue.remove(request)
        self._finish(queue, request)

    def _on_caller_done(self, queue: _Queue, request: _Request) -> None:
        """The request's future completed: maybe its caller gave up; free what it held."""
        if request.state is _State.WAITING:
            self._drop(queue, request)  # gave up while waiting: never runs, frees its slot now
        elif request.state is _State.RUNNING and request.batch is not None:
            batch = request.batch
            if not batch.finished and all(r.future.done() for r in batch.requests):
                batch.token.cancel()  # nobody waits for this run any more

    # -- batches -----------------------------------------------------------------------------

    async def _dispatch(self, queue: _Queue) -> None:
        """Cut and start the queue's batches until it is empty, then forget the queue."""
        try:
            while queue.pending:
                await self._wait_for_more(queue)
                await self._workers.acquire()
                batch = self._take(queue)
                if batch is None:
                    self._workers.release()
                    continue
                self._start(queue, batch)
        finally:
            # No await between the empty check and here: a new request cannot slip in unseen.
            queue.dispatcher = None
            queue.version._forget(queue)

    async def _wait_for_more(self, queue: _Queue) -> None:
        """Wait until the rows reach the cap or the oldest request waited the maximum delay."""
        loop = asyncio.get_running_loop()
        while queue.pending and not queue.ready():
            wait_s = queue.pending[0].arrived_at + queue.policy.max_queue_delay_s - loop.time()
            if wait_s <= 0:
                return
            queue.arrived.clear()
            try:
                async with asyncio.timeout(wait_s):
                    await queue.arrived.wait()
            except TimeoutError:
                return

    def _take(self, queue: _Queue) -> _Batch | None:
        """The next batch in arrival order, dropping requests whose caller is gone."""
        now = asyncio.get_running_loop().time()
        taken: list[_Request] = []
        rows = 0
        while queue.pending:
            request = queue.pending[0]
            if request.future.done():  # cancelled; its done callback has not run yet
                self._drop(queue, request)
                continue
            if request.expires_at is not None and now >= request.expires_at:
                self._drop(queue, request)
                request.future.set_exception(
                    DeadlineExceeded("the deadline passed before the request was run")
                )
                continue
            if not queue.fits(taken, rows, request):
                break
            queue.remove(request)
            request.state = _State.RUNNING
            taken.append(request)
            rows += request.rows
        return _Batch(taken) if taken else None

    def _start(self, queue: _Queue, batch: _Batch) -> None:
        for request in batch.requests:
            request.batch = batch
        metrics.BATCH_ROWS.labels(model=queue.version.model).observe(batch.rows)
        metrics.BATCH_REQUESTS.labels(model=queue.version.model).observe(len(batch.requests))
        task = asyncio.create_task(self._run(queue, batch))
        self._running.add(task)  # a strong reference until it ends
        task.add_done_callback(self._running.discard)

    async def _run(self, queue: _Queue, batch: _Batch) -> None:
        """Run one batch and give every request its outcome; owns one worker slot."""
        try:
            try:
                future = self._executor.submit(_run_engine, queue.version, queue.run, batch)
            except RuntimeError:  # the executor is shut down
                raise ModelNotReady(queue.version.model, str(queue.version.version)) from None
            stats = await asyncio.wrap_future(future)
        except BaseException as exc:
            _fail(queue.version, queue.run, batch, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            _deliver(batch, stats, queue.version.statistics)
        finally:
            self._workers.release()
            for request in batch.requests:
                self._finish(queue, request)


def _concatenate(
    parts: Sequence[Mapping[str, NDArray[Any]]], pad: Mapping[str, float] | None = None
) -> dict[str, NDArray[Any]]:
    """One (B_total, ...) array per input, the requests' rows in arrival order; inputs named in
    ``pad`` are padded at the end of their axes to the longest request's shape."""
    if len(parts) == 1:
        return dict(parts[0])
    joined: dict[str, NDArray[Any]] = {}
    for name in parts[0]:
        arrays = [part[name] for part in parts]
        if pad and name in pad:
            longest = np.max([a.shape[1:] for a in arrays], axis=0)
            arrays = [
                np.pad(a, [(0, 0), *((0, int(m - d)) for m, d in zip(longest, a.shape[1:],
                                                                    strict=True))],
                       constant_values=pad[name])
                for a in arrays
            ]  # fmt: skip
        joined[name] = np.concatenate(arrays)
    return joined


def _check_rows(stats: Sequence[OutputStats], rows: int) -> None:
    """Every array of the engine's answer must have one entry per row of the batch."""
    for s in stats:
        for f in dataclasses.fields(s):
            value = getattr(s, f.name)
            if isinstance(value, np.ndarray) and (value.ndim == 0 or value.shape[0] != rows):
                raise RuntimeError(
                    f"the engine answered {f.name} with shape {value.shape} for {rows} rows"
                )


def _run_engine(version: VersionQueue, run: RunKey, batch: _Batch) -> list[OutputStats]:
    """One engine run over the merged rows: the one call of ``Engine.run``. Runs on a worker
    thread."""
    started_ns = time.perf_counter_ns()
    label = str(version.version)
    queue_seconds = metrics.QUEUE_SECONDS.labels(model=version.model, version=label)
    queue_ns = [started_ns - request.arrived_ns for request in batch.requests]
    for waited_ns in queue_ns:
        queue_seconds.observe(waited_ns / 1e9)
    if batch.token.cancelled:  # every caller left while the run was handed over
        raise Cancelled("every caller of the batch gave up before it ran")
    inputs = _concatenate([r.inputs for r in batch.requests], dict(version.policy.pad))
    merged_ns = time.perf_counter_ns()
    stats = version.engine.run(
        inputs,
        run.num_samples,
        batch.token,
        keep_samples=run.return_samples,
        interval_levels=run.interval_levels,
        seed=run.seed,
    )
    _check_rows(stats, batch.rows)
    finished_ns = time.perf_counter_ns()
    metrics.COMPUTE_SECONDS.labels(model=version.model, version=label).observe(
        (finished_ns - started_ns) / 1e9
    )
    version.statistics.run_done(
        rows=batch.rows,
        queue_ns=queue_ns,
        input_ns=merged_ns - started_ns,
        infer_ns=finished_ns - merged_ns,
    )
    return stats


def _deliver(batch: _Batch, stats: Sequence[OutputStats], statistics: VersionStatistics) -> None:
    """Give each live request its own rows of every output.

    The one place a batch's answer is cut per request. A row whose outputs were not finite
    comes back from the engine with a NaN mean (``Engine.run``): only the request it belongs to
    fails, with INVALID_ARGUMENT naming the row; the others get their answers.
    """
    batch.finished = True
    started_ns = time.perf_counter_ns()
    start = 0
    for request in batch.requests:
        stop = start + request.rows
        if not request.future.done():
            rows = [slice_rows(s, start, stop) for s in stats]
            bad = _failed_rows(rows)
            if bad:
                shown = ", ".join(str(b) for b in bad[:8]) + (", ..." if len(bad) > 8 else "")
                plural = "s" if len(bad) > 1 else ""
                request.future.set_exception(
                    InvalidInput(
                        f"the model produced non-finite outputs for row{plural} {shown} (inputs "
                        "too large for the model, or a model that divides by zero?)"
                    )
                )
            else:
                request.future.set_result(rows)
        start = stop
    statistics.output_done(
        rows=batch.rows,
        requests=len(batch.requests),
        output_ns=time.perf_counter_ns() - started_ns,
    )


def _failed_rows(stats: Sequence[OutputStats]) -> list[int]:
    """Rows (of one request) whose mean is not finite in some output."""
    bad: set[int] = set()
    for s in stats:
        flat = np.asarray(s.mean).reshape(s.mean.shape[0], -1)
        bad.update(np.flatnonzero(~np.isfinite(flat).all(axis=1)).tolist())
    return sorted(bad)


def _fail(version: VersionQueue, run: RunKey, batch: _Batch, exc: BaseException) -> None:
    """Give every live request of a failed batch an error, so none hangs."""
    batch.finished = True
    live = [r for r in batch.requests if not r.future.done()]
    if not live:
        return  # e.g. Cancelled after every caller left: nobody to tell
    if not isinstance(exc, ServiceError):
        log.error(
            "model %s version %d failed (batch of %d requests, %d rows, T = %d)",
            version.model, version.version, len(batch.requests), batch.rows, run.num_samples,
            exc_info=exc,
        )  # fmt: skip
    for request in live:
        error = exc if isinstance(exc, ServiceError) else _internal_error(exc)
        request.future.set_exception(error)


def _internal_error(cause: BaseException) -> InternalError:
    """A fresh generic error per caller (the details stay in the log)."""
    error = InternalError("internal error while running the model")
    error.__cause__ = cause
    return error
