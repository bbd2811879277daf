"""The model versions the server knows: those loaded, each built once with everything it serves
with, and those that could not be loaded, with the reason.

A :class:`LoadedVersion` owns its engine, its statistics catalogue and its batching queue (its
policy inside); nothing about a version is rebuilt per request. :func:`prepare_version` is the
one place engines are built (blocking, off the event loop); :func:`open_version` then gives the
version its queue, on the loop. The :class:`ModelRegistry` is what the data plane looks versions
up in; only ``service.core.lifecycle`` changes it, on the event loop, so a lookup never sees a
half-made change.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from service.core.batching import Batcher, BatchPolicy, VersionQueue
from service.core.catalogue import Catalogue
from service.engine.onnx_session import SessionConfig
from service.engine.runtime import Engine, build_engine
from service.errors import (
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    Unavailable,
    VersionNotFound,
    quote,
)
from service.repository import Fingerprint, ModelConfig, VersionSource
from service.settings import Settings

__all__ = [
    "EngineFactory",
    "Failure",
    "LoadedVersion",
    "ModelRegistry",
    "PreparedVersion",
    "State",
    "VersionState",
    "engine_factory",
    "open_version",
    "prepare_version",
]

log = logging.getLogger(__name__)

#: Builds the engine of one version (blocking). The server's is :func:`engine_factory`'s.
EngineFactory = Callable[[VersionSource], Engine]


class State(enum.StrEnum):
    """The state of a model version, as the repository index reports it (Triton's names)."""

    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True)
class VersionState:
    """One entry of the repository index.

    Attributes:
        model: the model's name.
        version: the version number; None for an entry about the whole model (unloaded on
            request).
        state: its state.
        reason: why it is not READY; for a READY version, why its files on disk are not the
            ones serving (a reload failed: the previous files serve on). Empty otherwise.
    """

    model: str
    version: int | None
    state: State
    reason: str = ""


@dataclass(frozen=True)
class Failure:
    """A version's files that failed to load.

    Attributes:
        reason: why (the message of the ModelLoadError).
        fingerprint: the files that failed: the same files are not tried again until they
            change (or an explicit load asks).
    """

    reason: str
    fingerprint: Fingerprint


@dataclass(frozen=True)
class PreparedVersion:
    """A version built off the event loop, not yet serving: see :func:`open_version`."""

    source: VersionSource
    engine: Engine
    catalogue: Catalogue
    fingerprint: Fingerprint


@dataclass(frozen=True)
class LoadedVersion:
    """A version that is loaded and can serve.

    Attributes:
        source: its folder and parsed config.
        engine: its engine (the data plane reads only ``provider``; runs go through ``queue``).
        catalogue: the statistics it answers.
        queue: its batching queue, over ``engine``, with its policy; a data plane call holds
            it while it uses the version (``queue.hold()``), so an old copy is released only
            once idle.
        fingerprint: the files it was loaded from.
    """

    source: VersionSource
    engine: Engine
    catalogue: Catalogue
    queue: VersionQueue
    fingerprint: Fingerprint = ()

    @property
    def config(self) -> ModelConfig:
        return self.source.config

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def version(self) -> int:
        return self.source.version


def engine_factory(settings: Settings) -> EngineFactory:
    """The server's engine builder: ONNX Runtime sessions as the settings say."""
    session_config = SessionConfig(
        use_gpu=settings.device != "cpu",
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        allow_spinning=settings.allow_spinning,
        graph_optimization_level=settings.graph_optimization_level,
        gpu_device_id=settings.gpu_device_id,
        cuda_conv_algo_search=settings.cuda_conv_algo_search,
    )

    def build(source: VersionSource) -> Engine:
        return build_engine(source, session_config, settings.tile_memory_bytes, settings.engine)

    return build


