"""Per model version statistics, as Triton's statistics extension defines them.

One :class:`VersionStatistics` per (model, version), kept by a :class:`StatisticsStore` that
the batcher owns: a version that is reloaded (its files changed) keeps counting where its
previous copy stopped, like a Prometheus counter. Two places feed it, each once:

* the data plane, per request, once the version is resolved: ``success`` or ``fail`` (count
  and cumulative time from the version's resolution to the answer, without the protocol's
  decoding and encoding), ``inference_count`` (rows of successful requests: a request of 64 rows
  counts 64) and ``last_inference``;
* ``service.core.batching._run_engine`` and ``_deliver``, per engine run: ``execution_count``
  (a run merging the rows of several requests counts 1), ``batch_stats`` by the run's row
  count, and per request of the run ``queue`` (admission to the start of its run) and
  ``compute_input`` (merging the rows), ``compute_infer`` (the T stochastic passes and the
  statistics) and ``compute_output`` (cutting the run's answer per request), each request
  counted with its run's durations, as Triton counts a batched request.

Adaptive sampling runs a request in several rounds: each round is an execution.

Counters are read from the event loop and written from the compute worker threads: a lock
guards them (a few integer additions per run).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

__all__ = ["BatchDurations", "Duration", "StatisticsStore", "VersionStatistics"]


@dataclass(frozen=True)
class Duration:
    """A count and a cumulative duration in nanoseconds (Triton's ``StatisticDuration``)."""

    count: int = 0
    ns: int = 0

    def plus(self, ns: int, count: int = 1) -> Duration:
        return Duration(self.count + count, self.ns + ns * count)


@dataclass(frozen=True)
class BatchDurations:
    """The engine runs of one batch size (rows): how many, and their cumulative durations."""

    batch_size: int
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()


@dataclass
class VersionStatistics:
    """The statistics of one model version since the server started (see the module).

    Attributes:
        model: the model's name.
        version: the version number.
        last_inference_ms: when the last successful request was answered, in milliseconds
            since the epoch; 0 before the first.
        inference_count: rows of successful requests.
        execution_count: engine runs.
        success: successful requests and their time in the data plane.
        fail: failed requests (after the version was resolved) and their time.
        queue: per request, admission to the start of its engine run.
        compute_input: per request, merging its run's inputs.
        compute_infer: per request, its run's passes and statistics.
        compute_output: per request, cutting its run's answer per request.
        batches: per batch size (rows of a run), the runs and their durations.
    """

    model: str
    version: int
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batches: dict[int, BatchDurations] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def request_done(self, *, ok: bool, elapsed_ns: int, rows: int) -> None:
        """Count one answered request (the data plane, once per request).

        Args:
            ok: whether it succeeded.
            elapsed_ns: its time in the data plane.
            rows: its rows (counted only on success).
        """
        with self._lock:
            if ok:
                self.success = self.success.plus(elapsed_ns)
                self.inference_count += rows
                self.last_inference_ms = time.time_ns() // 1_000_000
            else:
                self.fail = self.fail.plus(elapsed_ns)

    def run_done(
        self,
        *,
        rows: int,
        queue_ns: Sequence[int],
        input_ns: int,
        infer_ns: int,
    ) -> None:
        """Count one successful engine run (a compute worker, right after the run).

        Args:
            rows: the run's rows (its batch size).
            queue_ns: each request's wait from admission to the run's start.
            input_ns: merging the inputs.
            infer_ns: the engine run itself.
        """
        requests = len(queue_ns)
        with self._lock:
            self.execution_count += 1
            self.queue = Duration(self.queue.count + requests, self.queue.ns + sum(queue_ns))
            self.compute_input = self.compute_input.plus(input_ns, requests)
            self.compute_infer = self.compute_infer.plus(infer_ns, requests)
            batch = self.batches.get(rows, BatchDurations(rows))
            self.batches[rows] = replace(
                batch,
                compute_input=batch.compute_input.plus(input_ns),
                compute_infer=batch.compute_infer.plus(infer_ns),
            )

    def output_done(self, *, rows: int, requests: int, output_ns: int) -> None:
        """Count cutting one run's answer per request (the event loop, after the run).

        Args:
            rows: the run's rows.
            requests: the requests it answered.
            output_ns: the time it took.
        """
        with self._lock:
            self.compute_output = self.compute_output.plus(output_ns, requests)
            batch = self.batches.get(rows, BatchDurations(rows))
            self.batches[rows] = replace(batch, compute_output=batch.compute_output.plus(output_ns))

    def snapshot(self) -> VersionStatistics:
        """A consistent copy (for an answer), batch sizes in increasing order."""
        with self._lock:
            return replace(
                self,
                batches=dict(sorted(self.batches.items())),
                _lock=threading.Lock(),
            )


class StatisticsStore:
    """Every version's statistics, created on first use and kept for the server's life (a
    reloaded version counts on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, int], VersionStatistics] = {}

    def version(self, model: str, version: int) -> VersionStatistics:
        """The statistics of one version (made the first time it is asked for)."""
        key = (model, version)
        with self._lock:
            found = self._versions.get(key)
            if found is None:
                found = self._versions[key] = VersionStatistics(model, version)
            return found
