"""Triton's extensions on gRPC in process (ModelConfig, ModelStatistics, RepositoryIndex, Load /
Unload), the request parameters both forms share, the statistics store, reflection v1, and the
process and GPU metrics."""

from __future__ import annotations

import asyncio
import os
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from google.protobuf import descriptor_pool

from service import metrics
from service.core.dataplane import DataPlane, PredictInput
from service.errors import DeadlineExceeded, InvalidInput, ModelNotFound
from service.gen.inference import grpc_service_pb2 as oip
from service.gen.inference import model_config_pb2 as mc
from service.protocol.oip_servicer import OpenInferenceServicer
from service.protocol.parameters import RequestOptions, request_options
from service.protocol.reflection import V1_SERVICE_NAME, register_v1_descriptor
from tests.support.fake_engine import SAFETY_TIMEOUT_S, FakeEngine, make_core
from tests.support.plane import wire


def call(plane: DataPlane, method: str, request: Any) -> Any:
    servicer = OpenInferenceServicer(plane)
    return getattr(servicer, method)(request, None)


def predict(plane: DataPlane, rows: int, version: str | None = None) -> Any:
    x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    return plane.predict(PredictInput(model="m", version=version, inputs=[wire("x", x)]))


# -- ModelConfig ------------------------------------------------------------------------------


def test_model_config_in_tritons_terms() -> None:
    async def scenario() -> None:
        plane = make_core(FakeEngine(), {"max_batch_rows": 6, "max_queue_delay_us": 2000},
                          max_batch_rows=32, compute_workers=3)  # fmt: skip
        response = await call(plane, "ModelConfig", oip.ModelConfigRequest(name="m", version="1"))
        config = response.config
        assert (config.name, config.platform, config.max_batch_size) == (
            "m", "onnxruntime_mcdropout", 32,
        )  # fmt: skip
        assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
        assert list(config.dynamic_batching.preferred_batch_size) == [6]
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        [x] = config.input
        assert (x.name, x.data_type, list(x.dims)) == ("x", mc.TYPE_FP32, [3])
        outputs = [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in config.output]
        assert outputs == [
            ("y", "TYPE_FP32", [1]), ("y_mean", "TYPE_FP64", [1]),
            ("y_variance", "TYPE_FP64", [1]), ("y_std", "TYPE_FP64", [1]),
        ]  # fmt: skip
        [group] = config.instance_group
        assert (group.kind, group.count) == (mc.ModelInstanceGroup.KIND_CPU, 3)
        assert config.parameters["mc_default_num_samples"].string_value == "10"
        assert config.parameters["version"].string_value == "1"
        unbatched = make_core(FakeEngine(), {"enabled": False})
        response = await call(unbatched, "ModelConfig", oip.ModelConfigRequest(name="m"))
        assert response.config.WhichOneof("scheduling_choice") is None
        with pytest.raises(ModelNotFound):
            await call(plane, "ModelConfig", oip.ModelConfigRequest(name="nope"))
        await plane.close()
        await unbatched.close()

    asyncio.run(scenario())


# -- statistics -------------------------------------------------------------------------------


def test_statistics_count_requests_rows_runs_and_batch_sizes() -> None:
    """A run of 5 rows, then two requests (2 and 3 rows) merged into one run: 3 successes, 10
    rows, 2 executions of batch size 5; a failed request counts as a failure of its version; a
    reload keeps counting."""
    gate = threading.Event()
    engine = FakeEngine(gate=gate)

    async def scenario() -> None:
        plane = make_core(engine, {"max_batch_rows": 5, "max_queue_delay_us": 10_000_000},
                          compute_workers=1)  # fmt: skip
        first = asyncio.create_task(predict(plane, 5))  # a full run: cut at once
        await engine.wait_started()  # the worker is busy: the next two wait together
        merged = [asyncio.create_task(predict(plane, rows)) for rows in (2, 3)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, *merged), SAFETY_TIMEOUT_S)
        with pytest.raises(InvalidInput):
            await plane.predict(PredictInput(model="m", version=None, inputs=[]))
        [stats] = plane.statistics("m", "2")
        assert (stats.inference_count, stats.execution_count) == (10, 2)
        assert (stats.success.count, stats.fail.count) == (3, 1)
        assert stats.queue.count == stats.compute_infer.count == stats.compute_output.count == 3
        assert sorted(stats.batches) == [5]
        assert stats.batches[5].compute_infer.count == stats.batches[5].compute_output.count == 2
        assert stats.success.ns > 0
        assert stats.compute_infer.ns > 0
        assert stats.last_inference_ms > 0
        response = await call(plane, "ModelStatistics", oip.ModelStatisticsRequest(name="m"))
        assert [(s.name, s.version) for s in response.model_stats] == [("m", "1"), ("m", "2")]
        v2 = response.model_stats[1]
        assert (v2.inference_count, v2.execution_count) == (10, 2)
        assert v2.inference_stats.success.count == 3
        assert [(b.batch_size, b.compute_infer.count) for b in v2.batch_stats] == [(5, 2)]
        # The same version, reloaded, counts on (the store outlives a copy of a version).
        serving = plane.registry.get("m", "2").queue
        again = plane.batcher.version_queue("m", 2, engine, serving.policy)
        assert again.statistics is serving.statistics
        await plane.close()

    asyncio.run(scenario())


