"""The model lifecycle in process: one bad model never stops the others, readiness, and loads,
swaps and unloads while serving (the poller and the control entry points share one mechanism).

Engines are the fake engine of tests/support, one per load, chosen by the bytes of model.onnx
(``ok...``: an engine that serves; ``probe-raises``, ``flat``, ``build-raises``: the failures);
a request's rows carry a tag (their first value) and each engine records the rows it ran, so a
test sees which copy served what. The tests that say so load the hand-made ONNX graphs of
``tests.handmade`` in ONNX Runtime. Polls are stepped by hand (``lifecycle.poll()``) and runs
held at gates (threading.Event), so nothing depends on timing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import metrics
from service.core.dataplane import DataPlane, PredictInput, PredictResult
from service.core.registry import State, VersionState
from service.errors import ModelNotFound, Unavailable, VersionNotFound
from service.repository import VersionSource
from service.settings import Settings
from tests import handmade
from tests.support.fake_engine import CONFIG, FakeEngine
from tests.support.plane import wire


class ProbeRaises(FakeEngine):
    def is_stochastic(self, copies: int = 256) -> bool:
        raise RuntimeError("Non-zero status code returned while running MatMul node")


class Flat(FakeEngine):
    def is_stochastic(self, copies: int = 256) -> bool:
        return False


class Factory:
    """The engine factory of the plane: builds an engine from the bytes of model.onnx and
    records what it built (``engines``: content -> engines built from it, in order)."""

    def __init__(self) -> None:
        self.built: list[tuple[str, int, bytes]] = []
        self.engines: dict[bytes, list[FakeEngine]] = {}

    def __call__(self, source: VersionSource) -> FakeEngine:
        content = source.model_path.read_bytes()
        self.built.append((source.name, source.version, content))
        if content == b"build-raises":
            raise ValueError("protobuf parsing failed")
        kind = {b"probe-raises": ProbeRaises, b"flat": Flat}.get(content, FakeEngine)
        gate = threading.Event()
        gate.set()
        engine = kind(gate=gate)
        self.engines.setdefault(content, []).append(engine)
        return engine

    def engine(self, content: bytes) -> FakeEngine:
        """The one engine built from ``content``."""
        [engine] = self.engines[content]
        return engine


def gate(engine: FakeEngine) -> threading.Event:
    assert engine.gate is not None
    return engine.gate


def publish(root: Path, name: str, version: int, model: bytes) -> Path:
    return handmade.publish(root, name, version, model, dict(CONFIG, name=name))


def replace(folder: Path, model: bytes) -> None:
    handmade.replace_files(folder, model, dict(CONFIG, name=folder.parent.name))


async def ask(
    plane: DataPlane, model: str = "m", version: str | None = None, tag: float = 1.0
) -> PredictResult:
    """Predict two rows tagged ``tag`` (their first value; the fake engine answers it)."""
    x = np.array([[tag, 0, 0]] * 2, np.float32)
    return await plane.predict(PredictInput(model, version, [wire("x", x)], num_samples=4))


def ran(engine: FakeEngine, tag: float) -> bool:
    """Whether ``engine`` ran the rows of a request tagged ``tag``."""
    return any(tag in rows for rows in engine.run_rows())


def make(root: Path, factory: Factory, **settings: Any) -> DataPlane:
    """A plane over ``root``; two compute workers, so that a run held at a gate leaves one."""
    return DataPlane(Settings(model_repository=root, compute_workers=2, **settings), factory)


def sample(name: str, **labels: str) -> float:
    found = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if found is None else found


# -- one bad model never stops the others ------------------------------------------------------


def test_every_per_model_failure_leaves_that_model_not_ready_and_the_others_serving(
    tmp_path: Path,
) -> None:
    publish(tmp_path, "good", 1, b"ok")
    publish(tmp_path, "probe", 1, b"probe-raises")
    publish(tmp_path, "build", 1, b"build-raises")
    publish(tmp_path, "flat", 1, b"flat")
    bad_config = publish(tmp_path, "config", 1, b"ok")
    (bad_config / "config.json").write_text(json.dumps({"task": "ranking"}))
    plane = make(tmp_path, Factory())
    seen: list[dict[str, bool]] = []

    async def listener() -> None:
        seen.append(plane.model_health())

    plane.add_listener(listener)

    async def scenario() -> None:
        await plane.start()
        assert (await ask(plane, "good")).version == 1
        with pytest.raises(Unavailable, match=r"probe/1: the load-time probe .* failed: "
                           r"RuntimeError: Non-zero status code"):  # fmt: skip
            await ask(plane, "probe")
        assert plane.ready
        await plane.close()

    asyncio.run(scenario())
    assert plane.model_names() == ["good"]
    assert seen[-1] == {
        "good": True, "probe": False, "build": False, "flat": False, "config": False
    }  # fmt: skip
    reasons = {m.name: m.reason for m in plane.list_models() if not m.ready}
    assert "building its engine failed: ValueError: protobuf parsing failed" in reasons["build"]
    assert "copies of one row gave identical outputs" in reasons["flat"]
    assert "config.json" in reasons["config"]
    assert "load-time probe" in reasons["probe"]
    with pytest.raises(Unavailable, match="model 'flat' is not ready: flat/1: copies"):
        plane.metadata("flat")
    with pytest.raises(Unavailable, match="version 1 of model 'flat' is not ready"):
        plane.metadata("flat", "1")
    assert not plane.model_ready("probe")
    with pytest.raises(ModelNotFound):
        plane.metadata("nothing")
    assert plane.model_label("probe") == "probe"  # a known name: a bounded label


@pytest.mark.parametrize("allow_empty_start", [False, True])
def test_a_server_with_no_ready_model_is_not_ready_unless_allowed(
    tmp_path: Path, allow_empty_start: bool
) -> None:
    publish(tmp_path, "probe", 1, b"probe-raises")
    plane = make(tmp_path, Factory(), allow_empty_start=allow_empty_start)

    async def scenario() -> None:
        await plane.start()
        assert plane.ready is allow_empty_start
        await plane.close()

    asyncio.run(scenario())


def test_the_real_engine_probe_failure_of_a_mismatched_config_is_contained(
    tmp_path: Path,
) -> None:
    """The defect, with ONNX Runtime: config.json says 7 features, the graph's width is
    symbolic, so only the probe's run fails (inside ONNX Runtime)."""
    handmade.publish(tmp_path, "good", 1, handmade.graph(3.0), handmade.config("good"))
    handmade.publish(tmp_path, "bad", 1, handmade.graph(3.0, feature_dim="n"),
                     handmade.config("bad", features=7))  # fmt: skip
    plane = DataPlane(Settings(model_repository=tmp_path, device="cpu"))

    async def scenario() -> None:
        await plane.start()
        x = np.zeros((2, handmade.FEATURES), np.float32)
        result = await plane.predict(PredictInput("good", None, [wire("x", x)], num_samples=4))
        np.testing.assert_allclose(result.outputs[0].stats.mean, 3.0)
        assert plane.ready
        await plane.close()

    asyncio.run(scenario())
    [bad] = [m for m in plane.list_models() if m.name == "bad"]
    assert not bad.ready
    assert "bad/1: the load-time probe" in bad.reason


