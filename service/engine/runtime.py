"""The engine: T stochastic forward passes of a batch, run as tiled ONNX Runtime sessions.

A request of B rows and T samples becomes a [T*B, ...] tile, sample-major (sample t of row b
is tile row t*B + b): dropout masks are drawn per element, so every copy of a row gets its own
mask. The tile is cut into chunks of ``t`` samples so one session run stays within a memory
budget, and each chunk's outputs, reshaped to (t, B, ...), are folded into streaming
statistics (service.maths.uncertainty), so T = 10,000 needs the memory of one chunk, not of T.

:class:`Engine` is the small interface the rest of the server sees; :class:`TiledEngine` is the
straightforward implementation. Everything here is synchronous and runs on a worker thread,
never on the event loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from service.engine.graph_split import (
    NUM_SAMPLES_INPUT,
    NoiseRewriteError,
    SplitPlan,
    noise_fed_model,
    plan_split,
    split_models,
    tiled_model,
)
from service.engine.onnx_session import SessionConfig, create_session
from service.errors import Cancelled, InvalidInput, ModelLoadError
from service.maths.predictive import (
    AleatoricAccumulator,
    Interval,
    empirical_interval,
    gaussian_interval,
    mixture_interval,
)
from service.maths.uncertainty import (
    ClassificationAccumulator,
    ClassificationStats,
    RegressionAccumulator,
    RegressionStats,
)
from service.repository import ModelConfig, Semantics, TensorSpec, VersionSource
from service.settings import EngineKind

__all__ = [
    "CancelToken",
    "Engine",
    "OutputStats",
    "SplitGraphEngine",
    "SplitSessionsEngine",
    "TiledEngine",
    "build_engine",
    "chunk_samples",
]

log = logging.getLogger(__name__)

OutputStats = RegressionStats | ClassificationStats
_T = TypeVar("_T")

# ONNX Runtime type strings -> numpy dtypes, for the load-time check against config.json.
_ORT_TYPES: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype("float32"),
    "tensor(double)": np.dtype("float64"),
    "tensor(float16)": np.dtype("float16"),
    "tensor(int64)": np.dtype("int64"),
    "tensor(int32)": np.dtype("int32"),
    "tensor(int8)": np.dtype("int8"),
    "tensor(uint8)": np.dtype("uint8"),
    "tensor(bool)": np.dtype("bool"),
}

# Without an export-time estimate, assume a row of the tile needs this many times the bytes
# of its inputs and outputs (intermediate activations are usually a few times larger).
_FALLBACK_ACTIVATION_FACTOR = 16


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
            One statistics object per model output, in the config's output order.
        """
        ...