def test_statistics_of_every_model_and_errors() -> None:
    async def scenario() -> None:
        plane = make_core(FakeEngine())
        assert [(s.model, s.version) for s in plane.statistics()] == [("m", 1), ("m", 2)]
        with pytest.raises(ModelNotFound):
            plane.statistics("nope")
        with pytest.raises(InvalidInput, match="a version needs a model name"):
            plane.statistics("", "1")
        await plane.close()

    asyncio.run(scenario())


# -- repository --------------------------------------------------------------------------------


def test_repository_index_and_unload_over_grpc() -> None:
    async def scenario() -> None:
        plane = make_core(FakeEngine())
        index = await call(plane, "RepositoryIndex", oip.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [
            ("m", "2", "READY"), ("m", "1", "READY"),
        ]  # fmt: skip
        unload = oip.RepositoryModelUnloadRequest(model_name="m")
        unload.parameters["unload_dependents"].bool_param = True
        await call(plane, "RepositoryModelUnload", unload)
        index = await call(plane, "RepositoryIndex", oip.RepositoryIndexRequest())
        assert [(m.name, m.version, m.state, m.reason) for m in index.models] == [
            ("m", "", "UNAVAILABLE", "unloaded on request"),
        ]  # fmt: skip
        ready = await call(plane, "RepositoryIndex", oip.RepositoryIndexRequest(ready=True))
        assert list(ready.models) == []
        load = oip.RepositoryModelLoadRequest(model_name="m")
        load.parameters["config"].string_param = "{}"
        with pytest.raises(InvalidInput, match="overriding a model's config"):
            await call(plane, "RepositoryModelLoad", load)
        bad = oip.RepositoryModelUnloadRequest(model_name="m")
        bad.parameters["unload_dependents"].string_param = "yes"
        with pytest.raises(InvalidInput, match="unload_dependents"):
            await call(plane, "RepositoryModelUnload", bad)
        await plane.close()

    asyncio.run(scenario())


# -- request parameters (both forms) ------------------------------------------------------------


def test_request_options_read_every_mc_parameter_and_triton_timeout() -> None:
    assert request_options({}) == RequestOptions()
    options = request_options({
        "mc_samples": 40, "mc_return_samples": True, "mc_interval_levels": "0.9,0.5",
        "mc_seed": 7, "timeout": 2_500_000, "other": "ignored", "sequence_id": 0,
        "priority": 0, "binary_data_output": True,
    })  # fmt: skip
    assert options == RequestOptions(40, True, (0.9, 0.5), None, 7, 2.5)
    assert request_options({"mc_interval_levels": [0.8, 0.95]}).interval_levels == (0.8, 0.95)
    assert request_options({"mc_target_standard_error": 1}).target_standard_error == 1.0
    assert request_options({"mc_samples": 0, "timeout": 0}) == RequestOptions()


@pytest.mark.parametrize(
    ("parameters", "fragment"),
    [
        ({"mc_samples": 1.5}, "'mc_samples' must be an integer, got a number (1.5)"),
        ({"mc_samples": True}, "'mc_samples' must be an integer, got a boolean"),
        ({"mc_samples": None}, "'mc_samples' must be an integer, got null"),
        ({"mc_samples": -2}, "must be >= 0"),
        ({"mc_return_samples": 1}, "'mc_return_samples' must be a boolean, got an integer"),
        ({"mc_interval_levels": "0.9,x"}, "must be comma-separated numbers"),
        ({"mc_interval_levels": 0.9}, "must be comma-separated numbers"),
        ({"mc_target_standard_error": "0.1"}, "must be a number, got a string"),
        ({"mc_seed": 2**64}, "must be in 0..2^64-1"),
        ({"mc_sample": 3}, "unknown parameter 'mc_sample' (the mc_ parameters are mc_samples,"),
        ({"sequence_id": 9}, "sequences are not supported"),
        ({"sequence_start": True}, "sequences are not supported"),
        ({"priority": 2}, "request priorities are not supported"),
        ({"timeout": -1}, "'timeout' must be >= 0 microseconds"),
    ],
)
def test_request_options_refuse_what_they_cannot_honour(
    parameters: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        request_options(parameters)
    assert fragment in info.value.message


def test_triton_timeout_ends_a_grpc_request_deadline_exceeded() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)

    async def scenario() -> None:
        plane = make_core(engine)
        request = oip.ModelInferRequest(model_name="m")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
        request.raw_input_contents.append(np.zeros((1, 3), "<f4").tobytes())
        request.parameters["timeout"].int64_param = 50_000  # 50 ms, while the engine is held
        context = SimpleNamespace(time_remaining=lambda: None)
        servicer = OpenInferenceServicer(plane)
        with pytest.raises(DeadlineExceeded):
            await servicer.ModelInfer(request, context)
        gate.set()
        await plane.close()

    asyncio.run(scenario())


# -- reflection v1 ----------------------------------------------------------------------------


def test_reflection_v1_descriptor_is_v1alpha_renamed() -> None:
    register_v1_descriptor()
    register_v1_descriptor()  # idempotent
    pool = descriptor_pool.Default()
    service = pool.FindServiceByName(V1_SERVICE_NAME)
    method = service.FindMethodByName("ServerReflectionInfo")
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    response = pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    assert response.fields_by_name["list_services_response"].message_type.full_name == (
        "grpc.reflection.v1.ListServiceResponse"
    )


# -- metrics ----------------------------------------------------------------------------------


def test_process_metrics_are_exported() -> None:
    text = metrics.exposition().decode()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds", "python_info"):  # fmt: skip
        assert f"\n{name}" in text, name


class FakeNvml:
    """NVML as nvidia-ml-py exposes it, for one device."""

    def __init__(self, fail_init: bool = False) -> None:
        self.fail_init = fail_init

    def nvmlInit(self) -> None:  # noqa: N802 (NVML's names)
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        return f"gpu{index}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:  # noqa: N802
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list[Any]:  # noqa: N802
        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=2**30),
                SimpleNamespace(pid=-1, usedGpuMemory=2 * 2**30)]  # fmt: skip