# -- loads, swaps and unloads while serving ----------------------------------------------------


def test_a_new_version_is_loaded_only_once_its_files_are_stable_for_one_poll(
    tmp_path: Path,
) -> None:
    publish(tmp_path, "m", 1, b"ok")
    factory = Factory()
    plane = make(tmp_path, factory)

    async def scenario() -> None:
        await plane.start()
        # A hand copy in progress: config.json written, model.onnx not yet complete.
        folder = tmp_path / "m" / "2"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(dict(CONFIG, name="m")))
        (folder / "model.onnx").write_bytes(b"ok-2")
        await plane.lifecycle.poll()
        assert VersionState("m", 2, State.LOADING, "waiting for stable files") in plane.index()
        with (folder / "model.onnx").open("ab") as file:
            file.write(b"-complete")
        await plane.lifecycle.poll()  # changed since the last poll: still waiting
        assert plane.metadata("m").versions == (1,)
        assert [b[:2] for b in factory.built] == [("m", 1)]
        await plane.lifecycle.poll()  # unchanged for one poll: loaded, and the newest
        assert (await ask(plane, tag=2.0)).version == 2
        assert ran(factory.engine(b"ok-2-complete"), 2.0)
        assert (await ask(plane, version="1")).version == 1
        await plane.close()

    asyncio.run(scenario())
    assert factory.built[-1] == ("m", 2, b"ok-2-complete")  # never the half-written file