def prepare_version(
    source: VersionSource,
    fingerprint: Fingerprint,
    build: EngineFactory,
    *,
    require_cuda: bool = False,
) -> PreparedVersion:
    """Build a version's catalogue and engine and probe it: everything blocking about a load.

    Call it off the event loop. Whatever goes wrong, it raises ModelLoadError with the reason,
    never anything else: one model's failure (a config that does not match its graph, a probe
    that raises inside ONNX Runtime) must never stop the server or the other models.

    Args:
        source: the version's folder and parsed config.
        fingerprint: its files as found.
        build: builds its engine.
        require_cuda: refuse it unless it runs on CUDA (``--device gpu``).

    Raises:
        ModelLoadError: the version cannot be served; the message says why.
    """
    where = f"{source.name}/{source.version}"
    step = "checking its statistic names"
    try:
        # Names first: a version refused for its names costs no session.
        catalogue = Catalogue(source.config)
        step = "building its engine"
        engine = build(source)
        if require_cuda and engine.provider != "CUDAExecutionProvider":
            raise ModelLoadError(
                f"{where}: device=gpu but CUDA did not load (running on {engine.provider})"
            )
        step = "the load-time probe (copies of one row through the engine)"
        if not engine.is_stochastic():
            raise ModelLoadError(
                f"{where}: copies of one row gave identical outputs: the graph has no active "
                "dropout (was it exported with dropout in eval mode, or were its Dropout nodes "
                "optimised away?)"
            )
    except ModelLoadError:
        raise
    except Exception as exc:  # ONNX Runtime and onnx raise their own types; none may escape
        log.debug("%s: %s failed", where, step, exc_info=True)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise ModelLoadError(
            f"{where}: {step} failed: {type(exc).__name__}: {first_line} (do config.json's "
            "inputs and outputs match the graph?)"
        ) from exc
    return PreparedVersion(source, engine, catalogue, fingerprint)


def open_version(
    prepared: PreparedVersion, batcher: Batcher, default_max_batch_rows: int
) -> LoadedVersion:
    """Give a prepared version its batching policy and queue (on the event loop: the queue
    joins the batcher's).

    Args:
        prepared: the version, built.
        batcher: the shared batcher its queue joins.
        default_max_batch_rows: the batch cap when its config sets none (``--max-batch-rows``).
    """
    source = prepared.source
    policy = BatchPolicy.from_config(source.config.dynamic_batching, default_max_batch_rows)
    queue = batcher.version_queue(source.name, source.version, prepared.engine, policy)
    return LoadedVersion(
        source=source,
        engine=prepared.engine,
        catalogue=prepared.catalogue,
        queue=queue,
        fingerprint=prepared.fingerprint,
    )


#: The reason given for a model unloaded on request (until a load asks for it again).
UNLOADED_REASON = "unloaded on request"


