"""The KServe v2 HTTP layer in process (aiohttp's test server on 127.0.0.1, the fake engine of the
core tests): every route, JSON and binary tensor data, the parameters, the error mapping, the
authentication hook, the metrics and the statistics it feeds."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from service import metrics
from service.core.dataplane import DataPlane
from service.errors import Unauthenticated
from service.protocol.http import HEADER_LENGTH, build_app
from service.settings import Settings
from tests.support.fake_engine import SAFETY_TIMEOUT_S, FakeEngine, make_core

X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
Scenario = Callable[[TestClient[Any, Any], DataPlane], Awaitable[None]]


def run(
    scenario: Scenario,
    engine: FakeEngine | None = None,
    authenticate: Callable[[str | None], None] | None = None,
    **settings: Any,
) -> None:
    async def main() -> None:
        plane = make_core(engine or FakeEngine(), **settings)
        app = build_app(plane, Settings(**settings), authenticate)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await scenario(client, plane)
        await plane.close()

    asyncio.run(main())


def infer_body(**extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X}], **extra}


async def json_of(response: ClientResponse) -> Any:
    return json.loads(await response.read())


def test_health_metadata_and_readiness() -> None:
    async def scenario(client: TestClient[Any, Any], plane: DataPlane) -> None:
        assert await json_of(await client.get("/v2/health/live")) == {"live": True}
        ready = await client.get("/v2/health/ready")
        assert (ready.status, await json_of(ready)) == (200, {"ready": True})
        server = await json_of(await client.get("/v2"))
        assert server["name"] == "mcdropout"
        assert "binary_tensor_data" in server["extensions"]
        model = await json_of(await client.get("/v2/models/m"))
        assert (model["name"], model["versions"]) == ("m", ["2", "1"])
        assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        assert [o["name"] for o in model["outputs"]] == ["y", "y_mean", "y_variance", "y_std"]
        assert model["outputs"][0] == {"name": "y", "datatype": "FP32", "shape": [-1, 1]}
        v1 = await client.get("/v2/models/m/versions/1/ready")
        assert (v1.status, await json_of(v1)) == (200, {"name": "m", "ready": True})
        v9 = await client.get("/v2/models/m/versions/9/ready")
        assert (v9.status, (await json_of(v9))["ready"]) == (503, False)
        unknown = await client.get("/v2/models/nope/ready")
        assert unknown.status == 404
        plane.set_not_ready()
        not_ready = await client.get("/v2/health/ready")
        assert (not_ready.status, await json_of(not_ready)) == (503, {"ready": False})

    run(scenario)


def test_infer_with_json_data_flat_or_nested() -> None:
    async def scenario(client: TestClient[Any, Any], plane: DataPlane) -> None:
        nested = await client.post("/v2/models/m/infer", json=infer_body(id="r1"))
        assert nested.status == 200
        assert nested.headers["Content-Type"].startswith("application/json")
        answer = await json_of(nested)
        assert (answer["model_name"], answer["model_version"], answer["id"]) == ("m", "2", "r1")
        assert answer["parameters"] == {"mc_samples": 10}
        outputs = {o["name"]: o for o in answer["outputs"]}
        assert list(outputs) == ["y", "y_mean", "y_variance", "y_std"]
        # The fake engine answers each row's first value as its mean.
        assert outputs["y_mean"] == {"name": "y_mean", "datatype": "FP64", "shape": [2, 1],
                                     "data": [1.0, 4.0]}  # fmt: skip
        assert outputs["y"]["datatype"] == "FP32"
        flat = infer_body(parameters={"mc_samples": 7})
        flat["inputs"][0]["data"] = [v for row in X for v in row]
        flat["outputs"] = [{"name": "y_std"}, {"name": "y"}]
        answer = await json_of(await client.post("/v2/models/m/versions/1/infer", json=flat))
        assert [o["name"] for o in answer["outputs"]] == ["y_std", "y"]
        assert (answer["model_version"], answer["parameters"]["mc_samples"]) == ("1", 7)

    run(scenario)


def test_infer_with_binary_tensor_data() -> None:
    """tritonclient.http's default: binary inputs after the JSON, binary outputs asked for."""

    async def scenario(client: TestClient[Any, Any], plane: DataPlane) -> None:
        x = np.array(X, np.float32)
        header = json.dumps({
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                        "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "y_mean", "parameters": {"binary_data": True}},
                        {"name": "y_std", "parameters": {"binary_data": False}}],
        }).encode()  # fmt: skip
        response = await client.post(
            "/v2/models/m/infer",
            data=header + x.tobytes(),
            headers={HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
        )
        assert response.status == 200, await response.text()
        body = await response.read()
        length = int(response.headers[HEADER_LENGTH])
        answer = json.loads(body[:length])
        mean, std = answer["outputs"]
        assert mean["parameters"] == {"binary_data_size": 16}
        assert np.frombuffer(body[length:], "<f8").tolist() == [1.0, 4.0]
        assert std["data"] == [0.0, 0.0]
        # binary_data_output: every output binary unless it says otherwise.
        every = await client.post(
            "/v2/models/m/infer", json=infer_body(parameters={"binary_data_output": True})
        )
        length = int(every.headers[HEADER_LENGTH])
        blobs = (await every.read())[length:]
        answer = json.loads((await every.read())[:length])
        sizes = [o["parameters"]["binary_data_size"] for o in answer["outputs"]]
        assert sizes == [8, 16, 16, 16]  # y is FP32: 2 rows x 4 bytes
        assert np.frombuffer(blobs[:8], "<f4").tolist() == [1.0, 4.0]

    run(scenario)


def test_gzip_body() -> None:
    async def scenario(client: TestClient[Any, Any], plane: DataPlane) -> None:
        body = gzip.compress(json.dumps(infer_body()).encode())
        response = await client.post(
            "/v2/models/m/infer", data=body, headers={"Content-Encoding": "gzip"}
        )
        assert response.status == 200, await response.text()

    run(scenario)


def _binary_with(extra: bytes, size: int = 24) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3],
                                     "parameters": {"binary_data_size": size}}]}).encode()  # fmt: skip
    return header + np.ones(6, np.float32).tobytes() + extra, {HEADER_LENGTH: str(len(header))}