def test_a_changed_version_is_swapped_in_while_its_old_copy_finishes_what_it_started(
    tmp_path: Path,
) -> None:
    folder = publish(tmp_path, "m", 1, b"ok-old")
    factory = Factory()
    plane = make(tmp_path, factory)
    before = sample("mcd_model_loads_total", model="m", outcome="success")

    async def scenario() -> weakref.ref[FakeEngine]:
        await plane.start()
        old = factory.engine(b"ok-old")
        gate(old).clear()
        in_flight = asyncio.ensure_future(ask(plane, tag=1.0))
        await old.wait_started()
        replace(folder, b"ok-new")
        await plane.lifecycle.poll()
        await plane.lifecycle.poll()
        new = factory.engine(b"ok-new")
        await ask(plane, tag=2.0)  # new requests: the new copy, at once
        assert ran(new, 2.0)
        assert not ran(old, 2.0)
        assert [s.state for s in plane.index()] == [State.READY]
        assert not in_flight.done()
        gate(old).set()
        await in_flight  # the request in flight finished on the old copy
        assert ran(old, 1.0)
        await plane.lifecycle.drained()
        assert old not in [q.engine for q in plane.batcher._versions]
        reference = weakref.ref(old)
        await plane.close()
        return reference

    reference = asyncio.run(scenario())
    factory.engines.clear()
    gc.collect()
    assert reference() is None
    assert sample("mcd_model_loads_total", model="m", outcome="success") - before == 2
    assert sample("mcd_model_info", model="m", version="1", provider="FakeExecutionProvider",
                  opset="0", task="regression") == 1  # fmt: skip


def test_a_broken_new_version_leaves_the_current_one_serving(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1, b"ok")
    factory = Factory()
    plane = make(tmp_path, factory)
    before = sample("mcd_model_loads_total", model="m", outcome="failure")

    async def scenario() -> None:
        await plane.start()
        folder = publish(tmp_path, "m", 2, b"probe-raises")
        await plane.lifecycle.poll()
        await plane.lifecycle.poll()
        assert (await ask(plane)).version == 1
        assert plane.model_ready("m")
        assert not plane.model_ready("m", "2")
        [two, one] = plane.metadata("m").states
        assert (two.version, two.state, one.state) == (2, State.UNAVAILABLE, State.READY)
        assert "m/2: the load-time probe" in two.reason
        with pytest.raises(Unavailable, match="version 2 of model 'm' is not ready: m/2: the"):
            await ask(plane, version="2")
        builds = len(factory.built)
        await plane.lifecycle.poll()  # the same broken files are not tried again
        assert len(factory.built) == builds
        replace(folder, b"ok-2")
        await plane.lifecycle.poll()
        await plane.lifecycle.poll()  # fixed: loaded, and it is the newest
        assert (await ask(plane)).version == 2
        assert [s.state for s in plane.metadata("m").states] == [State.READY, State.READY]
        await plane.close()

    asyncio.run(scenario())
    assert sample("mcd_model_loads_total", model="m", outcome="failure") - before == 1


