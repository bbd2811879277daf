"""The engine: T stochastic forward passes of a batch, statistics computed next to the samples.

A request of B rows and T samples runs in chunks of t samples. Each chunk is one run of the
sampler graph (``service.engine.sampler``), which tiles the B rows itself to [t*B, ...],
sample-major (sample s of row b is tile row s*B + b), draws every dropout mask per element, and
returns (B, ...)-sized summaries of its t samples; the host merges the chunks in float64
(``service.maths.summaries``), so T = 10,000 needs the memory of one chunk, not of T. The
chunk size t comes from the memory of the part that runs on the tile, at the request's shape.

Engine forms (``--engine``): ``split-sessions`` runs the deterministic prefix once per request
in its own session and the stochastic suffix on the tile; ``split-graph`` has both in one
graph (the prefix then runs once per chunk); ``tiled`` runs everything on the tile (for graphs
that cannot be split). ``auto`` splits when that leaves work to run once, in two sessions.

Randomness (``service.engine.noise``): on the CPU every stochastic node is fed numpy noise, per
thread from an independent PCG64DXSM stream (ONNX Runtime's CPU Dropout RNG is correlated
across runs); on CUDA the graph's own Dropout / RandomUniformLike kernels (Philox, a fresh
offset per run) draw unseeded samples, and seeded requests take fed noise there too.

Everything here is synchronous and runs on a worker thread, never on the event loop.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from service.engine.graph_split import SplitPlan, plan_split
from service.engine.io import DeviceValue, SessionRunner
from service.engine.noise import NoiseRewriteError, NoiseSource, SeededNoise, StreamNoise
from service.engine.onnx_session import SessionConfig, create_session, cuda_usable
from service.engine.sampler import (
    NUM_SAMPLES_INPUT,
    Form,
    SamplerGraph,
    build_prefix,
    build_sampler,
)
from service.engine.shapes import GraphShapes, UnknownShape, row_elements
from service.errors import Cancelled, InvalidInput, ModelLoadError
from service.maths.predictive import (
    Interval,
    empirical_interval,
    gaussian_interval,
    mixture_interval,
)
from service.maths.summaries import (
    ClassSummaryAccumulator,
    ValueSummaryAccumulator,
    VarianceSumAccumulator,
)
from service.maths.uncertainty import (
    ClassificationStats,
    RegressionStats,
    concat_rows,
    slice_rows,
)
from service.repository import ModelConfig, Semantics, VersionSource
from service.settings import EngineKind

__all__ = [
    "SEEDED_CHUNK_SAMPLES",
    "CancelToken",
    "Engine",
    "McEngine",
    "OutputStats",
    "build_engine",
    "chunk_samples",
    "concat_rows",
]

log = logging.getLogger(__name__)

OutputStats = RegressionStats | ClassificationStats
_T = TypeVar("_T")

#: Samples per session run on the seeded path: fixed, so that the chunk boundaries where the
#: statistics are merged (and so their rounding) never depend on the batch size.
SEEDED_CHUNK_SAMPLES = 64
#: Row shapes whose sizes an engine remembers (models with dynamic axes see many).
_SHAPE_CACHE_SIZE = 256
#: Bytes of summary intermediates per element of an output on the tile (probabilities,
#: log-probabilities, their product, deviations and squares, in float32 or float64).
_SUMMARY_BYTES_PER_ELEMENT = 40
#: Margin on the tile's peak (``tile_steps``): ONNX Runtime's arena grows in powers of two.
#: Measured on the CPU (EfficientNet-B0 at 32 and 128 tile rows): the process grew by 0.96 and
#: 1.08 MiB per row against a peak of 1.08 MiB (the sum of every tensor was 6.9 MiB).
_PEAK_MARGIN = 2
#: Batch sizes runs are padded to on CUDA (``batch_buckets`` of the engine).
_POWERS_OF_TWO = tuple(2**k for k in range(16))


class CancelToken:
    """Lets the event loop stop a running request: between chunks, and inside a session run
    through ONNX Runtime's ``RunOptions.terminate``."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._run_options: ort.RunOptions | None = None

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            if self._run_options is not None:
                self._run_options.terminate = True

    def run_options(self) -> ort.RunOptions:
        """Fresh RunOptions for the next session run, terminated at once if cancelled."""
        options = ort.RunOptions()
        with self._lock:
            options.terminate = self._event.is_set()
            self._run_options = options
        return options