def test_gpu_memory_collector_reads_nvml_at_each_scrape() -> None:
    samples = {
        family.name: [(s.labels, s.value) for s in family.samples]
        for family in metrics.GpuMemoryCollector(1, nvml=FakeNvml()).collect()
    }
    assert samples == {
        "mcd_gpu_memory_used_bytes": [({"device": "1"}, 3.0 * 2**30)],
        "mcd_gpu_memory_total_bytes": [({"device": "1"}, 80.0 * 2**30)],
        "mcd_gpu_process_memory_used_bytes": [({"device": "1"}, 1.0 * 2**30)],
    }
    assert list(metrics.GpuMemoryCollector(0, nvml=FakeNvml(fail_init=True)).collect()) == []


def test_the_app_watches_the_gpu_once_a_model_runs_on_cuda(tmp_path: Any) -> None:
    from service.app import App
    from service.core.catalogue import Catalogue
    from service.core.registry import PreparedVersion, open_version
    from service.settings import Settings
    from tests.support.fake_engine import CONFIG
    from tests.support.plane import source

    class CudaEngine(FakeEngine):
        provider = "CUDAExecutionProvider"

    async def scenario() -> None:
        app = App(Settings(model_repository=tmp_path, device="cpu"))
        await app._watch_gpu()  # nothing serves: nothing to watch
        assert metrics._gpu_collector is None
        version = source(CONFIG)
        prepared = PreparedVersion(version, CudaEngine(), Catalogue(version.config), ())
        app.plane.registry.put(open_version(prepared, app.plane.batcher, 8))
        await app._watch_gpu()
        assert isinstance(metrics._gpu_collector, metrics.GpuMemoryCollector)
        await app.plane.close()

    try:
        asyncio.run(scenario())
    finally:
        if metrics._gpu_collector is not None:
            metrics.REGISTRY.unregister(metrics._gpu_collector)
            metrics._gpu_collector = None