class ModelRegistry:
    """The versions the data plane serves, by model name and version number, and the reasons
    of those it cannot serve.

    Lookups are for everyone; changes are for ``service.core.lifecycle`` only, on the event
    loop: each is a single assignment, so a request resolves either the old or the new copy.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, dict[int, LoadedVersion]] = {}
        self._failures: dict[str, dict[int, Failure]] = {}
        self._unloaded: set[str] = set()

    # -- lookups -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Models with at least one version serving, sorted."""
        return sorted(name for name, versions in self._loaded.items() if versions)

    def known(self) -> list[str]:
        """Every model the server knows: serving, failed to load, or unloaded on request."""
        return sorted(
            {name for name, v in self._loaded.items() if v}
            | {name for name, f in self._failures.items() if f}
            | self._unloaded
        )

    def has_model(self, name: str) -> bool:
        """Whether ``name`` is known (serving or not)."""
        return bool(self._loaded.get(name) or self._failures.get(name)) or name in self._unloaded

    def ready(self, name: str) -> bool:
        """Whether some version of ``name`` serves."""
        return bool(self._loaded.get(name))

    def versions(self, name: str) -> list[int]:
        """Loaded versions of ``name``, newest first."""
        return sorted(self._loaded.get(name, {}), reverse=True)

    def loaded(self, name: str, version: int) -> LoadedVersion | None:
        return self._loaded.get(name, {}).get(version)

    def failure(self, name: str, version: int) -> Failure | None:
        return self._failures.get(name, {}).get(version)

    def is_unloaded(self, name: str) -> bool:
        """Whether ``name`` was unloaded on request (and not loaded again since)."""
        return name in self._unloaded

    def tracked(self, name: str) -> set[int]:
        """Versions of ``name`` loaded or failed: those a scan compares with the disk."""
        return set(self._loaded.get(name, {})) | set(self._failures.get(name, {}))

    def reason(self, name: str) -> str:
        """Why ``name`` is not ready (the newest failed version's reason); empty when it is."""
        if self.ready(name):
            return ""
        if name in self._unloaded:
            return UNLOADED_REASON
        failures = self._failures.get(name)
        if failures:
            return failures[max(failures)].reason
        return ""

    def states(self, name: str) -> list[VersionState]:
        """Every version of ``name`` the registry holds, newest first: loaded ones READY
        (with the reason of a failed reload, if any), failed ones UNAVAILABLE; a model
        unloaded on request has one entry without a version."""
        loaded = self._loaded.get(name, {})
        failures = self._failures.get(name, {})
        states = [
            VersionState(
                name,
                version,
                State.READY if version in loaded else State.UNAVAILABLE,
                failures[version].reason if version in failures else "",
            )
            for version in sorted(set(loaded) | set(failures), reverse=True)
        ]
        if not states and name in self._unloaded:
            states.append(VersionState(name, None, State.UNAVAILABLE, UNLOADED_REASON))
        return states

    def get(self, name: str, version: str | None = None) -> LoadedVersion:
        """The requested version, or the newest loaded one when ``version`` is empty.

        Raises:
            ModelNotFound: no model of that name.
            VersionNotFound: the model has no such version.
            Unavailable: the model (or that version) is known but not loaded: it failed to
                load (the message gives the reason) or was unloaded.
            InvalidInput: ``version`` is not a number.
        """
        versions = self._loaded.get(name, {})
        if not version:
            if versions:
                return versions[max(versions)]
            if not self.has_model(name):
                raise ModelNotFound(name)
            raise Unavailable(f"model {name!r} is not ready: {self.reason(name)}")
        try:
            number = int(version)
        except ValueError:
            raise InvalidInput(
                f"version must be a positive integer, got {quote(version)}"
            ) from None
        if number in versions:
            return versions[number]
        failure = self.failure(name, number)
        if failure is not None:
            raise Unavailable(f"version {number} of model {name!r} is not ready: {failure.reason}")
        if not self.has_model(name):
            raise ModelNotFound(name)
        if not versions:
            raise Unavailable(f"model {name!r} is not ready: {self.reason(name)}")
        raise VersionNotFound(name, version, [str(v) for v in self.versions(name)])

    # -- changes (service.core.lifecycle, on the event loop) ---------------------------------

    def put(self, loaded: LoadedVersion) -> LoadedVersion | None:
        """Serve ``loaded`` from now on; returns the copy of the same version it replaces."""
        versions = self._loaded.setdefault(loaded.name, {})
        previous = versions.get(loaded.version)
        versions[loaded.version] = loaded
        self._unloaded.discard(loaded.name)
        return previous

    def pop(self, name: str, version: int) -> LoadedVersion | None:
        """Stop serving a version; returns it (None if it was not loaded)."""
        versions = self._loaded.get(name, {})
        removed = versions.pop(version, None)
        if not versions:
            self._loaded.pop(name, None)
        return removed

    def fail(self, name: str, version: int, failure: Failure) -> None:
        """Record that a version's files failed to load."""
        self._failures.setdefault(name, {})[version] = failure

    def clear_failure(self, name: str, version: int) -> None:
        failures = self._failures.get(name, {})
        failures.pop(version, None)
        if not failures:
            self._failures.pop(name, None)

    def mark_unloaded(self, name: str) -> None:
        """``name`` was unloaded on request: it stays known (not ready) and scans skip it."""
        self._unloaded.add(name)
        self._failures.pop(name, None)

    def clear_unloaded(self, name: str) -> None:
        self._unloaded.discard(name)