class Engine(Protocol):
    """What the core needs from a model version's runtime."""

    @property
    def provider(self) -> str:
        """The execution provider that really runs (CUDAExecutionProvider, CPUExecutionProvider)."""
        ...

    def is_stochastic(self, copies: int = 256) -> bool:
        """Load-time probe: do copies of one row differ (through the path requests take)?"""
        ...

    def output_elements(self, inputs: Mapping[str, NDArray[Any]]) -> list[int]:
        """Elements of one row of each output at this request's shape."""
        ...

    def run(
        self,
        inputs: Mapping[str, NDArray[Any]],
        num_samples: int,
        cancel: CancelToken | None = None,
        *,
        keep_samples: bool = False,
        interval_levels: tuple[float, ...] = (),
        seed: int | None = None,
    ) -> list[OutputStats]:
        """Run ``num_samples`` stochastic passes over a validated batch.

        Args:
            inputs: one array per model input, each (B, ...) with the config's dtype and shape.
            num_samples: T >= 1.
            cancel: stops the work early (raises Cancelled) when cancelled.
            keep_samples: also return every sample (``stats.samples``, (B, T, ...)).
            interval_levels: prediction intervals for the regression outputs (computed from
                every sample, which are kept for it).
            seed: reproducible sampling: the same seed and row give bit-identical statistics
                whatever else is in the batch (InvalidInput if the model cannot).

        Returns:
            One statistics object per model output, in the config's output order. A row whose
            outputs were not finite (or were negative probabilities or variances) has a NaN
            mean in every output: the caller fails the request that row belongs to.
        """
        ...