def test_a_failed_reload_keeps_the_previous_files_serving(tmp_path: Path) -> None:
    folder = publish(tmp_path, "m", 1, b"ok")
    factory = Factory()
    plane = make(tmp_path, factory)

    async def scenario() -> None:
        await plane.start()
        replace(folder, b"build-raises")
        await plane.lifecycle.poll()
        await plane.lifecycle.poll()
        await ask(plane, tag=3.0)
        assert ran(factory.engine(b"ok"), 3.0)
        [state] = plane.index()
        assert state.state is State.READY
        assert "m/1: building its engine failed" in state.reason
        [summary] = plane.list_models()
        assert summary.ready
        assert summary.reason == ""
        await plane.close()

    asyncio.run(scenario())


def test_removing_a_model_folder_unloads_it_after_a_drain(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1, b"ok-m")
    publish(tmp_path, "other", 1, b"ok-other")
    factory = Factory()
    plane = make(tmp_path, factory)
    health: list[dict[str, bool]] = []

    async def listener() -> None:
        health.append(plane.model_health())

    plane.add_listener(listener)

    async def scenario() -> weakref.ref[FakeEngine]:
        await plane.start()
        engine = factory.engine(b"ok-m")
        gate(engine).clear()
        in_flight = asyncio.ensure_future(ask(plane))
        await engine.wait_started()
        shutil.rmtree(tmp_path / "m")
        await plane.lifecycle.poll()  # gone once: maybe a folder being replaced, kept
        assert plane.model_ready("m")
        await plane.lifecycle.poll()  # gone twice: unloaded
        assert not plane.model_ready("m")
        with pytest.raises(ModelNotFound):
            await ask(plane)
        assert plane.index() == [
            VersionState("m", 1, State.UNLOADING, "draining"),
            VersionState("other", 1, State.READY),
        ]
        assert metrics.REGISTRY.get_sample_value("mcd_model_ready", {"model": "m"}) is None
        assert health[-1] == {"other": True}
        for _ in range(5):
            await asyncio.sleep(0)
        assert plane.lifecycle._retiring  # the drain waits for the request in flight
        gate(engine).set()
        assert (await in_flight).version == 1
        await plane.lifecycle.drained()
        assert [s.model for s in plane.index()] == ["other"]
        reference = weakref.ref(engine)
        await plane.close()
        return reference

    reference = asyncio.run(scenario())
    factory.engines.clear()
    gc.collect()
    assert reference() is None
    assert sample("mcd_model_info", model="m", version="1", provider="FakeExecutionProvider",
                  opset="0", task="regression") == 0  # fmt: skip


def test_retiring_a_version_waits_for_calls_holding_it(tmp_path: Path) -> None:
    """A call holds its version across awaits (adaptive sampling submits several rounds), so
    the version is not released between them."""
    publish(tmp_path, "m", 1, b"ok")
    plane = make(tmp_path, Factory())

    async def scenario() -> None:
        await plane.start()
        queue = plane.registry.get("m").queue
        with queue.hold():
            retired = asyncio.ensure_future(plane.batcher.retire(queue))
            for _ in range(5):
                await asyncio.sleep(0)
            assert not retired.done()
            assert queue in plane.batcher._versions
        await retired
        assert queue not in plane.batcher._versions
        await plane.close()

    asyncio.run(scenario())


def test_a_version_folder_replaced_by_renames_is_never_unloaded(tmp_path: Path) -> None:
    """``mv 1 old && mv new 1`` between two polls: version 1 serves throughout."""
    folder = publish(tmp_path, "m", 1, b"ok-old")
    factory = Factory()
    plane = make(tmp_path, factory)

    async def scenario() -> None:
        await plane.start()
        folder.rename(tmp_path / "m" / ".old")
        await plane.lifecycle.poll()
        publish(tmp_path, "m", 1, b"ok-new")
        await plane.lifecycle.poll()
        await ask(plane, tag=1.0)
        assert ran(factory.engine(b"ok-old"), 1.0)
        await plane.lifecycle.poll()
        await ask(plane, tag=2.0)
        assert ran(factory.engine(b"ok-new"), 2.0)
        await plane.close()

    asyncio.run(scenario())