# fmt: off
ERRORS: list[tuple[str, Callable[[], tuple[Any, dict[str, str]]], int, str]] = [
    ("not json", lambda: (b"{nope", {}), 400, "not valid JSON"),
    ("not an object", lambda: (b"[1]", {}), 400, "must be a JSON object"),
    ("no inputs", lambda: (b"{}", {}), 400, "needs 'inputs'"),
    (
        "wrong shape",
        lambda: (json.dumps(infer_body()).replace("[2, 3]", "[2, 4]").encode(), {}),
        400,
        "6 values in data for shape [2, 4] (expected 8)",
    ),
    (
        "unknown datatype",
        lambda: (json.dumps(infer_body()).replace("FP32", "FP8").encode(), {}),
        400,
        "unsupported datatype 'FP8'",
    ),
    (
        "ragged data",
        lambda: (
            json.dumps(
                {
                    "inputs": [
                        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [[1, 2, 3], 4]}
                    ]
                }
            ).encode(),
            {},
        ),
        400,
        "mixes arrays and values",
    ),
    (
        "header past the body",
        lambda: (_binary_with(b"")[0], {HEADER_LENGTH: "1000"}),
        400,
        "is outside the body",
    ),
    (
        "binary overrun",
        lambda: _binary_with(b"", size=48),
        400,
        "binary_data_size 48 overruns the binary data (24 bytes left",
    ),
    ("binary left over", lambda: _binary_with(b"\x00\x00"), 400, "2 bytes of binary data"),
    ("bad header length", lambda: (b"{}", {HEADER_LENGTH: "x"}), 400, "must be an integer"),
    (
        "unknown mc_ parameter",
        lambda: (json.dumps(infer_body(parameters={"mc_sample": 3})).encode(), {}),
        400,
        "unknown parameter 'mc_sample'",
    ),
    (
        "sequence",
        lambda: (json.dumps(infer_body(parameters={"sequence_id": 3})).encode(), {}),
        400,
        "sequences are not supported",
    ),
    (
        "priority",
        lambda: (json.dumps(infer_body(parameters={"priority": 1})).encode(), {}),
        400,
        "priorities are not supported",
    ),
    (
        "float mc_samples",
        lambda: (json.dumps(infer_body(parameters={"mc_samples": 1.5})).encode(), {}),
        400,
        "'mc_samples' must be an integer, got a number (1.5)",
    ),
    (
        "shared memory",
        lambda: (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "datatype": "FP32",
                            "shape": [2, 3],
                            "parameters": {"shared_memory_region": "r"},
                        }
                    ]
                }
            ).encode(),
            {},
        ),
        400,
        "shared memory",
    ),
    (
        "too many rows",
        lambda: (
            json.dumps(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 3], "data": [0.0] * 15}]}
            ).encode(),
            {},
        ),
        429,
        "5 rows is more than",
    ),
    ("too large", lambda: (b" " * 5000, {}), 413, "larger than the limit of 4096 bytes"),
    (
        "gzip bomb",
        lambda: (gzip.compress(b" " * 100_000), {"Content-Encoding": "gzip"}),
        413,
        "larger than the limit",
    ),
]
# fmt: on