def chunk_samples(num_samples: int, num_rows: int, budget_rows: int) -> int:
    """Samples per session run so that a run holds at most ``budget_rows`` tile rows.

    At least one sample per run: a single batch larger than the budget still runs whole
    (its size is bounded by the max_batch_rows setting).
    """
    return max(1, min(num_samples, budget_rows // max(1, num_rows)))


def _load_session(
    model: Path | bytes, session_config: SessionConfig, where: str
) -> ort.InferenceSession:
    try:
        return create_session(model, session_config)
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise ModelLoadError(f"{where}: cannot load the model: {exc}") from exc


class _Sampler:
    """One sampler graph in a session, with what its runs fetch."""

    def __init__(self, graph: SamplerGraph, session: ort.InferenceSession) -> None:
        self.graph = graph
        self.session = session
        self.provider: str = session.get_providers()[0]
        self.runner = SessionRunner(session, binding=False)
        self.summary_fetches = [f for s in graph.summaries for f in s.fetches]
        self.sample_fetches = [s.samples for s in graph.summaries]


class _Accumulators:
    """The running statistics of every output of one group of rows."""

    def __init__(self, config: ModelConfig, keep: bool) -> None:
        self.config = config
        self.moments: list[ClassSummaryAccumulator | ValueSummaryAccumulator] = [
            ClassSummaryAccumulator()
            if spec.semantics is not None and spec.semantics.is_classification
            else ValueSummaryAccumulator()
            for spec in config.outputs
        ]
        self.aleatoric = {
            i: VarianceSumAccumulator()
            for i, spec in enumerate(config.outputs)
            if spec.semantics is not None and spec.semantics.is_variance
        }
        self.kept: list[list[NDArray[np.float64]]] | None = (
            [[] for _ in config.outputs] if keep else None
        )
        self.invalid: NDArray[np.bool_] | None = None

    def _flag(self, rows_bad: NDArray[np.bool_]) -> None:
        self.invalid = rows_bad if self.invalid is None else np.logical_or(self.invalid, rows_bad)

    def update(
        self, graph: SamplerGraph, t: int, rows: int, fetched: Mapping[str, NDArray[Any]]
    ) -> None:
        for i, summary in enumerate(graph.summaries):
            parts = {part: fetched[name] for part, name in summary.parts.items()}
            acc = self.moments[i]
            if isinstance(acc, ClassSummaryAccumulator):
                acc.update(t, parts["sum"], parts["m2"], parts["entropy_sum"], parts["argmax"])
                if "min" in parts:
                    self._flag(_rows_where(parts["min"] < 0))
            else:
                acc.update(t, parts["shift"], parts["sum"], parts["m2"])
            if i in self.aleatoric:
                self.aleatoric[i].update(t, parts["variance_sum"])
                self._flag(_rows_where(parts["variance_min"] < 0))
            if self.kept is not None:
                # (t, B, ...): probabilities for class outputs, the raw values otherwise.
                self.kept[i].append(np.asarray(fetched[summary.samples], dtype=np.float64))

    def results(self, interval_levels: tuple[float, ...], keep_samples: bool) -> list[OutputStats]:
        specs = self.config.outputs
        results: list[OutputStats] = []
        for i, acc in enumerate(self.moments):
            samples = None
            if self.kept is not None:
                samples = np.ascontiguousarray(np.moveaxis(np.concatenate(self.kept[i]), 0, 1))
            results.append(acc.result(samples))
        for i, noise in self.aleatoric.items():
            target = next(j for j, s in enumerate(specs) if s.name == specs[i].variance_of)
            stats = results[target]
            assert isinstance(stats, RegressionStats)  # config: variances describe values
            aleatoric = noise.result()
            results[target] = dataclasses.replace(
                stats, aleatoric_variance=aleatoric, total_variance=stats.variance + aleatoric
            )
        if interval_levels:
            results = _add_intervals(self.config, results, interval_levels)
        if not keep_samples:
            results = [dataclasses.replace(r, samples=None) for r in results]
        if self.invalid is not None and self.invalid.any():
            results = [_invalidate(r, self.invalid) for r in results]
        return results


def _rows_where(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """(B, ...) -> (B,): rows with any True."""
    flat = np.asarray(mask).reshape(mask.shape[0], -1)
    return np.asarray(flat.any(axis=1), dtype=np.bool_)


def _invalidate(stats: OutputStats, rows: NDArray[np.bool_]) -> OutputStats:
    mean = stats.mean.copy()
    mean[rows] = np.nan
    return dataclasses.replace(stats, mean=mean)


class McEngine:
    """One model version's sessions and the chunk loop.

    Args:
        model: the model as exported.
        config: its config.json.
        where: "<model>/<version>", for messages.
        session_config: how to build sessions.
        tile_memory_bytes: the memory budget of one run on the tile.
        kind: the engine form (``auto`` chooses).

    Raises:
        ModelLoadError: the model cannot be loaded, does not match its config, or its
            randomness cannot be fed where it must be.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        config: ModelConfig,
        where: str,
        *,
        session_config: SessionConfig,
        tile_memory_bytes: int,
        kind: EngineKind = "auto",
        batch_buckets: Sequence[int] | None = None,
        io_binding: bool | None = None,
    ) -> None:
        self._config = config
        self._where = where
        self._session_config = session_config
        self.tile_memory_bytes = tile_memory_bytes
        self._model = model
        self._shapes = GraphShapes(model)
        _check_graph_io(model, self._shapes, config, where)
        self.plan: SplitPlan = plan_split(model, self._shapes)
        log.info("%s: %s", where, self.plan.describe())
        self.kind: Form = _form(kind, self.plan)
        self._prefix: ort.InferenceSession | None = None
        if self.kind == "split-sessions":
            prefix = build_prefix(model, self.plan, self._shapes)
            self._prefix = _load_session(prefix.SerializeToString(), session_config, where)
        self._prefix_outputs = (
            [o.name for o in self._prefix.get_outputs()] if self._prefix is not None else []
        )
        wants_cuda = session_config.use_gpu and cuda_usable()
        self._native: _Sampler | None = None
        self._fed: _Sampler | None = None
        self._fed_lock = threading.Lock()
        self._fed_error = ""
        if wants_cuda:
            self._native = self._load_sampler(native=True)
            if self._native.provider != "CUDAExecutionProvider":
                self._native = None  # CUDA did not load: the CPU needs fed noise
        if self._native is None:
            self._fed = self._load_sampler(native=False)
        sampler = self._native or self._fed
        assert sampler is not None
        self._provider = sampler.provider
        on_cuda = self._provider == "CUDAExecutionProvider"
        # IO binding keeps the prefix's outputs and the tile on the device (CUDA); batch
        # buckets give the CUDA provider a few shapes instead of one per batch size.
        self._binding = on_cuda if io_binding is None else io_binding
        self._device = ("cuda" if on_cuda else "cpu", session_config.gpu_device_id)
        self._prefix_runner = None if self._prefix is None else self._runner(self._prefix)
        self._wire(sampler)
        self.batch_buckets: tuple[int, ...] = tuple(
            sorted(set(batch_buckets))
            if batch_buckets is not None
            else (_POWERS_OF_TWO if on_cuda else ())
        )
        self._streams = StreamNoise(session_config.intra_op_threads)
        self._sizes: OrderedDict[tuple[tuple[int, ...], ...], tuple[list[int], int, list[int]]] = (
            OrderedDict()
        )
        self._sizes_lock = threading.Lock()

    # -- set-up ------------------------------------------------------------------------------

    def _runner(self, session: ort.InferenceSession) -> SessionRunner:
        device, device_id = self._device
        return SessionRunner(session, binding=self._binding, device=device, device_id=device_id)

    def _wire(self, sampler: _Sampler) -> None:
        sampler.runner = self._runner(sampler.session)

    def _load_sampler(self, *, native: bool) -> _Sampler:
        try:
            graph = build_sampler(
                self._model, self._config, self.plan, self.kind, self._shapes, native=native
            )
        except NoiseRewriteError as exc:
            raise ModelLoadError(f"{self._where}: {exc}") from exc
        session = _load_session(graph.model.SerializeToString(), self._session_config, self._where)
        return _Sampler(graph, session)

    def _fed_sampler(self) -> _Sampler:
        """The noise-fed sampler (built on first use on CUDA, where only seeded requests need
        it)."""
        if self._fed is None:
            with self._fed_lock:
                if self._fed is None:
                    try:
                        fed = self._load_sampler(native=False)
                        self._wire(fed)
                        self._fed = fed
                    except ModelLoadError as exc:
                        self._fed_error = str(exc)
                        raise InvalidInput(
                            f"model {self._config.name!r} cannot sample with a seed: {exc}"
                        ) from None
        return self._fed

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def config(self) -> ModelConfig:
        return self._config

    def sessions(self) -> dict[str, ort.InferenceSession]:
        """The engine's ONNX Runtime sessions that exist now, by role: ``prefix``,
        ``sampler`` (the native one on CUDA), ``fed sampler`` (the noise-fed one: on the CPU
        it is the sampler; on CUDA it is built by the first seeded request)."""
        found: dict[str, ort.InferenceSession] = {}
        if self._prefix is not None:
            found["prefix"] = self._prefix
        if self._native is not None:
            found["sampler"] = self._native.session
        if self._fed is not None:
            found["fed sampler" if self._native is not None else "sampler"] = self._fed.session
        return found

    @property
    def io_binding(self) -> bool:
        """Whether runs go through IO binding (device tensors stay on the device)."""
        return self._binding

    @property
    def noise_fed(self) -> bool:
        """True when unseeded samples come from fed numpy noise (always on the CPU)."""
        return self._native is None

    # -- sizes per request shape -------------------------------------------------------------

    def _row_sizes(
        self, sampler: _Sampler, inputs: Mapping[str, NDArray[Any]]
    ) -> tuple[list[int], int, list[int]]:
        """Per input row and sample: the element count of each noise input, the bytes a run
        holds on the tile, and the element count of each output (0 where shape inference cannot
        tell); cached per row shape."""
        row_shapes = {name: tuple(x.shape[1:]) for name, x in inputs.items()}
        native = int(sampler is self._native)
        key = (*(row_shapes[name] for name in sorted(row_shapes)), (native,))
        with self._sizes_lock:
            if key in self._sizes:
                self._sizes.move_to_end(key)
                return self._sizes[key]
        try:
            symbols = self._shapes.symbols(row_shapes)
            noise = [spec.row_elements(symbols) for spec in sampler.graph.noise]
        except UnknownShape as exc:
            raise InvalidInput(f"model {self._config.name!r}: {exc}") from None
        tile_bytes, _ = self._shapes.peak_row_bytes(sampler.graph.tile_steps, symbols)
        outputs = [
            _row_elements_or_zero(self._shapes, o.name, symbols) for o in self._config.outputs
        ]
        per_row = (
            _PEAK_MARGIN * tile_bytes + 4 * sum(noise) + _SUMMARY_BYTES_PER_ELEMENT * sum(outputs)
        )
        sizes = (noise, max(1, per_row), outputs)
        with self._sizes_lock:
            self._sizes[key] = sizes
            if len(self._sizes) > _SHAPE_CACHE_SIZE:
                self._sizes.popitem(last=False)
        return sizes

    def output_elements(self, inputs: Mapping[str, NDArray[Any]]) -> list[int]:
        """Elements of one row of each output at this request's shape (outputs with dynamic
        axes follow the inputs'); an output shape inference cannot tell counts as its config
        shape with each dynamic axis at 1."""
        sampler = self._native or self._fed
        assert sampler is not None
        outputs = self._row_sizes(sampler, inputs)[2]
        return [n or o.row_size for n, o in zip(outputs, self._config.outputs, strict=True)]

    def budget_rows(self, inputs: Mapping[str, NDArray[Any]]) -> int:
        """Tile rows (samples x rows) one run may hold at this request's shape."""
        sampler = self._native or self._fed
        assert sampler is not None
        return max(1, self.tile_memory_bytes // self._row_sizes(sampler, inputs)[1])

    # -- running -----------------------------------------------------------------------------

    def _prepare(
        self, inputs: Mapping[str, NDArray[Any]], cancel: CancelToken | None
    ) -> dict[str, DeviceValue]:
        """The sampler's data inputs, B rows each: the prefix's outputs (run once, left on the
        device under IO binding) or the inputs themselves."""
        if self._prefix_runner is None:
            return dict(inputs)
        options = cancel.run_options() if cancel is not None else None
        values = self._prefix_runner.run_on_device(self._prefix_outputs, inputs, options)
        values.update({n: x for n, x in inputs.items() if n in self.plan.cut})
        return values

    def _chunks(
        self,
        sampler: _Sampler,
        data: Mapping[str, DeviceValue],
        rows: int,
        num_samples: int,
        *,
        chunk: int,
        noise: NoiseSource | None,
        noise_sizes: Sequence[int],
        fetches: list[str],
        cancel: CancelToken | None,
    ) -> Iterator[tuple[int, dict[str, NDArray[Any]]]]:
        """Run the sampler chunk by chunk: (t, fetched arrays) per run."""
        graph = sampler.graph
        feed: dict[str, DeviceValue] = {name: data[name] for name in graph.inputs}
        done = 0
        while done < num_samples:
            if cancel is not None and cancel.cancelled:
                raise Cancelled("request cancelled")
            t = min(chunk, num_samples - done)
            feed[NUM_SAMPLES_INPUT] = np.array([t], dtype=np.int64)
            if noise is not None:
                feed.update(noise.draw(graph.noise, noise_sizes, t, rows))
            options = cancel.run_options() if cancel is not None else None
            out = _guarded(partial(sampler.runner.run, fetches, feed, options), cancel)
            yield t, dict(zip(fetches, out, strict=True))
            done += t

    def run(
        self,
        inputs: Mapping[str, NDArray[Any]],
        num_samples: int,
        cancel: CancelToken | None = None,
        *,
        keep_samples: bool = False,
        interval_levels: tuple[float, ...] = (),
        seed: int | None = None,
    ) -> list[OutputStats]:
        if seed is not None:
            return self._run_seeded(inputs, num_samples, cancel, keep_samples=keep_samples,
                                    interval_levels=interval_levels, seed=seed)  # fmt: skip
        rows = next(iter(inputs.values())).shape[0]
        padded = self._bucket(rows)
        if padded > rows:  # repeat the last row: real values, and its results are dropped
            inputs = {n: np.concatenate([x, np.repeat(x[-1:], padded - rows, axis=0)])
                      for n, x in inputs.items()}  # fmt: skip
        results = self._run_unseeded(inputs, num_samples, cancel, keep_samples=keep_samples,
                                     interval_levels=interval_levels)  # fmt: skip
        if padded > rows:
            results = [slice_rows(r, 0, rows) for r in results]
        return results

    def _bucket(self, rows: int) -> int:
        """The batch size a run of ``rows`` rows is padded to (itself without buckets)."""
        return next((b for b in self.batch_buckets if b >= rows), rows)

    def _run_unseeded(
        self,
        inputs: Mapping[str, NDArray[Any]],
        num_samples: int,
        cancel: CancelToken | None,
        *,
        keep_samples: bool,
        interval_levels: tuple[float, ...],
    ) -> list[OutputStats]:
        sampler = self._native or self._fed
        assert sampler is not None
        rows = next(iter(inputs.values())).shape[0]
        noise_sizes, per_row, _ = self._row_sizes(sampler, inputs)
        chunk = chunk_samples(num_samples, rows, max(1, self.tile_memory_bytes // per_row))
        keep = keep_samples or bool(interval_levels)
        fetches = sampler.summary_fetches + (sampler.sample_fetches if keep else [])
        data = _guarded(partial(self._prepare, inputs, cancel), cancel)
        accumulators = _Accumulators(self._config, keep)
        noise = None if sampler is self._native else self._streams
        for t, fetched in self._chunks(sampler, data, rows, num_samples, chunk=chunk,
                                       noise=noise, noise_sizes=noise_sizes, fetches=fetches,
                                       cancel=cancel):  # fmt: skip
            accumulators.update(sampler.graph, t, rows, fetched)
        return accumulators.results(interval_levels, keep_samples)

    def _run_seeded(
        self,
        inputs: Mapping[str, NDArray[Any]],
        num_samples: int,
        cancel: CancelToken | None,
        *,
        keep_samples: bool,
        interval_levels: tuple[float, ...],
        seed: int,
    ) -> list[OutputStats]:
        """Reproducible sampling: every row draws its noise from its own streams, seeded by
        (seed, the row's bytes), and runs alone in chunks of a fixed number of samples. No
        number then depends on the batch size or the row's position: not the noise, not the
        kernels' shapes, not the chunk boundaries where the statistics are merged."""
        sampler = self._fed_sampler()
        names = [spec.name for spec in self._config.inputs]
        num_rows = next(iter(inputs.values())).shape[0]
        keep = keep_samples or bool(interval_levels)
        fetches = sampler.summary_fetches + (sampler.sample_fetches if keep else [])
        parts: list[list[OutputStats]] = []
        for b in range(num_rows):
            row = {name: x[b : b + 1] for name, x in inputs.items()}
            noise_sizes, per_row, _ = self._row_sizes(sampler, row)
            # One row per run: kernels may round differently for different numbers of rows
            # (measured: the housing MLP's small GEMMs), so a run's shape must depend on T only.
            chunk = min(SEEDED_CHUNK_SAMPLES, max(1, self.tile_memory_bytes // per_row))
            data = _guarded(partial(self._prepare, row, cancel), cancel)
            noise = SeededNoise(seed, [row[n][0] for n in names], len(sampler.graph.noise))
            accumulators = _Accumulators(self._config, keep)
            for t, fetched in self._chunks(sampler, data, 1, num_samples, chunk=chunk,
                                           noise=noise, noise_sizes=noise_sizes,
                                           fetches=fetches, cancel=cancel):  # fmt: skip
                accumulators.update(sampler.graph, t, 1, fetched)
            parts.append(accumulators.results(interval_levels, keep_samples))
        return [concat_rows([p[i] for p in parts]) for i in range(len(self._config.outputs))]

    def sample(
        self, inputs: Mapping[str, NDArray[Any]], num_samples: int, *, seed: int | None = None
    ) -> list[NDArray[Any]]:
        """Raw samples through the path requests take: per model output, (T, B, ...) in the
        output's own dtype (logits stay logits). For export verification and the load probe.

        Args:
            inputs: one (B, ...) array per model input.
            num_samples: T.
            seed: draw from the seeded path's streams instead (each row alone).
        """
        sampler = self._native or self._fed if seed is None else self._fed_sampler()
        assert sampler is not None
        graph = sampler.graph
        rows = next(iter(inputs.values())).shape[0]
        groups: list[tuple[dict[str, NDArray[Any]], int, NoiseSource | None]] = []
        if seed is None:
            groups.append((dict(inputs), rows, None if sampler is self._native else self._streams))
        else:
            names = [spec.name for spec in self._config.inputs]
            for b in range(rows):
                row = {name: x[b : b + 1] for name, x in inputs.items()}
                groups.append((row, 1, SeededNoise(seed, [row[n][0] for n in names],
                                                    len(graph.noise))))  # fmt: skip
        per_group: list[list[NDArray[Any]]] = []
        for group, group_rows, noise in groups:
            noise_sizes, per_row, _ = self._row_sizes(sampler, group)
            chunk = chunk_samples(num_samples, group_rows, self.tile_memory_bytes // per_row)
            data = self._prepare(group, None)
            collected: list[list[NDArray[Any]]] = [[] for _ in graph.raw]
            for t, fetched in self._chunks(sampler, data, group_rows, num_samples,
                                           chunk=chunk, noise=noise, noise_sizes=noise_sizes,
                                           fetches=list(graph.raw), cancel=None):  # fmt: skip
                for i, name in enumerate(graph.raw):
                    out = fetched[name]
                    collected[i].append(out.reshape(t, group_rows, *out.shape[1:]))
            per_group.append([np.concatenate(c) for c in collected])
        return [np.concatenate([g[i] for g in per_group], axis=1) for i in range(len(graph.raw))]

    def is_stochastic(self, copies: int = 256) -> bool:
        """Load-time probe, through the path requests take: do copies of one row differ?

        Guards against a session whose Dropout nodes were optimised away (every answer would
        be identical) or a model without active dropout. 256 copies, not a handful: with small
        rates a copy often drops nothing (a 13-50-1 MLP at p = 0.005 keeps everything in 73%
        of copies, so 8 copies were all identical about 20% of the time and a valid model was
        refused); all 256 identical has probability ~1e-35 there, for one cheap run.
        """
        rng = np.random.default_rng()
        row: dict[str, NDArray[Any]] = {}
        for spec in self._config.inputs:
            shape = (1, *(d if d > 0 else 1 for d in spec.row_shape))
            if spec.dtype.kind == "f":
                row[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            else:
                row[spec.name] = np.zeros(shape, dtype=spec.dtype)
        outputs = self.sample(row, copies)
        return any(not np.all(out == out[:1]) for out in outputs)


def _row_elements_or_zero(shapes: GraphShapes, name: str, symbols: Mapping[str, int]) -> int:
    dims = shapes.dims(name)
    if dims is None:
        return 0
    try:
        return row_elements(dims, symbols)
    except UnknownShape:
        return 0


def _form(kind: EngineKind, plan: SplitPlan) -> Form:
    """The engine form for a setting: graphs that cannot be split tile the whole graph."""
    if kind == "tiled" or not plan.is_split:
        return "tiled"
    if kind == "split-graph":
        return "split-graph"
    return "split-sessions"


def _guarded(call: Callable[[], _T], cancel: CancelToken | None) -> _T:
    """A session run; a run stopped by RunOptions.terminate becomes Cancelled."""
    try:
        return call()
    except Exception:
        if cancel is not None and cancel.cancelled:
            raise Cancelled("request cancelled") from None
        raise


def build_engine(
    source: VersionSource,
    session_config: SessionConfig,
    tile_memory_bytes: int,
    kind: EngineKind = "auto",
    *,
    batch_buckets: Sequence[int] | None = None,
) -> McEngine:
    """The engine for one model version (the one place that decides which engine runs).

    Args:
        source: the version folder.
        session_config: how to build its sessions.
        tile_memory_bytes: the memory budget of one run on the tile.
        kind: the engine form.
        batch_buckets: batch sizes runs are padded to; None: powers of two on CUDA, none on
            the CPU; empty: none.

    Raises:
        ModelLoadError: the model cannot be loaded or does not match its config.
    """
    where = f"{source.name}/{source.version}"
    try:
        model = onnx.load(str(source.model_path))
    except Exception as exc:
        raise ModelLoadError(f"{where}: cannot read model.onnx: {exc}") from exc
    return McEngine(model, source.config, where, session_config=session_config,
                    tile_memory_bytes=tile_memory_bytes, kind=kind,
                    batch_buckets=batch_buckets)  # fmt: skip


def _add_intervals(
    config: ModelConfig, results: list[OutputStats], levels: tuple[float, ...]
) -> list[OutputStats]:
    """Per level, a gaussian and an empirical interval for every values output."""
    index = {spec.name: i for i, spec in enumerate(config.outputs)}
    out = list(results)
    for i, spec in enumerate(config.outputs):
        stats = results[i]
        if spec.semantics is not Semantics.VALUES or not isinstance(stats, RegressionStats):
            continue
        assert stats.samples is not None  # kept for the intervals
        total = stats.total_variance if stats.total_variance is not None else stats.variance
        noise_spec = config.variance_output(spec.name)
        noise = None if noise_spec is None else results[index[noise_spec.name]].samples
        if (
            noise is not None
            and noise_spec is not None
            and noise_spec.semantics is Semantics.LOG_VARIANCE
        ):
            noise = np.exp(noise)
        intervals: list[Interval] = []
        for level in levels:
            intervals.append(gaussian_interval(stats.mean, total, level))
            intervals.append(
                empirical_interval(stats.samples, level)
                if noise is None
                else mixture_interval(stats.samples, noise, level)
            )
        out[i] = dataclasses.replace(stats, intervals=tuple(intervals))
    return out


def _check_graph_io(model: onnx.ModelProto, shapes: GraphShapes, config: ModelConfig,
                    where: str) -> None:  # fmt: skip
    """The graph's inputs and outputs must be exactly those of config.json: names, dtypes,
    ranks and fixed sizes."""
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [v.name for v in model.graph.input if v.name not in initializers]
    graph_outputs = [v.name for v in model.graph.output]
    for kind, names, specs in (
        ("inputs", graph_inputs, config.inputs),
        ("outputs", graph_outputs, config.outputs),
    ):
        if set(names) != {s.name for s in specs}:
            raise ModelLoadError(
                f"{where}: config.json {kind} {[s.name for s in specs]} differ from the "
                f"graph's {names}"
            )
        for spec in specs:
            elem = shapes.elem_type(spec.name, default=0)
            try:
                dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem))
            except (KeyError, TypeError, ValueError):
                dtype = None
            if dtype != spec.dtype:
                raise ModelLoadError(
                    f"{where}: {spec.name} is {onnx.TensorProto.DataType.Name(elem)} in the "
                    f"graph, {spec.dtype} in config.json"
                )
            dims = shapes.dims(spec.name)
            if dims is None:
                continue
            if len(dims) != len(spec.shape) or any(
                isinstance(g, int) and s >= 0 and g != s
                for g, s in zip(dims[1:], spec.shape[1:], strict=True)
            ):
                shown = [d if d is not None else "?" for d in dims]
                raise ModelLoadError(
                    f"{where}: {spec.name} has shape {shown} in the graph, {list(spec.shape)} "
                    "in config.json"
                )