def chunk_samples(num_samples: int, num_rows: int, budget_rows: int) -> int:
    """Samples per session run so that a run holds at most ``budget_rows`` tile rows.

    At least one sample per run: a single batch larger than the budget still runs whole
    (its size is bounded by the max_batch_rows setting).
    """
    return max(1, min(num_samples, budget_rows // max(1, num_rows)))


def tile(x: NDArray[Any], num_samples: int) -> NDArray[Any]:
    """(B, ...) -> (T*B, ...), sample-major: row t*B + b is a copy of row b."""
    return np.broadcast_to(x, (num_samples, *x.shape)).reshape(
        num_samples * x.shape[0], *x.shape[1:]
    )


class _SamplingEngine:
    """The chunk loop shared by every engine: per request, :meth:`_prepare` once, then
    :meth:`_sample` per chunk of ``t`` samples, each chunk folded into the statistics.

    Subclasses own one or two ONNX Runtime sessions and decide what runs once and what runs
    on the tile.
    """

    #: Human-readable name, reported in logs and benchmarks.
    kind = "base"

    def __init__(self, source: VersionSource, tile_memory_bytes: int) -> None:
        self._config = source.config
        self._where = f"{source.name}/{source.version}"
        self._output_names = [o.name for o in self._config.outputs]
        per_row = self._config.activation_bytes_per_row or _FALLBACK_ACTIVATION_FACTOR * sum(
            t.row_bytes for t in self._config.inputs + self._config.outputs
        )
        self.budget_rows = max(1, tile_memory_bytes // max(1, per_row))
        self._provider = "CPUExecutionProvider"

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def config(self) -> ModelConfig:
        return self._config

    def _prepare(
        self, inputs: Mapping[str, NDArray[Any]], chunk: int, cancel: CancelToken | None
    ) -> Any:
        raise NotImplementedError

    def _sample(
        self, state: Any, t: int, num_rows: int, options: ort.RunOptions | None
    ) -> list[NDArray[Any]]:
        """Outputs of ``t`` samples of every row: one (t*B, ...) array per model output."""
        raise NotImplementedError

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
            return self._run_seeded(
                inputs,
                num_samples,
                cancel,
                keep_samples=keep_samples,
                interval_levels=interval_levels,
                seed=seed,
            )
        num_rows = next(iter(inputs.values())).shape[0]
        chunk = chunk_samples(num_samples, num_rows, self.budget_rows)
        state = self._guarded(partial(self._prepare, inputs, chunk, cancel), cancel)

        def chunks() -> Iterator[tuple[int, list[NDArray[Any]]]]:
            done = 0
            while done < num_samples:
                if cancel is not None and cancel.cancelled:
                    raise Cancelled("request cancelled")
                t = min(chunk, num_samples - done)
                options = cancel.run_options() if cancel is not None else None
                yield t, self._guarded(partial(self._sample, state, t, num_rows, options), cancel)
                done += t

        return self._fold(chunks(), num_rows, keep_samples, interval_levels)

    def _fold(
        self,
        chunks: Iterator[tuple[int, list[NDArray[Any]]]],
        num_rows: int,
        keep_samples: bool,
        interval_levels: tuple[float, ...],
    ) -> list[OutputStats]:
        """Fold chunks of (t, one (t*B, ...) array per output) into the statistics."""
        specs = self._config.outputs
        keep = keep_samples or bool(interval_levels)
        accumulators = [_accumulator(spec, keep) for spec in specs]
        # Heteroscedastic outputs: the mean predicted variance is the aleatoric variance.
        aleatoric = {
            i: AleatoricAccumulator()
            for i, spec in enumerate(specs)
            if spec.semantics is not None and spec.semantics.is_variance
        }
        for t, outputs in chunks:
            for i, (acc, out) in enumerate(zip(accumulators, outputs, strict=True)):
                values = np.asarray(out).reshape(t, num_rows, *out.shape[1:])
                acc.update(values)
                if i in aleatoric:
                    log = specs[i].semantics is Semantics.LOG_VARIANCE
                    aleatoric[i].update(np.exp(values.astype(np.float64)) if log else values)
        results = [acc.result() for acc in accumulators]
        for i, noise_acc in aleatoric.items():
            target = next(j for j, s in enumerate(specs) if s.name == specs[i].variance_of)
            stats = results[target]
            assert isinstance(stats, RegressionStats)  # config: variances describe values
            noise = noise_acc.result()
            results[target] = dataclasses.replace(
                stats, aleatoric_variance=noise, total_variance=stats.variance + noise
            )
        if interval_levels:
            results = _add_intervals(self._config, results, interval_levels)
        if not keep_samples:
            results = [dataclasses.replace(r, samples=None) for r in results]
        return results

    # -- seeded sampling -------------------------------------------------------------------

    _seeded: SeededPath | None = None
    _seeded_reason = "seeded sampling is not set up for this engine"

    def _set_up_seeded(
        self,
        model: onnx.ModelProto,
        session_config: SessionConfig,
        prefix: ort.InferenceSession | None = None,
    ) -> None:
        """Build the noise-fed session of the seeded path (``model`` is the part that runs on
        the tile; ``prefix`` the session that runs once, if any)."""
        try:
            self._seeded = SeededPath(model, session_config, prefix, self._where)
        except NoiseRewriteError as exc:
            self._seeded_reason = str(exc)
            log.info("%s: no seeded sampling: %s", self._where, exc)

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
        """Reproducible sampling: every row draws its dropout noise from its own generators,
        seeded by (seed, the row's bytes), and runs alone in chunks of a fixed number of
        samples. No number then depends on the batch size or the row's position: not the
        noise, not the kernels' shapes, not the chunk boundaries where the statistics are
        merged."""
        if self._seeded is None:
            raise InvalidInput(
                f"model {self._config.name!r} cannot sample with a seed: {self._seeded_reason}"
            )
        path = self._seeded
        num_rows = next(iter(inputs.values())).shape[0]
        names = [spec.name for spec in self._config.inputs]
        generators = [path.generators(seed, [inputs[n][b] for n in names]) for b in range(num_rows)]
        chunk = min(num_samples, SEEDED_CHUNK_SAMPLES)
        # One row per session run: kernels may round differently for different numbers of
        # rows (measured: the housing MLP's small GEMMs), so a run's shape must depend on T
        # only, never on B or the row's position. Slower than the batched path; unseeded
        # requests keep that one.
        parts: list[list[OutputStats]] = []
        for start in range(num_rows):
            rows = slice(start, start + 1)
            base = path.prepare({n: x[rows] for n, x in inputs.items()})
            gens = generators[rows]

            def chunks(
                base: dict[str, NDArray[Any]] = base, gens: list[list[np.random.Generator]] = gens
            ) -> Iterator[tuple[int, list[NDArray[Any]]]]:
                done = 0
                while done < num_samples:
                    if cancel is not None and cancel.cancelled:
                        raise Cancelled("request cancelled")
                    t = min(chunk, num_samples - done)
                    options = cancel.run_options() if cancel is not None else None
                    feed = path.feed(base, gens, t)
                    yield (
                        t,
                        self._guarded(partial(path.run, self._output_names, feed, options), cancel),
                    )
                    done += t

            parts.append(
                self._fold(chunks(), rows.stop - rows.start, keep_samples, interval_levels)
            )
        return [concat_rows([part[i] for part in parts]) for i in range(len(self._config.outputs))]

    @staticmethod
    def _guarded(call: Callable[[], _T], cancel: CancelToken | None) -> _T:
        """A session run; a run stopped by RunOptions.terminate becomes Cancelled."""
        try:
            return call()
        except Exception:
            if cancel is not None and cancel.cancelled:
                raise Cancelled("request cancelled") from None
            raise

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
            if spec.dtype.kind == "f":
                row[spec.name] = rng.standard_normal((1, *spec.row_shape)).astype(spec.dtype)
            else:
                row[spec.name] = np.zeros((1, *spec.row_shape), dtype=spec.dtype)
        outputs = self._sample(self._prepare(row, copies, None), copies, 1, None)
        return any(not np.all(out == out[:1]) for out in outputs)


class TiledEngine(_SamplingEngine):
    """The whole graph on the [t*B, ...] tile: the inputs are tiled, nothing runs once.

    The baseline, and the fallback for graphs that cannot be split.
    """

    kind = "tiled"

    def __init__(
        self, source: VersionSource, session_config: SessionConfig, tile_memory_bytes: int
    ) -> None:
        super().__init__(source, tile_memory_bytes)
        self._session = _load_session(source.model_path, session_config, self._where)
        self._provider = self._session.get_providers()[0]
        _check_graph_io(self._session, self._config, self._where)
        self._set_up_seeded(onnx.load(str(source.model_path)), session_config)

    def _prepare(
        self, inputs: Mapping[str, NDArray[Any]], chunk: int, cancel: CancelToken | None
    ) -> Any:
        # Tile once at the chunk size; a shorter last chunk uses a prefix of it.
        return {name: tile(x, chunk) for name, x in inputs.items()}

    def _sample(
        self, state: Any, t: int, num_rows: int, options: ort.RunOptions | None
    ) -> list[NDArray[Any]]:
        feed = {name: x[: t * num_rows] for name, x in state.items()}
        outputs: list[NDArray[Any]] = self._session.run(self._output_names, feed, options)
        return outputs


class SplitGraphEngine(_SamplingEngine):
    """One graph with a Tile at the cut: the prefix runs once per chunk on [B, ...] inside the
    session, the suffix on the tile (``service.engine.graph_split.tiled_model``)."""

    kind = "split-graph"

    def __init__(
        self,
        source: VersionSource,
        model: onnx.ModelProto,
        plan: SplitPlan,
        session_config: SessionConfig,
        tile_memory_bytes: int,
    ) -> None:
        super().__init__(source, tile_memory_bytes)
        self.plan = plan
        graph = tiled_model(model, plan).SerializeToString()
        self._session = _load_session(graph, session_config, self._where)
        self._provider = self._session.get_providers()[0]
        _check_graph_io(self._session, self._config, self._where, extra_inputs={NUM_SAMPLES_INPUT})
        self._set_up_seeded(model, session_config)

    def _prepare(
        self, inputs: Mapping[str, NDArray[Any]], chunk: int, cancel: CancelToken | None
    ) -> Any:
        return dict(inputs)

    def _sample(
        self, state: Any, t: int, num_rows: int, options: ort.RunOptions | None
    ) -> list[NDArray[Any]]:
        feed = {**state, NUM_SAMPLES_INPUT: np.array([t], dtype=np.int64)}
        outputs: list[NDArray[Any]] = self._session.run(self._output_names, feed, options)
        return outputs


class SplitSessionsEngine(_SamplingEngine):
    """Two sessions: the prefix runs once per request on [B, ...], its outputs are tiled in
    numpy, the suffix session runs on the tile (``service.engine.graph_split.split_models``)."""

    kind = "split-sessions"

    def __init__(
        self,
        source: VersionSource,
        model: onnx.ModelProto,
        plan: SplitPlan,
        session_config: SessionConfig,
        tile_memory_bytes: int,
    ) -> None:
        super().__init__(source, tile_memory_bytes)
        self.plan = plan
        prefix, suffix = split_models(model, plan)
        self._prefix = _load_session(prefix.SerializeToString(), session_config, self._where)
        self._suffix = _load_session(suffix.SerializeToString(), session_config, self._where)
        self._provider = self._suffix.get_providers()[0]
        self._prefix_outputs = [o.name for o in self._prefix.get_outputs()]
        self._input_names = {i.name for i in self._config.inputs}
        self._set_up_seeded(suffix, session_config, prefix=self._prefix)

    def _prepare(
        self, inputs: Mapping[str, NDArray[Any]], chunk: int, cancel: CancelToken | None
    ) -> Any:
        options = cancel.run_options() if cancel is not None else None
        computed = self._prefix.run(self._prefix_outputs, dict(inputs), options)
        cut = dict(zip(self._prefix_outputs, computed, strict=True))
        cut.update({name: x for name, x in inputs.items() if name in self.plan.cut})
        return {name: tile(x, chunk) for name, x in cut.items()}

    def _sample(
        self, state: Any, t: int, num_rows: int, options: ort.RunOptions | None
    ) -> list[NDArray[Any]]:
        feed = {name: x[: t * num_rows] for name, x in state.items()}
        outputs: list[NDArray[Any]] = self._suffix.run(self._output_names, feed, options)
        return outputs


#: Samples per session run on the seeded path: fixed, so that the chunk boundaries where the
#: statistics are merged (and so their rounding) never depend on the batch size.
SEEDED_CHUNK_SAMPLES = 64


class SeededPath:
    """The noise-fed session of reproducible sampling (``graph_split.noise_fed_model``).

    Args:
        model: the part of the graph that runs on the tile (the suffix, or the whole graph).
        session_config: how to build the session.
        prefix: the session that runs once per request on [B, ...], if the graph is split.
        where: "<model>/<version>", for messages.

    Raises:
        NoiseRewriteError: the graph's randomness cannot be fed from outside.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        session_config: SessionConfig,
        prefix: ort.InferenceSession | None,
        where: str,
    ) -> None:
        noise_model, self.noise = noise_fed_model(model)
        if not self.noise:
            raise NoiseRewriteError("the graph has no stochastic node")
        self._session = _load_session(noise_model.SerializeToString(), session_config, where)
        self._prefix = prefix
        self._prefix_outputs = [o.name for o in prefix.get_outputs()] if prefix is not None else []
        noise_names = {n.name for n in self.noise}
        self._inputs = [i.name for i in self._session.get_inputs() if i.name not in noise_names]

    def generators(self, seed: int, row: list[NDArray[Any]]) -> list[np.random.Generator]:
        """One generator per noise input for one row, from (seed, the row's bytes): the same
        seed and row give the same streams wherever the row sits."""
        digest = hashlib.sha256(seed.to_bytes(8, "little"))
        for part in row:
            digest.update(np.ascontiguousarray(part).tobytes())
        words = np.frombuffer(digest.digest(), dtype=np.uint32).tolist()
        return [
            np.random.default_rng(np.random.SeedSequence([*words, k]))
            for k in range(len(self.noise))
        ]

    def prepare(self, inputs: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[Any]]:
        """The tensors the noise-fed session takes: the prefix's outputs (run once) or the
        inputs themselves."""
        values = dict(inputs)
        if self._prefix is not None:
            computed = self._prefix.run(self._prefix_outputs, dict(inputs))
            values.update(zip(self._prefix_outputs, computed, strict=True))
        return {name: values[name] for name in self._inputs}

    def feed(
        self, base: Mapping[str, NDArray[Any]], generators: list[list[np.random.Generator]], t: int
    ) -> dict[str, NDArray[Any]]:
        """One run's feed: the tensors tiled t times (sample-major) and each row's next t
        draws of every noise input."""
        rows = len(generators)
        feed = {name: tile(x, t) for name, x in base.items()}
        for k, noise in enumerate(self.noise):
            draws = np.stack(
                [g[k].random((t, *noise.row_shape), dtype=np.float32) for g in generators], axis=1
            )
            feed[noise.name] = draws.reshape(t * rows, *noise.row_shape)
        return feed

    def run(
        self,
        output_names: list[str],
        feed: Mapping[str, NDArray[Any]],
        options: ort.RunOptions | None,
    ) -> list[NDArray[Any]]:
        outputs: list[NDArray[Any]] = self._session.run(output_names, dict(feed), options)
        return outputs


def concat_rows(parts: list[OutputStats]) -> OutputStats:
    """Statistics of consecutive row groups joined into one object (rows along axis 0)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    fields: dict[str, Any] = {
        f.name: np.concatenate([getattr(p, f.name) for p in parts])
        for f in dataclasses.fields(first)
        if isinstance(getattr(first, f.name), np.ndarray)
    }
    if isinstance(first, RegressionStats) and first.intervals:
        fields["intervals"] = tuple(
            dataclasses.replace(
                interval,
                lower=np.concatenate(
                    [p.intervals[j].lower for p in parts if isinstance(p, RegressionStats)]
                ),
                upper=np.concatenate(
                    [p.intervals[j].upper for p in parts if isinstance(p, RegressionStats)]
                ),
            )
            for j, interval in enumerate(first.intervals)
        )
    return dataclasses.replace(first, **fields)


def _load_session(
    model: Path | bytes, session_config: SessionConfig, where: str
) -> ort.InferenceSession:
    try:
        return create_session(model, session_config)
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise ModelLoadError(f"{where}: cannot load the model: {exc}") from exc


def build_engine(
    source: VersionSource,
    session_config: SessionConfig,
    tile_memory_bytes: int,
    kind: EngineKind = "auto",
) -> TiledEngine | SplitGraphEngine | SplitSessionsEngine:
    """The engine for one model version (the one place that decides which engine runs).

    ``auto`` splits the graph at the first stochastic node when that leaves work to run once,
    with the two-session form (measured faster on CPU: docs/benchmarks.md), and tiles the
    whole graph otherwise.

    Raises:
        ModelLoadError: the model cannot be loaded or does not match its config.
    """
    if kind == "tiled":
        return TiledEngine(source, session_config, tile_memory_bytes)
    try:
        model = onnx.load(str(source.model_path))
    except Exception as exc:
        raise ModelLoadError(
            f"{source.name}/{source.version}: cannot read model.onnx: {exc}"
        ) from exc
    plan = plan_split(model)
    log.info("%s/%s: %s", source.name, source.version, plan.describe())
    if not plan.is_split:
        return TiledEngine(source, session_config, tile_memory_bytes)
    if kind == "split-graph" or plan.tiled_outputs:
        return SplitGraphEngine(source, model, plan, session_config, tile_memory_bytes)
    return SplitSessionsEngine(source, model, plan, session_config, tile_memory_bytes)


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


def _accumulator(
    spec: TensorSpec, keep_samples: bool
) -> RegressionAccumulator | ClassificationAccumulator:
    if spec.semantics is not None and spec.semantics.is_classification:
        return ClassificationAccumulator(
            from_logits=spec.semantics is Semantics.LOGITS, keep_samples=keep_samples
        )
    return RegressionAccumulator(keep_samples=keep_samples)


def _check_graph_io(
    session: ort.InferenceSession,
    config: ModelConfig,
    where: str,
    extra_inputs: frozenset[str] | set[str] = frozenset(),
) -> None:
    """The graph's inputs and outputs must be exactly those of config.json."""
    graph_inputs = [a for a in session.get_inputs() if a.name not in extra_inputs]
    for kind, graph_args, specs in (
        ("inputs", graph_inputs, config.inputs),
        ("outputs", session.get_outputs(), config.outputs),
    ):
        graph = {a.name: a for a in graph_args}
        if set(graph) != {s.name for s in specs}:
            raise ModelLoadError(
                f"{where}: config.json {kind} {[s.name for s in specs]} differ from the "
                f"graph's {list(graph)}"
            )
        for spec in specs:
            arg = graph[spec.name]
            dtype = _ORT_TYPES.get(arg.type)
            if dtype != spec.dtype:
                raise ModelLoadError(
                    f"{where}: {spec.name} is {arg.type} in the graph, {spec.dtype} in config.json"
                )
            dims = list(arg.shape)
            if len(dims) != len(spec.shape) or any(
                isinstance(g, int) and g != s for g, s in zip(dims[1:], spec.shape[1:], strict=True)
            ):
                raise ModelLoadError(
                    f"{where}: {spec.name} has shape {dims} in the graph, {list(spec.shape)} in "
                    "config.json"
                )
