"""The loaded model versions: each built once, at load time, with everything it serves with.

A :class:`LoadedVersion` owns its engine, its statistics catalogue and its batching queue (its
policy inside); nothing about a version is rebuilt per request. :func:`load_repository` is the
one place engines are built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from service import metrics
from service.core.batching import Batcher, BatchPolicy, VersionQueue
from service.core.catalogue import Catalogue
from service.engine.onnx_session import SessionConfig
from service.engine.runtime import Engine, build_engine
from service.errors import InvalidInput, ModelLoadError, ModelNotFound, VersionNotFound
from service.repository import ModelConfig, VersionSource, scan_repository
from service.settings import Settings

__all__ = ["LoadedVersion", "ModelRegistry", "load_repository", "open_version"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedVersion:
    """A version that is loaded and can serve.

    Attributes:
        source: its folder and parsed config.
        engine: its engine (the data plane reads only ``provider``; runs go through ``queue``).
        catalogue: the statistics it answers.
        queue: its batching queue, over ``engine``, with its policy.
    """

    source: VersionSource
    engine: Engine
    catalogue: Catalogue
    queue: VersionQueue

    @property
    def config(self) -> ModelConfig:
        return self.source.config

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def version(self) -> int:
        return self.source.version


def open_version(
    source: VersionSource,
    engine: Engine,
    batcher: Batcher,
    default_max_batch_rows: int,
    catalogue: Catalogue | None = None,
) -> LoadedVersion:
    """Everything a version serves with, built from its engine: catalogue, policy, queue.

    Args:
        source: the version's folder and config.
        engine: its engine.
        batcher: the shared batcher its queue joins.
        default_max_batch_rows: the batch cap when its config sets none (``--max-batch-rows``).
        catalogue: its catalogue, if already made; else made here.

    Raises:
        ModelLoadError: its statistic output names collide.
    """
    catalogue = catalogue or Catalogue(source.config)
    policy = BatchPolicy.from_config(source.config.dynamic_batching, default_max_batch_rows)
    queue = batcher.version_queue(source.name, source.version, engine, policy)
    return LoadedVersion(source=source, engine=engine, catalogue=catalogue, queue=queue)


class ModelRegistry:
    """The loaded versions, by model name and version number."""

    def __init__(self) -> None:
        self._models: dict[str, dict[int, LoadedVersion]] = {}
        self.failed: list[tuple[Path, str]] = []

    def add(self, loaded: LoadedVersion) -> None:
        self._models.setdefault(loaded.name, {})[loaded.version] = loaded

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
            ModelNotFound / VersionNotFound; InvalidInput: ``version`` is not a number.
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


def load_repository(settings: Settings, batcher: Batcher) -> ModelRegistry:
    """Load every version of the repository. Blocking: call it off the event loop.

    A version that cannot be served (bad config, graph mismatch, dropout not stochastic,
    colliding statistic names) is skipped and logged; it never takes the others down.
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
            # Names first: a version refused for its names costs no session.
            catalogue = Catalogue(source.config)
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
            loaded = open_version(source, engine, batcher, settings.max_batch_rows, catalogue)
        except ModelLoadError as exc:
            registry.failed.append((source.path, str(exc)))
            continue
        registry.add(loaded)
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