@pytest.mark.parametrize(("case", "body", "status", "fragment"), ERRORS, ids=[e[0] for e in ERRORS])
def test_infer_errors_answer_the_protocols_error_object(
    case: str, body: Callable[[], tuple[Any, dict[str, str]]], status: int, fragment: str
) -> None:
    async def scenario(client: TestClient[Any, Any], plane: DataPlane) -> None:
        data, headers = body()
        response = await client.post("/v2/models/m/infer", data=data, headers=headers)
        answer = await json_of(response)
        assert (response.status, list(answer)) == (status, ["error"]), answer
        assert fragment in answer["error"]

    run(scenario, max_batch_rows=4, max_message_bytes=4096)


@pytest.mark.parametrize(
    ("method", "path", "status", "fragment"),
    [
        ("POST", "/v2/models/nope/infer", 404, "model 'nope' not found"),
        ("GET", "/v2/models/nope", 404, "model 'nope' not found"),
        ("GET", "/v2/models/m/versions/9", 404, "version '9' of model 'm' not found"),
        ("GET", "/v2/models/m/versions/x/config", 400, "version must be a positive integer"),
        ("GET", "/v2/models/nope/stats", 404, "model 'nope' not found"),
        ("GET", "/v3/anything", 404, "no route /v3/anything"),
        ("PUT", "/v2/models/m/infer", 405, "PUT is not allowed"),
        ("POST", "/v2/repository/models/nope/unload", 404, "model 'nope' not found"),
    ],
)
def test_route_errors(method: str, path: str, status: int, fragment: str) -> None:
    async def scenario(client: TestClient[Any, Any], plane: DataPlane) -> None:
        response = await client.request(method, path, json=infer_body())
        assert response.status == status
        assert fragment in (await json_of(response))["error"]

    run(scenario)


def test_config_statistics_and_repository_routes() -> None:
    async def scenario(client: TestClient[Any, Any], plane: DataPlane) -> None:
        config = await json_of(await client.get("/v2/models/m/config"))
        assert (config["name"], config["max_batch_size"]) == ("m", 8)
        assert config["input"] == [
            {"name": "x", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [3]}
        ]
        assert config["output"][:2] == [
            {"name": "y", "data_type": "TYPE_FP32", "dims": [1]},
            {"name": "y_mean", "data_type": "TYPE_FP64", "dims": [1]},
        ]
        assert config["dynamic_batching"] == {
            "preferred_batch_size": [8], "max_queue_delay_microseconds": 500,
        }  # fmt: skip
        assert config["parameters"]["mc_max_num_samples"] == {"string_value": "100"}
        assert (await client.post("/v2/models/m/infer", json=infer_body())).status == 200
        bad = infer_body()
        bad["inputs"][0]["shape"] = [3, 2]
        assert (await client.post("/v2/models/m/infer", json=bad)).status == 400
        everything = await json_of(await client.get("/v2/models/stats"))
        assert [(s["name"], s["version"]) for s in everything["model_stats"]] == [
            ("m", "1"), ("m", "2"),
        ]  # fmt: skip
        one = await json_of(await client.get("/v2/models/m/versions/2/stats"))
        [stats] = one["model_stats"]
        assert (stats["inference_count"], stats["execution_count"]) == (2, 1)
        inference = stats["inference_stats"]
        assert (inference["success"]["count"], inference["fail"]["count"]) == (1, 1)
        assert inference["queue"]["count"] == inference["compute_infer"]["count"] == 1
        assert [b["batch_size"] for b in stats["batch_stats"]] == [2]
        assert stats["last_inference"] > 0
        index = await json_of(await client.post("/v2/repository/index", json={"ready": True}))
        assert [(e["name"], e["version"], e["state"]) for e in index] == [
            ("m", "2", "READY"), ("m", "1", "READY"),
        ]  # fmt: skip
        refused = await client.post(
            "/v2/repository/models/m/load", json={"parameters": {"config": "{}"}}
        )
        assert refused.status == 400
        unload = await client.post("/v2/repository/models/m/unload", json={})
        assert (unload.status, await json_of(unload)) == (200, {})
        gone = await client.get("/v2/models/m/ready")
        assert gone.status == 503
        after = await client.post("/v2/models/m/infer", json=infer_body())
        assert (after.status, (await json_of(after))["error"]) == (
            503, "model 'm' is not ready: unloaded on request",
        )  # fmt: skip

    run(scenario, max_batch_rows=8)


