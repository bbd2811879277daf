"""The protocol-neutral data plane: every operation a protocol layer offers, in one object.

Protocol layers (``service.protocol``; a KServe v2 HTTP layer next) translate messages and call
:class:`DataPlane` only: liveness and readiness, model listing, metadata, predict, and the model
control entry points (:meth:`DataPlane.load`, :meth:`DataPlane.unload`, :meth:`DataPlane.index`,
through ``service.core.lifecycle``, the mechanism the repository poller uses too). They never
see the registry, the engines or the batcher.

A predict request arrives with its inputs as found on the wire (``service.tensors.WireTensor``):
the data plane resolves the version, picks the answer's outputs from the version's statistics
catalogue, decodes and validates the inputs, and hands the arrays to the version's batching
queue, which merges concurrent requests into one engine run on a bounded thread pool, so the
event loop never blocks; its bounded admission answers RESOURCE_EXHAUSTED instead of letting a
queue grow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service import metrics, tensors
from service.core.batching import Batcher, BatchPolicy, RunKey
from service.core.catalogue import Answer, Statistic
from service.core.lifecycle import Lifecycle, Listener
from service.core.registry import (
    EngineFactory,
    LoadedVersion,
    ModelRegistry,
    State,
    VersionState,
    engine_factory,
)
from service.core.statistics import VersionStatistics
from service.engine.runtime import OutputStats
from service.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotReady,
    NotFound,
    ResourceExhausted,
    Unavailable,
    quote,
)
from service.maths.adaptive import RowMerger, next_round
from service.repository import ModelConfig, ProvenanceInfo, Task, TensorSpec
from service.settings import Settings

__all__ = [
    "MAX_INTERVAL_LEVELS",
    "DataPlane",
    "ModelMetadata",
    "ModelSummary",
    "OutputResult",
    "PredictInput",
    "PredictResult",
    "State",
    "VersionState",
    "VersionStatistics",
    "decode_inputs",
    "validate_inputs",
]


@dataclass(frozen=True)
class PredictInput:
    """A predict request, as a protocol layer found it.

    Attributes:
        model: model name.
        version: version number as sent ("" or None for the newest).
        inputs: one wire tensor per model input, each (B, ...), not yet decoded.
        num_samples: T; None or 0 for the model's default.
        return_samples: also answer every sample, (B, T, ...) per output.
        interval_levels: prediction interval levels for regression outputs, each in (0, 1).
        target_standard_error: adaptive sampling: sample until every row's largest Monte
            Carlo standard error of the mean is at most this; ``num_samples`` (default: the
            model's maximum) is then the cap on T.
        seed: reproducible sampling (see the engine's ``run``); None for the fast path.
        outputs: the answer's outputs by name (``<output>_<statistic>``), in answer order;
            None or empty for all of them.
    """

    model: str
    version: str | None
    inputs: Sequence[tensors.WireTensor]
    num_samples: int | None = None
    return_samples: bool = False
    interval_levels: tuple[float, ...] = ()
    target_standard_error: float | None = None
    seed: int | None = None
    outputs: Sequence[str] | None = None


@dataclass(frozen=True)
class OutputResult:
    """The statistics of one model output.

    Attributes:
        spec: the output.
        stats: its statistics, (B, ...) arrays.
        statistics: those every answer gives for it (the catalogue's), in answer order.
    """

    spec: TensorSpec
    stats: OutputStats
    statistics: tuple[Statistic, ...]


@dataclass(frozen=True)
class PredictResult:
    """The answer to a predict request.

    Attributes:
        model: the model's name.
        version: the version that answered.
        num_samples: T (adaptive sampling: the largest T of any row).
        outputs: every model output's statistics, in the config's order.
        answer: the named outputs the request asked for, in answer order.
        num_samples_per_row: adaptive sampling only: the T each row used (B,).
    """

    model: str
    version: int
    num_samples: int
    outputs: tuple[OutputResult, ...]
    answer: tuple[Answer, ...] = ()
    num_samples_per_row: NDArray[np.int64] | None = None

    @property
    def rows(self) -> int:
        """B, the request's rows."""
        return int(self.outputs[0].stats.mean.shape[0]) if self.outputs else 0

    def read(self, answer: Answer) -> NDArray[Any]:
        """The values of one named output (an entry of :attr:`answer`)."""
        if answer.output is None:  # the one statistic of the request: the per-row T
            if self.num_samples_per_row is None:
                raise ValueError(f"{answer.name} exists only with adaptive sampling")
            return self.num_samples_per_row
        stats = next(o.stats for o in self.outputs if o.spec.name == answer.output.name)
        return answer.statistic.read(stats, answer.output.labels)


@dataclass(frozen=True)
class ModelSummary:
    """One model in a listing.

    Attributes:
        name: its name.
        versions: loaded versions, newest first.
        task: the newest loaded version's task; None when none is loaded.
        ready: whether it serves now.
        reason: why it is not ready (its newest version's load failure, or "unloaded on
            request"); empty when ready.
        states: every version the server holds for it, newest first, with the reason of each
            failure (a failed reload of a version that serves on included).
    """

    name: str
    versions: tuple[int, ...]
    task: Task | None
    ready: bool
    reason: str = ""
    states: tuple[VersionState, ...] = ()


@dataclass(frozen=True)
class ModelMetadata:
    """What a protocol may say about one model version.

    Attributes:
        name: the model's name.
        version: the version described.
        versions: every loaded version, newest first.
        config: its parsed config (task, description, inputs, outputs, labels, T limits).
        provider: the execution provider that really runs it.
        provenance: what its ``metadata.json`` says.
        statistics: the named outputs every answer has (the catalogue), in answer order.
        states: every version the server holds for the model, newest first, with the reason
            of each failure (e.g. a newer version that failed to load while this one serves).
        batching: how the version batches (its ``dynamic_batching`` resolved).
        max_request_rows: most rows of one request (``--max-batch-rows``).
        compute_workers: engine runs that execute at once (shared by every version).
    """

    name: str
    version: int
    versions: tuple[int, ...]
    config: ModelConfig
    provider: str
    provenance: ProvenanceInfo
    statistics: tuple[Answer, ...]
    states: tuple[VersionState, ...] = ()
    batching: BatchPolicy | None = None
    max_request_rows: int = 0
    compute_workers: int = 1


def decode_inputs(
    config: ModelConfig, inputs: Sequence[tensors.WireTensor]
) -> dict[str, NDArray[Any]]:
    """Decode a request's inputs, after checking their names against the model's.

    Raises:
        InvalidInput: an input given twice, missing or unexpected; any decoding error
            (``service.tensors.decode``).
    """
    names: set[str] = set()
    for tensor in inputs:
        if tensor.name in names:
            raise InvalidInput(f"input {quote(tensor.name)} is given twice")
        names.add(tensor.name)
    expected = {spec.name for spec in config.inputs}
    missing = sorted(expected - names)
    unexpected = sorted(names - expected)
    if missing or unexpected:
        raise InvalidInput(
            f"model {config.name!r} takes inputs {sorted(expected)}; missing {missing}, "
            f"unexpected {_quoted(unexpected)}"
        )
    return {tensor.name: tensors.decode(tensor) for tensor in inputs}


def _quoted(names: Sequence[str], most: int = 8) -> str:
    """A client's list of names for a message: each cut (``quote``), at most ``most`` shown."""
    shown = ", ".join(quote(n) for n in names[:most])
    return f"[{shown}{', ...' if len(names) > most else ''}]"


def _fits(expected: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` matches a config shape (-1 matches any size)."""
    return all(e in (-1, d) for e, d in zip(expected, shape, strict=True))


def validate_inputs(
    config: ModelConfig, inputs: Mapping[str, NDArray[Any]], max_batch_rows: int
) -> int:
    """Check a decoded batch against the model's inputs.

    Returns:
        B, the number of rows.

    Raises:
        InvalidInput: missing or unexpected input, wrong dtype, rank or shape, differing
            batch sizes, empty batch, NaN or infinite values.
        ResourceExhausted: more rows than ``max_batch_rows``.
    """
    expected = {spec.name for spec in config.inputs}
    if set(inputs) != expected:
        unexpected = _quoted(sorted(set(inputs) - expected))
        raise InvalidInput(
            f"model {config.name!r} takes inputs {sorted(expected)}; missing "
            f"{sorted(expected - set(inputs))}, unexpected {unexpected}"
        )
    rows: int | None = None
    for spec in config.inputs:
        x = inputs[spec.name]
        if x.dtype != spec.dtype:
            raise InvalidInput(f"input {spec.name!r} must be {spec.dtype}, got {x.dtype}")
        if x.ndim != len(spec.shape):
            raise InvalidInput(
                f"input {spec.name!r} must have rank {len(spec.shape)} (shape {list(spec.shape)}),"
                f" got shape {list(x.shape)}"
            )
        if not _fits(spec.shape, x.shape):
            raise InvalidInput(
                f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(x.shape)}"
            )
        for axis in spec.dynamic_axes:
            largest = spec.max_shape[axis] if spec.max_shape else None
            if x.shape[axis] < 1 or (largest is not None and x.shape[axis] > largest):
                raise InvalidInput(
                    f"input {spec.name!r} axis {axis} must have size 1..{largest}, got "
                    f"{x.shape[axis]} (shape {list(x.shape)})"
                )
        if rows is not None and x.shape[0] != rows:
            raise InvalidInput(f"inputs have different batch sizes ({rows} and {x.shape[0]})")
        rows = x.shape[0]
        if spec.dtype.kind == "f" and not np.isfinite(x).all():
            raise InvalidInput(f"input {spec.name!r} contains NaN or infinite values")
    assert rows is not None  # config.inputs is never empty
    if rows == 0:
        raise InvalidInput("the batch is empty (0 rows)")
    if rows > max_batch_rows:
        raise ResourceExhausted(f"{rows} rows is more than the limit of {max_batch_rows}")
    return rows


def _row_shapes(
    config: ModelConfig, inputs: Mapping[str, NDArray[Any]], *, seeded: bool = False
) -> tuple[tuple[int, ...], ...]:
    """The row shapes of a model with dynamic axes (requests of different shapes never share a
    run); empty for a model without (every request has the same) and for one that pads
    (``dynamic_batching.pad``: requests of any lengths share runs), unless seeded (a padded
    row would not be the row whose bytes seed its noise)."""
    if not any(spec.dynamic_axes for spec in config.inputs):
        return ()
    if config.dynamic_batching.pad and not seeded:
        return ()
    return tuple(tuple(inputs[spec.name].shape[1:]) for spec in config.inputs)


MAX_INTERVAL_LEVELS = 8


def _check_adaptive(request: PredictInput) -> None:
    target = request.target_standard_error
    assert target is not None
    if not (np.isfinite(target) and target > 0):
        raise InvalidInput(f"target_standard_error must be a positive number, got {target}")
    if request.return_samples or request.interval_levels or request.seed is not None:
        raise InvalidInput(
            "adaptive sampling (target_standard_error) cannot be combined with return_samples, "
            "interval_levels or seed"
        )


def _check_interval_levels(loaded: LoadedVersion, levels: tuple[float, ...], samples: int) -> None:
    """Intervals are for values outputs, at 1..8 levels in (0, 1), with T >= 2."""
    if not levels:
        return
    if not loaded.catalogue.has_intervals:
        raise InvalidInput(
            f"prediction intervals are for regression models; {loaded.name!r} has no values output"
        )
    if len(levels) > MAX_INTERVAL_LEVELS:
        raise InvalidInput(f"at most {MAX_INTERVAL_LEVELS} interval levels, got {len(levels)}")
    bad = [level for level in levels if not 0.0 < level < 1.0]
    if bad:
        raise InvalidInput(f"interval levels must be in (0, 1), got {bad}")
    if samples < 2:
        raise InvalidInput("prediction intervals need num_samples >= 2")


class DataPlane:
    """Serves predict, model listing, metadata and readiness for every protocol layer.

    Args:
        settings: the server settings.
        build: builds a version's engine (blocking); the server's ONNX Runtime engine by
            default (tests pass fakes).

    The plane starts empty and not accepting (predict answers UNAVAILABLE): :meth:`start`
    loads the repository off the event loop and serves. It is ready when it accepts and some
    model serves (or ``allow_empty_start``).
    """

    def __init__(self, settings: Settings, build: EngineFactory | None = None) -> None:
        self._settings = settings
        self._registry = ModelRegistry()
        self._accepting = False
        self._executor = ThreadPoolExecutor(
            max_workers=settings.compute_workers, thread_name_prefix="mcd-compute"
        )
        #: the compute every version shares; versions get their queues from it at load time
        self.batcher = Batcher(
            self._executor,
            compute_workers=settings.compute_workers,
            max_queue_size=settings.max_queue_size,
            max_row_samples=settings.max_row_samples,
        )
        #: loads, swaps and unloads versions (start-up, repository polls, control calls)
        self.lifecycle = Lifecycle(
            settings, self.batcher, self._registry, build or engine_factory(settings)
        )

    # -- lifecycle (the composition root) ------------------------------------------------------

    @property
    def registry(self) -> ModelRegistry:
        """The versions served (tests may put hand-made versions in before :meth:`serve`)."""
        return self._registry

    async def start(self) -> None:
        """Load every version of the repository (off the event loop; a version that fails is
        logged and left out, never the others), then serve; poll the repository from then on
        when ``repository_poll_s`` is set.

        Raises:
            ModelLoadError: the repository is not a folder.
        """
        await self.lifecycle.start()
        self.serve()
        await self.lifecycle.notify()

    def serve(self) -> None:
        """Accept requests from now on (call on the event loop)."""
        self._accepting = True

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` (on the event loop) whenever what is served or ready changes."""
        self.lifecycle.add_listener(listener)

    def set_not_ready(self) -> None:
        """Stop admitting predict requests (shutdown): they get UNAVAILABLE."""
        self._accepting = False

    async def close(self) -> None:
        """Stop loading, answer waiting requests UNAVAILABLE, let running batches finish, then
        stop the compute workers (off the event loop)."""
        self._accepting = False
        await self.lifecycle.close()
        await self.batcher.close()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._executor.shutdown(wait=True, cancel_futures=True)
        )

    # -- health and metadata -------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the server is ready: it accepts requests (started, not shutting down) and
        some model serves, or ``allow_empty_start`` says that none is fine."""
        return self._accepting and (
            bool(self._registry.names()) or self._settings.allow_empty_start
        )

    def model_names(self) -> list[str]:
        """The names of the models with a version serving, sorted."""
        return self._registry.names()

    def model_health(self) -> dict[str, bool]:
        """Every model the server knows (serving, failed to load, unloaded): whether it
        serves now."""
        return {name: self.model_ready(name) for name in self._registry.known()}

    def has_model(self, name: str) -> bool:
        """Whether the server knows the model (serving, failed to load, or unloaded)."""
        return self._registry.has_model(name)

    def model_label(self, name: str) -> str:
        """A bounded metrics label: the name of a model in the repository, else ``_unknown``."""
        return name if self._registry.has_model(name) else metrics.UNKNOWN_MODEL

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Whether the version serves now; an unknown, failed or unloaded model or version is
        not ready.

        Raises:
            InvalidInput: ``version`` is not a number.
        """
        try:
            self._registry.get(name, version)
        except (NotFound, Unavailable):
            return False
        return self._accepting

    def list_models(self) -> list[ModelSummary]:
        """Every model the server knows, by name: those serving, and those that are not, with
        the reason."""
        summaries = []
        for name in self._registry.known():
            versions = tuple(self._registry.versions(name))
            summaries.append(
                ModelSummary(
                    name=name,
                    versions=versions,
                    task=self._registry.get(name).config.task if versions else None,
                    ready=self._accepting and bool(versions),
                    reason=self._registry.reason(name),
                    states=tuple(self._registry.states(name)),
                )
            )
        return summaries

    def metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        """Describe one version (the newest loaded when ``version`` is empty).

        Raises:
            ModelNotFound / VersionNotFound; Unavailable: the model or version failed to
            load (the message gives the reason) or was unloaded; InvalidInput: ``version`` is
            not a number.
        """
        loaded = self._registry.get(name, version)
        return ModelMetadata(
            name=loaded.name,
            version=loaded.version,
            versions=tuple(self._registry.versions(loaded.name)),
            config=loaded.config,
            provider=loaded.engine.provider,
            provenance=loaded.source.provenance,
            statistics=loaded.catalogue.answers,
            states=tuple(self._registry.states(loaded.name)),
            batching=loaded.queue.policy,
            max_request_rows=self._settings.max_batch_rows,
            compute_workers=self._settings.compute_workers,
        )

    def statistics(self, name: str = "", version: str | None = None) -> list[VersionStatistics]:
        """The statistics of the versions serving now (Triton's statistics extension): every
        model's when ``name`` is empty, else that model's (one version when ``version`` is set),
        by model then version.

        Raises:
            ModelNotFound / VersionNotFound; Unavailable: the model or version is known but
            does not serve; InvalidInput: ``version`` is not a number.
        """
        if not name:
            if version:
                raise InvalidInput("a version needs a model name")
            names = self._registry.names()
        else:
            self._registry.get(name, version)  # raises for what does not serve
            names = [name]
        found = []
        for model in names:
            numbers = [int(version)] if version else sorted(self._registry.versions(model))
            for number in numbers:
                loaded = self._registry.loaded(model, number)
                if loaded is not None:
                    found.append(loaded.queue.statistics.snapshot())
        return found

    # -- model control (a control API: Triton's RepositoryIndex / ModelLoad / ModelUnload) --

    async def load(self, name: str) -> list[VersionState]:
        """Load or reload one model from the repository now (see ``Lifecycle.load``).

        Raises:
            ModelNotFound: the repository has no version of it.
            Unavailable: a version failed to load; the message gives the reasons.
        """
        return await self.lifecycle.load(name)

    async def unload(self, name: str, *, wait: bool = False) -> None:
        """Stop serving one model; in-flight requests finish (see ``Lifecycle.unload``).

        Raises:
            ModelNotFound: the server does not know it.
        """
        await self.lifecycle.unload(name, wait=wait)

    def index(self) -> list[VersionState]:
        """Every model version the server knows, with its state and reason."""
        return self.lifecycle.index()

    # -- predict -------------------------------------------------------------------------------

    async def predict(self, request: PredictInput, timeout_s: float | None = None) -> PredictResult:
        """Resolve, validate, admit and run one request.

        Args:
            request: the request.
            timeout_s: time left until the client's deadline; None for no deadline.

        Raises:
            ServiceError: every failure a client may see (subclasses name the status).
        """
        if not self._accepting:
            raise ModelNotReady(request.model, request.version or "newest")
        loaded = self._registry.get(request.model, request.version)
        started_ns = time.perf_counter_ns()
        ok, rows = False, 0
        try:
            # Held until the answer: a version swapped out meanwhile finishes this request
            # first.
            with loaded.queue.hold():
                result = await self._predict(loaded, request, timeout_s)
            ok, rows = True, result.rows
            return result
        finally:
            loaded.queue.statistics.request_done(
                ok=ok, elapsed_ns=time.perf_counter_ns() - started_ns, rows=rows
            )

    async def _predict(
        self, loaded: LoadedVersion, request: PredictInput, timeout_s: float | None
    ) -> PredictResult:
        config = loaded.config
        adaptive = request.target_standard_error is not None
        answer = loaded.catalogue.select(
            request.outputs,
            return_samples=request.return_samples,
            interval_levels=request.interval_levels,
            adaptive=adaptive,
        )
        inputs = decode_inputs(config, request.inputs)
        if adaptive:
            _check_adaptive(request)
        default = config.max_num_samples if adaptive else config.default_num_samples
        num_samples = request.num_samples or default
        if not 1 <= num_samples <= config.max_num_samples:
            raise InvalidInput(
                f"num_samples must be in 1..{config.max_num_samples} for model "
                f"{config.name!r}, got {num_samples}"
            )
        rows = validate_inputs(config, inputs, self._settings.max_batch_rows)
        if rows * num_samples > self._settings.max_row_samples:
            raise ResourceExhausted(
                f"rows x samples = {rows} x {num_samples} = {rows * num_samples} is more than "
                f"the limit of {self._settings.max_row_samples}"
            )
        _check_interval_levels(loaded, request.interval_levels, num_samples)
        if request.return_samples or request.interval_levels:
            # Intervals are computed from every sample, which are then held like raw samples.
            values = rows * num_samples * sum(loaded.engine.output_elements(inputs))
            if values > self._settings.max_returned_samples:
                raise ResourceExhausted(
                    f"returning the samples means {values} values (rows x samples x output "
                    f"size), more than the limit of {self._settings.max_returned_samples}"
                )
        metrics.REQUEST_ROWS.labels(model=config.name).observe(rows)
        per_row: NDArray[np.int64] | None = None
        if request.target_standard_error is not None:
            stats, per_row = await self._adaptive(
                loaded,
                inputs,
                rows,
                num_samples,
                target=request.target_standard_error,
                timeout_s=timeout_s,
            )
            num_samples = int(per_row.max())
        else:
            run = RunKey(
                num_samples=num_samples,
                return_samples=request.return_samples,
                interval_levels=request.interval_levels,
                seed=request.seed,
                row_shapes=_row_shapes(config, inputs, seeded=request.seed is not None),
            )
            stats = await self._submit(loaded, inputs, rows, run, timeout_s)
        metrics.REQUEST_SAMPLES.labels(model=config.name).observe(num_samples)
        return PredictResult(
            model=config.name,
            version=loaded.version,
            num_samples=num_samples,
            outputs=tuple(
                OutputResult(spec=spec, stats=s, statistics=loaded.catalogue.statistics(spec.name))
                for spec, s in zip(config.outputs, stats, strict=True)
            ),
            answer=answer,
            num_samples_per_row=per_row,
        )

    async def _adaptive(
        self,
        loaded: LoadedVersion,
        inputs: Mapping[str, NDArray[Any]],
        rows: int,
        max_samples: int,
        *,
        target: float,
        timeout_s: float | None,
    ) -> tuple[list[OutputStats], NDArray[np.int64]]:
        """Rounds of the rows still above the target (service.maths.adaptive), each an ordinary
        batched engine run; returns the merged statistics and the T of each row."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        mergers = [RowMerger(rows) for _ in loaded.config.outputs]
        pending = np.arange(rows)
        row_shapes = _row_shapes(loaded.config, inputs)  # the same for every round
        last: list[OutputStats] = []
        while pending.size:
            # Pending rows ran every round so far, so they all have the same T.
            samples = next_round(int(mergers[0].counts[pending[0]]), max_samples)
            if samples == 0:
                break
            remaining = None if deadline is None else deadline - loop.time()
            subset = {name: x[pending] for name, x in inputs.items()}
            run = RunKey(num_samples=samples, row_shapes=row_shapes)
            last = await self._submit(loaded, subset, int(pending.size), run, remaining)
            for merger, stats in zip(mergers, last, strict=True):
                merger.add(pending, stats)
            error = np.max([m.standard_error() for m in mergers], axis=0)
            pending = pending[
                (error[pending] > target) & (mergers[0].counts[pending] < max_samples)
            ]
        results = [m.result(t) for m, t in zip(mergers, last, strict=True)]
        return results, mergers[0].counts.copy()

    @staticmethod
    async def _submit(
        loaded: LoadedVersion,
        inputs: Mapping[str, NDArray[Any]],
        rows: int,
        run: RunKey,
        timeout_s: float | None,
    ) -> list[OutputStats]:
        """Run validated rows through the version's queue (which admits or refuses them)."""
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded("the deadline passed before the request was run")
        return await loaded.queue.submit(inputs, rows, run, timeout_s=timeout_s)