def test_an_unreadable_repository_unloads_nothing(tmp_path: Path) -> None:
    root = tmp_path / "repository"
    publish(root, "m", 1, b"ok")
    plane = make(root, Factory())

    async def scenario() -> None:
        await plane.start()
        root.rename(tmp_path / "elsewhere")
        for _ in range(3):
            await plane.lifecycle.poll()
        assert (await ask(plane)).version == 1
        await plane.close()

    asyncio.run(scenario())


# -- the control entry points (Triton's RepositoryIndex / ModelLoad / ModelUnload) -------------


def test_explicit_load_unload_and_index(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1, b"ok-1")
    factory = Factory()
    plane = make(tmp_path, factory)

    async def scenario() -> None:
        await plane.start()
        publish(tmp_path, "m", 2, b"ok-2")
        states = await plane.load("m")  # no waiting for stable files
        assert [(s.version, s.state) for s in states] == [(2, State.READY), (1, State.READY)]
        assert (await ask(plane)).version == 2

        await plane.unload("m", wait=True)
        assert plane.index() == [VersionState("m", None, State.UNAVAILABLE, "unloaded on request")]
        with pytest.raises(Unavailable, match="model 'm' is not ready: unloaded on request"):
            await ask(plane)
        assert plane.model_health() == {"m": False}
        assert not plane.ready
        await plane.lifecycle.poll()
        await plane.lifecycle.poll()  # the poller leaves an unloaded model alone
        assert not plane.model_ready("m")

        await plane.load("m")
        assert (await ask(plane)).version == 2
        assert plane.ready

        publish(tmp_path, "broken", 1, b"probe-raises")
        with pytest.raises(Unavailable, match="model 'broken' failed to load: broken/1: the"):
            await plane.load("broken")
        builds = len(factory.built)
        with pytest.raises(Unavailable):
            await plane.load("broken")  # an explicit load tries the same files again
        assert len(factory.built) == builds + 1
        with pytest.raises(ModelNotFound):
            await plane.load("nothing")
        with pytest.raises(ModelNotFound):
            await plane.unload("nothing")

        shutil.rmtree(tmp_path / "m" / "1")
        await plane.load("m")  # a version gone from disk is unloaded at once
        assert plane.metadata("m").versions == (2,)
        with pytest.raises(VersionNotFound):
            await ask(plane, version="1")
        await plane.close()

    asyncio.run(scenario())


def test_polling_runs_in_the_background_when_set(tmp_path: Path) -> None:
    publish(tmp_path, "m", 1, b"ok")
    plane = make(tmp_path, Factory(), repository_poll_s=0.01)

    async def scenario() -> None:
        changed = asyncio.Event()

        async def listener() -> None:
            if plane.model_names() == ["m", "n"]:
                changed.set()

        plane.add_listener(listener)
        await plane.start()
        publish(tmp_path, "n", 1, b"ok")
        await asyncio.wait_for(changed.wait(), 30)
        assert (await ask(plane, "n")).version == 1
        await plane.close()

    asyncio.run(scenario())


# -- the one real engine ----------------------------------------------------------------------


def test_a_swapped_out_onnx_runtime_engine_is_freed(tmp_path: Path) -> None:
    folder = handmade.publish(tmp_path, "m", 1, handmade.graph(1.0), handmade.config("m"))
    plane = DataPlane(Settings(model_repository=tmp_path, device="cpu"))
    x = np.zeros((2, handmade.FEATURES), np.float32)

    async def mean() -> float:
        result = await plane.predict(PredictInput("m", None, [wire("x", x)], num_samples=4))
        return float(result.outputs[0].stats.mean[0, 0])

    async def scenario() -> weakref.ref[Any]:
        await plane.start()
        reference = weakref.ref(plane.registry.get("m").engine)
        assert await mean() == pytest.approx(1.0)
        handmade.replace_files(folder, handmade.graph(2.0), handmade.config("m"))
        await plane.load("m")
        assert await mean() == pytest.approx(2.0)
        await plane.lifecycle.drained()
        await plane.close()
        return reference

    reference = asyncio.run(scenario())
    gc.collect()
    assert reference() is None
