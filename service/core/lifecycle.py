"""Model lifecycle: loading, reloading and unloading versions while the server serves.

Every change goes through one mechanism, whoever asks for it: the start-up load
(:meth:`Lifecycle.start`), the repository poller (``--repository-poll-s``) and the explicit
entry points of a control API (:meth:`Lifecycle.load`, :meth:`Lifecycle.unload`,
:meth:`Lifecycle.index`; Triton's RepositoryModelLoad / Unload / Index call them)::

    scan (loader thread) -> compare with the registry -> for each new or changed version:
    parse + build + probe (loader thread) -> swap (event loop: one assignment) -> retire the
    copy it replaced (drain: what was in flight on it finishes on it; then it is forgotten and
    its engine freed with the last reference)

Rules:
    * One operation at a time (a lock), its blocking work on one loader thread, never on the
      event loop nor on the compute workers that serve requests.
    * A version is loaded when its folder is new or its files changed (their
      :data:`~service.repository.Fingerprint`: name, size, mtime and inode of each file). The
      poller loads it only once its fingerprint was the same at two consecutive polls, so a
      folder being copied by hand is not loaded half-written (the exporter publishes by
      rename: its versions are complete when they appear). Start-up and explicit loads do
      not wait.
    * A version that fails to load is recorded with its reason and its fingerprint and is not
      tried again until its files change (or an explicit load asks); a previous copy of it
      keeps serving, and so do the model's other versions and every other model.
    * A version whose folder is gone (at two consecutive polls; at once for an explicit load)
      stops taking requests at once and is released after a drain.
    * A model unloaded on request is left alone by the poller until a load asks for it.
    * After each change the listeners run (the gRPC health of each model follows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from service import metrics
from service.core.batching import Batcher
from service.core.registry import (
    EngineFactory,
    Failure,
    LoadedVersion,
    ModelRegistry,
    PreparedVersion,
    State,
    VersionState,
    open_version,
    prepare_version,
)
from service.errors import ModelLoadError, ModelNotFound, Unavailable
from service.repository import Fingerprint, VersionFolder, find_versions, load_version
from service.settings import Settings

__all__ = ["Lifecycle", "Listener", "SyncResult"]

log = logging.getLogger(__name__)

#: Called after every change of what the server serves (on the event loop).
Listener = Callable[[], Awaitable[None]]
_T = TypeVar("_T")
_Key = tuple[str, int]


@dataclass
class SyncResult:
    """What one pass over (part of) the repository did.

    Attributes:
        found: models with at least one version folder on disk.
        loaded: versions loaded (new or changed).
        failed: versions that failed to load, with the reason.
        removed: versions unloaded because their folder is gone.
    """

    found: set[str] = field(default_factory=set)
    loaded: list[_Key] = field(default_factory=list)
    failed: dict[_Key, str] = field(default_factory=dict)
    removed: list[_Key] = field(default_factory=list)


class Lifecycle:
    """Loads, swaps and unloads the versions of the model repository; owns the changes of a
    :class:`ModelRegistry`.

    Args:
        settings: the server settings (repository, poll interval, device, batching defaults).
        batcher: the batcher the versions' queues join.
        registry: the registry it keeps (the data plane looks versions up in it).
        build: builds an engine (blocking); the server's by default, a fake one in tests.
    """

    def __init__(
        self,
        settings: Settings,
        batcher: Batcher,
        registry: ModelRegistry,
        build: EngineFactory,
    ) -> None:
        self._settings = settings
        self._root = settings.model_repository
        self._batcher = batcher
        self._registry = registry
        self._build = build
        self._lock = asyncio.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mcd-load")
        #: fingerprints seen at the last poll of versions waiting to be loaded
        self._seen: dict[_Key, Fingerprint] = {}
        #: tracked versions whose folder was missing at the last poll
        self._missing: set[_Key] = set()
        self._loading: set[_Key] = set()
        self._retiring: dict[asyncio.Task[None], LoadedVersion] = {}
        self._listeners: list[Listener] = []
        self._poller: asyncio.Task[None] | None = None
        self._ready_labels: set[str] = set()
        self._closed = False

    # -- public entry points -------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener`` after every change of what is served (health follows it)."""
        self._listeners.append(listener)

    async def start(self) -> SyncResult:
        """Load every version of the repository (without waiting for stable files), then poll
        every ``repository_poll_s`` seconds if set.

        Raises:
            ModelLoadError: the repository is not a folder.
        """
        result = await self._sync(None, wait_stable=False, force=False, strict=True)
        if self._settings.repository_poll_s > 0 and self._poller is None:
            self._poller = asyncio.create_task(self._poll_forever(self._settings.repository_poll_s))
        return result

    async def poll(self) -> SyncResult:
        """One poll: load new and changed versions whose files were stable since the previous
        poll, unload versions whose folder stayed gone; models unloaded on request are left
        alone."""
        return await self._sync(None, wait_stable=True, force=False, strict=False)

    async def load(self, name: str) -> list[VersionState]:
        """Load (or reload) one model now, as a control API's load does: versions new or
        changed on disk are loaded without waiting for stable files, versions that failed are
        tried again, versions whose folder is gone are unloaded; a model unloaded on request
        is served again.

        Returns:
            The model's versions and their states afterwards.

        Raises:
            ModelNotFound: the repository has no version folder for ``name``.
            Unavailable: a version failed to load (the message gives each reason; the model's
                other versions, and a previous copy of the failed one, still serve).
        """
        result = await self._sync({name}, wait_stable=False, force=True, strict=False)
        if name not in result.found:
            raise ModelNotFound(name)
        if result.failed:
            reasons = "; ".join(result.failed.values())
            raise Unavailable(f"model {name!r} failed to load: {reasons}")
        return self._registry.states(name)

    async def unload(self, name: str, *, wait: bool = False) -> None:
        """Unload every version of a model, as a control API's unload does: it stops taking
        requests at once (they get UNAVAILABLE), what is in flight finishes, then its engines
        are released. The poller leaves it alone until :meth:`load` asks for it again.

        Args:
            name: the model.
            wait: return only once every version drained and was released.

        Raises:
            ModelNotFound: the server does not know ``name``.
        """
        async with self._lock:
            if not self._registry.has_model(name):
                raise ModelNotFound(name)
            drains = [
                self._remove(name, version, "unloaded on request")
                for version in self._registry.versions(name)
            ]
            self._registry.mark_unloaded(name)
            self._forget_pending(name)
            log.info("unloaded %s on request", name)
        await self.notify()
        if wait:
            await asyncio.gather(*(d for d in drains if d is not None))

    def index(self) -> list[VersionState]:
        """Every model version the server knows or is busy with, by model then newest first:
        READY, LOADING (being loaded, or waiting for its files to be stable), UNAVAILABLE
        (failed, with the reason; unloaded on request) or UNLOADING (draining)."""
        states = {
            (s.model, s.version): s
            for name in self._registry.known()
            for s in self._registry.states(name)
        }
        for key in self._seen:
            if key not in states:
                states[key] = VersionState(*key, State.LOADING, "waiting for stable files")
        for key in self._loading:
            if key not in states:
                states[key] = VersionState(*key, State.LOADING)
        for old in self._retiring.values():
            key = (old.name, old.version)
            if key not in states:
                states[key] = VersionState(*key, State.UNLOADING, "draining")
        return sorted(states.values(), key=lambda s: (s.model, -(s.version or 0)))

    async def close(self) -> None:
        """Stop polling and loading (a load under way on the loader thread is abandoned) and
        stop waiting for drains (closing the batcher answers what still waits)."""
        self._closed = True
        tasks = [t for t in (self._poller, *self._retiring) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._retiring.clear()
        self._loader.shutdown(wait=False, cancel_futures=True)

    async def drained(self) -> None:
        """Wait until every version taken out of service was released (tests, control API)."""
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    # -- the mechanism -------------------------------------------------------------------------

    async def _poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll()
            except Exception:  # a poll must never end the poller
                log.exception("polling the model repository failed")

    async def _off_loop(self, call: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._loader, call)

    async def _sync(
        self, names: set[str] | None, *, wait_stable: bool, force: bool, strict: bool
    ) -> SyncResult:
        """Bring the registry in line with the disk for ``names`` (None: every model)."""
        result = SyncResult()
        async with self._lock:
            if self._closed:
                return result
            try:
                found = await self._off_loop(lambda: find_versions(self._root, names))
            except (ModelLoadError, OSError) as exc:
                if strict:
                    raise
                # An unreadable repository (a volume remounting) unloads nothing.
                log.warning("cannot scan the model repository, nothing changes: %s", exc)
                return result
            result.found = set(found)
            if names is None:
                scope = set(found) | set(self._registry.known())
            else:
                scope = set(names)
                for name in scope:
                    self._registry.clear_unloaded(name)
            for name in sorted(scope):
                if names is None and self._registry.is_unloaded(name):
                    continue
                await self._sync_model(name, found.get(name, {}), result, wait_stable, force)
            stale = {k for k in self._seen if k[0] in scope and k[1] not in found.get(k[0], {})}
            for key in stale:
                del self._seen[key]
        if result.loaded or result.failed or result.removed:
            await self.notify()
        return result

    async def _sync_model(
        self,
        name: str,
        on_disk: dict[int, VersionFolder],
        result: SyncResult,
        wait_stable: bool,
        force: bool,
    ) -> None:
        """New and changed versions first (newest first), then those gone: a model whose
        versions are replaced in one go always has one serving."""
        for version, folder in sorted(on_disk.items(), reverse=True):
            key = (name, version)
            self._missing.discard(key)
            loaded = self._registry.loaded(name, version)
            if loaded is not None and loaded.fingerprint == folder.fingerprint:
                self._registry.clear_failure(name, version)  # its files came back
                self._seen.pop(key, None)
                continue
            failure = self._registry.failure(name, version)
            if failure is not None and failure.fingerprint == folder.fingerprint and not force:
                self._seen.pop(key, None)
                continue
            if wait_stable and self._seen.get(key) != folder.fingerprint:
                self._seen[key] = folder.fingerprint  # load it if it is the same next poll
                continue
            self._seen.pop(key, None)
            reason = await self._load_version(folder)
            if reason is None:
                result.loaded.append(key)
            else:
                result.failed[key] = reason
        for version in sorted(self._registry.tracked(name) - set(on_disk)):
            key = (name, version)
            if wait_stable and key not in self._missing:
                self._missing.add(key)  # unload it if it is still gone next poll
                continue
            self._missing.discard(key)
            self._registry.clear_failure(name, version)
            result.removed.append(key)
            if self._remove(name, version, "its folder is gone") is None:
                log.info("forgot the failure of %s version %d: its folder is gone", name, version)

    def _prepare(self, folder: VersionFolder) -> PreparedVersion:
        """Parse, build and probe one version (on the loader thread).

        Raises:
            ModelLoadError: whatever went wrong, with the reason.
        """
        try:
            source = load_version(self._root / folder.name, folder.version)
        except OSError as exc:  # unreadable files (permissions, a folder named config.json)
            raise ModelLoadError(
                f"{folder.name}/{folder.version}: cannot read its files: {exc}"
            ) from None
        return prepare_version(
            source,
            folder.fingerprint,
            self._build,
            require_cuda=self._settings.device == "gpu",
        )

    async def _load_version(self, folder: VersionFolder) -> str | None:
        """Load one version and swap it in; returns None, or the reason it failed."""
        name, version = folder.name, folder.version
        key = (name, version)
        self._loading.add(key)
        started_s = time.perf_counter()
        try:
            prepared = await self._off_loop(lambda: self._prepare(folder))
        except ModelLoadError as exc:
            reason = str(exc)
            self._registry.fail(name, version, Failure(reason, folder.fingerprint))
            metrics.MODEL_LOADS.labels(model=name, outcome="failure").inc()
            serving = self._registry.loaded(name, version) is not None
            log.error(
                "not serving %s%s: %s",
                folder.path, " (its previous files serve on)" if serving else "", reason,
            )  # fmt: skip
            return reason
        finally:
            self._loading.discard(key)
        if self._closed:
            return "the server is shutting down"
        loaded = open_version(prepared, self._batcher, self._settings.max_batch_rows)
        previous = self._registry.put(loaded)  # the swap: new requests resolve this copy
        self._registry.clear_failure(name, version)
        metrics.MODEL_LOADS.labels(model=name, outcome="success").inc()
        metrics.MODEL_INFO.labels(model=name, version=str(version)).info(
            {
                "provider": loaded.engine.provider,
                "opset": str(loaded.source.provenance.opset),
                "task": loaded.config.task.value,
            }
        )
        config = loaded.config
        log.info(
            "%s %s version %d on %s in %.2f s (T default %d, max %d)",
            "reloaded" if previous is not None else "loaded", name, version,
            loaded.engine.provider, time.perf_counter() - started_s,
            config.default_num_samples, config.max_num_samples,
        )  # fmt: skip
        if previous is not None:
            self._retire(previous, "the previous copy of")
        return None

    def _remove(self, name: str, version: int, why: str) -> asyncio.Task[None] | None:
        """Take a version out of service now and retire it; returns its drain."""
        removed = self._registry.pop(name, version)
        if removed is None:
            return None
        log.info("unloading %s version %d: %s", name, version, why)
        with contextlib.suppress(KeyError):
            metrics.MODEL_INFO.remove(name, str(version))
        metrics.MODEL_UNLOADS.labels(model=name).inc()
        return self._retire(removed, "unloaded")

    def _forget_pending(self, name: str) -> None:
        for key in [k for k in self._seen if k[0] == name]:
            del self._seen[key]
        self._missing = {k for k in self._missing if k[0] != name}

    def _retire(self, old: LoadedVersion, what: str) -> asyncio.Task[None]:
        """Drain a version taken out of service in the background, then let it go."""
        task = asyncio.create_task(self._drain(old, what))
        self._retiring[task] = old
        task.add_done_callback(lambda t: self._retiring.pop(t, None))
        return task

    async def _drain(self, old: LoadedVersion, what: str) -> None:
        if old.queue.users:
            log.info(
                "draining %s %s version %d (%d in flight)",
                what, old.name, old.version, old.queue.users,
            )  # fmt: skip
        await self._batcher.retire(old.queue)
        log.info("released %s %s version %d", what, old.name, old.version)

    async def notify(self) -> None:
        """Bring the readiness metric up to date and run the listeners (after a change)."""
        known = set(self._registry.known())
        for name in self._ready_labels - known:
            with contextlib.suppress(KeyError):
                metrics.MODEL_READY.remove(name)
        for name in known:
            metrics.MODEL_READY.labels(model=name).set(1 if self._registry.ready(name) else 0)
        self._ready_labels = known
        for listener in self._listeners:
            try:
                await listener()
            except Exception:  # health must not break loading
                log.exception("a model lifecycle listener failed")
