"""The protocol-neutral core: model registry, request validation, admission and execution.

Protocol layers (service.protocol) translate wire messages into :class:`PredictInput` and call
:meth:`InferenceCore.predict`; they never touch numpy maths or ONNX Runtime. Validated requests
go to the cross-request batcher (service.core.batching), which merges concurrent requests for
the same version and T into one engine run on a bounded thread pool, so the event loop never
blocks; its bounded admission answers RESOURCE_EXHAUSTED instead of letting a queue grow.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from service import metrics
from service.core.batching import Batcher, BatchKey, BatchPolicy
from service.engine.onnx_session import SessionConfig
from service.engine.runtime import Engine, OutputStats, build_engine
from service.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
    ResourceExhausted,
    VersionNotFound,
)
from service.maths.adaptive import RowMerger, next_round
from service.repository import ModelConfig, Task, TensorSpec, VersionSource, scan_repository
from service.settings import Settings

__all__ = [
    "InferenceCore",
    "LoadedVersion",
    "ModelRegistry",
    "OutputResult",
    "PredictInput",
    "PredictResult",
    "validate_inputs",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedVersion:
    """A version that is loaded and can serve."""

    source: VersionSource
    engine: Engine

    @property
    def config(self) -> ModelConfig:
        return self.source.config

    @property
    def version(self) -> int:
        return self.source.version


@dataclass(frozen=True)
class PredictInput:
    """A decoded Predict request.

    Attributes:
        model: model name.
        version: version number as sent ("" or None for the newest).
        inputs: one (B, ...) array per model input.
        num_samples: T; None or 0 for the model's default.
        return_samples: also answer every sample, (B, T, ...) per output.
        interval_levels: prediction interval levels for regression outputs, each in (0, 1).
        target_standard_error: adaptive sampling: sample until every row's largest Monte
            Carlo standard error of the mean is at most this; ``num_samples`` (default: the
            model's maximum) is then the cap on T.
        seed: reproducible sampling (see the engine's ``run``); None for the fast path.
    """

    model: str
    version: str | None
    inputs: Mapping[str, NDArray[Any]]
    num_samples: int | None = None
    return_samples: bool = False
    interval_levels: tuple[float, ...] = ()
    target_standard_error: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class OutputResult:
    spec: TensorSpec
    stats: OutputStats


@dataclass(frozen=True)
class PredictResult:
    model: str
    version: int
    num_samples: int
    outputs: tuple[OutputResult, ...]
    labels: tuple[str, ...]
    #: adaptive sampling only: the T each row used (B,); ``num_samples`` is the largest
    num_samples_per_row: NDArray[np.int64] | None = None


class ModelRegistry:
    """The loaded versions, by model name and version number."""

    def __init__(self) -> None:
        self._models: dict[str, dict[int, LoadedVersion]] = {}
        self.failed: list[tuple[Path, str]] = []

    def add(self, loaded: LoadedVersion) -> None:
        self._models.setdefault(loaded.source.name, {})[loaded.version] = loaded

    def names(self) -> list[str]:
        return sorted(self._models)

    def has_model(self, name: str) -> bool:
        return name in self._models

    def versions(self, name: str) -> list[int]:
        """Loaded versions of ``name``, newest first."""
        return sorted(self._models.get(name, {}), reverse=True)

    def get(self, name: str, version: str | None = None) -> LoadedVersion:
        """The requested version, or the newest when ``version`` is empty.

        Raises:
            ModelNotFound / VersionNotFound.
        """
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(name)
        if not version:
            return versions[max(versions)]
        try:
            number = int(version)
        except ValueError:
            raise InvalidInput(f"version must be a positive integer, got {version!r}") from None
        if number not in versions:
            raise VersionNotFound(name, version, [str(v) for v in self.versions(name)])
        return versions[number]


def load_registry(settings: Settings) -> ModelRegistry:
    """Load every version of the repository. Blocking: call it off the event loop.

    A version that cannot be served (bad config, graph mismatch, dropout not stochastic) is
    skipped and logged; it never takes the others down.
    """
    session_config = SessionConfig(
        use_gpu=settings.device != "cpu",
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        allow_spinning=settings.allow_spinning,
        graph_optimization_level=settings.graph_optimization_level,
        gpu_device_id=settings.gpu_device_id,
        cuda_conv_algo_search=settings.cuda_conv_algo_search,
    )
    registry = ModelRegistry()
    sources, problems = scan_repository(settings.model_repository)
    registry.failed.extend(problems)
    for source in sources:
        try:
            engine = build_engine(
                source, session_config, settings.tile_memory_bytes, settings.engine
            )
            if settings.device == "gpu" and engine.provider != "CUDAExecutionProvider":
                raise ModelLoadError(
                    f"{source.name}/{source.version}: device=gpu but CUDA did not load "
                    f"(running on {engine.provider})"
                )
            if not engine.is_stochastic():
                raise ModelLoadError(
                    f"{source.name}/{source.version}: copies of one row gave identical outputs: "
                    "the graph has no active dropout (was it exported with dropout in eval "
                    "mode, or were its Dropout nodes optimised away?)"
                )
        except ModelLoadError as exc:
            registry.failed.append((source.path, str(exc)))
            continue
        registry.add(LoadedVersion(source=source, engine=engine))
        metrics.MODEL_INFO.labels(model=source.name, version=str(source.version)).info(
            {
                "provider": engine.provider,
                "opset": str(source.provenance.opset),
                "task": source.config.task.value,
            }
        )
        log.info(
            "loaded %s version %d on %s (T default %d, max %d)",
            source.name,
            source.version,
            engine.provider,
            source.config.default_num_samples,
            source.config.max_num_samples,
        )
    for path, reason in registry.failed:
        log.error("not serving %s: %s", path, reason)
    return registry


def validate_inputs(
    config: ModelConfig, inputs: Mapping[str, NDArray[Any]], max_batch_rows: int
) -> int:
    """Check a decoded batch against the model's inputs.

    Returns:
        B, the number of rows.

    Raises:
        InvalidInput: missing or unexpected input, wrong dtype, rank or row shape, differing
            batch sizes, empty batch, NaN or infinite values.
        ResourceExhausted: more rows than ``max_batch_rows``.
    """
    expected = {spec.name for spec in config.inputs}
    missing = sorted(expected - set(inputs))
    unexpected = sorted(set(inputs) - expected)
    if missing or unexpected:
        raise InvalidInput(
            f"model {config.name!r} takes inputs {sorted(expected)}; missing {missing}, "
            f"unexpected {unexpected}"
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
        if tuple(x.shape[1:]) != spec.row_shape:
            raise InvalidInput(
                f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(x.shape)}"
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


def _check_interval_levels(
    config: ModelConfig, levels: tuple[float, ...], num_samples: int
) -> None:
    """Intervals are for regression models, at 1..8 levels in (0, 1), with T >= 2."""
    if not levels:
        return
    if config.task is not Task.REGRESSION:
        raise InvalidInput(
            f"prediction intervals are for regression models; {config.name!r} classifies"
        )
    if len(levels) > MAX_INTERVAL_LEVELS:
        raise InvalidInput(f"at most {MAX_INTERVAL_LEVELS} interval levels, got {len(levels)}")
    bad = [level for level in levels if not 0.0 < level < 1.0]
    if bad:
        raise InvalidInput(f"interval levels must be in (0, 1), got {bad}")
    if num_samples < 2:
        raise InvalidInput("prediction intervals need num_samples >= 2")


class InferenceCore:
    """Serves Predict, model listing and metadata for every protocol layer.

    Args:
        settings: the server settings.
        registry: the loaded models; set later with :meth:`set_registry` when loading
            happens after the server started (it answers UNAVAILABLE until then).
    """

    def __init__(self, settings: Settings, registry: ModelRegistry | None = None) -> None:
        self._settings = settings
        self._registry = registry or ModelRegistry()
        self._ready = registry is not None
        self._executor = ThreadPoolExecutor(
            max_workers=settings.compute_workers, thread_name_prefix="mcd-compute"
        )
        self._batcher = Batcher(
            self._executor,
            compute_workers=settings.compute_workers,
            max_queue_size=settings.max_queue_size,
            max_row_samples=settings.max_row_samples,
        )

    @property
    def registry(self) -> ModelRegistry:
        return self._registry

    @property
    def ready(self) -> bool:
        return self._ready

    def set_registry(self, registry: ModelRegistry) -> None:
        self._registry = registry
        self._ready = True

    def set_not_ready(self) -> None:
        """Stop admitting Predict requests (shutdown): they get UNAVAILABLE."""
        self._ready = False

    def model_label(self, name: str) -> str:
        """A bounded metrics label: the name of a loaded model, else ``_unknown``."""
        return name if self._registry.has_model(name) else metrics.UNKNOWN_MODEL

    def get(self, model: str, version: str | None = None) -> LoadedVersion:
        if not self._ready:
            raise ModelNotReady(model, version or "newest")
        return self._registry.get(model, version)

    async def predict(self, request: PredictInput, timeout_s: float | None = None) -> PredictResult:
        """Validate, admit and run one request.

        Args:
            request: the decoded request.
            timeout_s: time left until the client's deadline; None for no deadline.

        Raises:
            ServiceError: every failure a client may see (subclasses name the status).
        """
        loaded = self.get(request.model, request.version)
        config = loaded.config
        adaptive = request.target_standard_error is not None
        if adaptive:
            _check_adaptive(request)
        default = config.max_num_samples if adaptive else config.default_num_samples
        num_samples = request.num_samples or default
        if not 1 <= num_samples <= config.max_num_samples:
            raise InvalidInput(
                f"num_samples must be in 1..{config.max_num_samples} for model "
                f"{config.name!r}, got {num_samples}"
            )
        rows = validate_inputs(config, request.inputs, self._settings.max_batch_rows)
        if rows * num_samples > self._settings.max_row_samples:
            raise ResourceExhausted(
                f"rows x samples = {rows} x {num_samples} = {rows * num_samples} is more than "
                f"the limit of {self._settings.max_row_samples}"
            )
        _check_interval_levels(config, request.interval_levels, num_samples)
        if request.return_samples or request.interval_levels:
            # Intervals are computed from every sample, which are then held like raw samples.
            values = rows * num_samples * sum(o.row_size for o in config.outputs)
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
                request.inputs,
                rows,
                num_samples,
                target=request.target_standard_error,
                timeout_s=timeout_s,
            )
            num_samples = int(per_row.max())
        else:
            stats = await self._execute(
                loaded,
                request.inputs,
                rows,
                num_samples,
                timeout_s,
                return_samples=request.return_samples,
                interval_levels=request.interval_levels,
                seed=request.seed,
            )
        metrics.REQUEST_SAMPLES.labels(model=config.name).observe(num_samples)
        return PredictResult(
            model=config.name,
            version=loaded.version,
            num_samples_per_row=per_row,
            num_samples=num_samples,
            outputs=tuple(
                OutputResult(spec=spec, stats=s)
                for spec, s in zip(config.outputs, stats, strict=True)
            ),
            labels=config.labels,
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
        last: list[OutputStats] = []
        while pending.size:
            # Pending rows ran every round so far, so they all have the same T.
            samples = next_round(int(mergers[0].counts[pending[0]]), max_samples)
            if samples == 0:
                break
            remaining = None if deadline is None else deadline - loop.time()
            subset = {name: x[pending] for name, x in inputs.items()}
            last = await self._execute(loaded, subset, int(pending.size), samples, remaining)
            for merger, stats in zip(mergers, last, strict=True):
                merger.add(pending, stats)
            error = np.max([m.standard_error() for m in mergers], axis=0)
            pending = pending[
                (error[pending] > target) & (mergers[0].counts[pending] < max_samples)
            ]
        results = [m.result(t) for m, t in zip(mergers, last, strict=True)]
        return results, mergers[0].counts.copy()

    async def _execute(
        self,
        loaded: LoadedVersion,
        inputs: Mapping[str, NDArray[Any]],
        rows: int,
        num_samples: int,
        timeout_s: float | None,
        *,
        return_samples: bool = False,
        interval_levels: tuple[float, ...] = (),
        seed: int | None = None,
    ) -> list[OutputStats]:
        """Run a validated request through the batcher (which admits it or refuses it)."""
        if timeout_s is not None and timeout_s <= 0:
            raise DeadlineExceeded("the deadline passed before the request was run")
        config = loaded.config
        return await self._batcher.submit(
            BatchKey(
                model=config.name,
                version=loaded.version,
                num_samples=num_samples,
                return_samples=return_samples,
                interval_levels=interval_levels,
                seed=seed,
            ),
            loaded.engine,
            BatchPolicy.from_config(config.dynamic_batching, self._settings.max_batch_rows),
            inputs,
            rows,
            timeout_s=timeout_s,
        )

    async def close(self) -> None:
        """Answer waiting requests UNAVAILABLE, let running batches finish, then stop the
        compute workers (off the event loop)."""
        self._ready = False
        await self._batcher.close()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._executor.shutdown(wait=True, cancel_futures=True)
        )