def test_the_authentication_hook_guards_every_route_but_health() -> None:
    seen: list[str | None] = []

    def authenticate(value: str | None) -> None:
        seen.append(value)
        if value != "Bearer good":
            raise Unauthenticated("this server needs 'Authorization: Bearer <token>'")

    async def scenario(client: TestClient[Any, Any], plane: DataPlane) -> None:
        assert (await client.get("/v2/health/ready")).status == 200
        assert (await client.get("/v2/health/live")).status == 200
        refused = await client.post("/v2/models/m/infer", json=infer_body())
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert "Bearer <token>" in (await json_of(refused))["error"]
        wrong = await client.get("/v2", headers={"Authorization": "Bearer bad"})
        assert wrong.status == 401
        good = {"Authorization": "Bearer good"}
        assert (await client.post("/v2/models/m/infer", json=infer_body(), headers=good)).ok
        assert seen == [None, "Bearer bad", "Bearer good"]  # never asked for health

    run(scenario, authenticate=authenticate)


def test_requests_are_counted_like_grpc_calls_with_the_version_that_answered() -> None:
    def count(**labels: str) -> float:
        value = metrics.REGISTRY.get_sample_value("mcd_request_duration_seconds_count", labels)
        return value or 0.0

    ok = {"model": "m", "version": "1", "method": "ModelInfer", "code": "OK"}
    bad = {"model": "m", "version": "", "method": "ModelInfer", "code": "INVALID_ARGUMENT"}
    unknown = {"model": metrics.UNKNOWN_MODEL, "version": "", "method": "ModelMetadata",
               "code": "NOT_FOUND"}  # fmt: skip
    before = [count(**labels) for labels in (ok, bad, unknown)]

    async def scenario(client: TestClient[Any, Any], plane: DataPlane) -> None:
        await client.post("/v2/models/m/versions/1/infer", json=infer_body())
        await client.post("/v2/models/m/infer", json={"inputs": []})
        await client.get("/v2/models/nope")

    run(scenario)
    after = [count(**labels) for labels in (ok, bad, unknown)]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


def test_a_client_that_leaves_frees_its_place_and_never_fails_another() -> None:
    """aiohttp cancels the handler of a client that disconnects: its queued request is dropped,
    the one running finishes for the others."""
    gate = threading.Event()
    engine = FakeEngine(gate=gate)

    async def scenario(client: TestClient[Any, Any], plane: DataPlane) -> None:
        running = asyncio.create_task(client.post("/v2/models/m/infer", json=infer_body()))
        await engine.wait_started()
        leaving = asyncio.create_task(client.post("/v2/models/m/infer", json=infer_body()))
        await asyncio.sleep(0.2)  # it reaches the queue (not a timing assertion)
        leaving.cancel()
        gate.set()
        response = await asyncio.wait_for(running, SAFETY_TIMEOUT_S)
        assert response.status == 200
        again = await client.post("/v2/models/m/infer", json=infer_body())
        assert again.status == 200

    run(scenario, engine=engine, compute_workers=1, max_queue_size=1)
