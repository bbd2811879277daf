"""The KServe v2 HTTP port of the real server with plain HTTP requests (urllib): every route,
each kind of error with its status and ``{"error": ...}``, the same answers as gRPC, the same
metrics, and HTTP and gRPC served together on one event loop without a failed request."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from mcdropout_client import Client
from tests.integration.conftest import RunningServer

X = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)


def call(
    server: RunningServer,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        server.http_url + path, data=data, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def ok(server: RunningServer, method: str, path: str, body: Any = None) -> Any:
    status, _, raw = call(server, method, path, body)
    assert status == 200, raw
    return json.loads(raw)


def infer_body(rows: int = 3, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 6],
                        "data": X[:rows].tolist()}], **extra}  # fmt: skip


def test_health_and_server_metadata(server: RunningServer) -> None:
    assert ok(server, "GET", "/v2/health/live") == {"live": True}
    assert ok(server, "GET", "/v2/health/ready") == {"ready": True}
    metadata = ok(server, "GET", "/v2")
    assert metadata["name"] == "mcdropout"
    assert "model_repository" in metadata["extensions"]


def test_model_routes(server: RunningServer) -> None:
    model = ok(server, "GET", "/v2/models/tiny_reg/versions/1")
    assert (model["name"], model["versions"]) == ("tiny_reg", ["2", "1"])
    assert ok(server, "GET", "/v2/models/tiny_reg/versions/2/ready") == {
        "name": "tiny_reg", "ready": True,
    }  # fmt: skip
    assert call(server, "GET", "/v2/models/deterministic/ready")[0] == 503  # failed to load
    assert call(server, "GET", "/v2/models/nope/ready")[0] == 404
    config = ok(server, "GET", "/v2/models/tiny_cls/config")
    assert config["input"] == [
        {"name": "x", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [6]}
    ]
    stats = ok(server, "GET", "/v2/models/tiny_reg/versions/1/stats")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("tiny_reg", "1")]
    every = ok(server, "GET", "/v2/models/stats")["model_stats"]
    assert {s["name"] for s in every} >= {"tiny_cls", "tiny_reg"}
    index = ok(server, "POST", "/v2/repository/index", {"ready": False})
    states = {(e["name"], e["version"]): e for e in index}
    assert states[("tiny_cls", "1")]["state"] == "READY"
    assert states[("deterministic", "1")]["state"] == "UNAVAILABLE"
    assert "identical outputs" in states[("deterministic", "1")]["reason"]


def test_infer_json_answers_what_grpc_answers(server: RunningServer, client: Client) -> None:
    """The same seeded request through both APIs gives the same statistics."""
    answer = ok(server, "POST", "/v2/models/tiny_cls/infer",
                infer_body(id="q", parameters={"mc_samples": 64, "mc_seed": 11}))  # fmt: skip
    assert (answer["id"], answer["model_version"], answer["parameters"]) == (
        "q", "1", {"mc_samples": 64},
    )  # fmt: skip
    outputs = {o["name"]: o for o in answer["outputs"]}
    mean = np.array(outputs["logits_mean"]["data"]).reshape(outputs["logits_mean"]["shape"])
    grpc_answer = client.predict("tiny_cls", X, num_samples=64, seed=11)
    np.testing.assert_array_equal(mean, grpc_answer.outputs["logits"].mean)
    assert outputs["logits_predicted_label"]["data"] == list(
        grpc_answer.outputs["logits"].predicted_label
    )
    np.testing.assert_array_equal(
        np.array(outputs["logits"]["data"], np.float32), mean.astype(np.float32).ravel()
    )


def test_infer_binary_tensor_data(server: RunningServer) -> None:
    header = json.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3, 6],
                    "parameters": {"binary_data_size": X.nbytes}}],
        "outputs": [{"name": "logits_entropy", "parameters": {"binary_data": True}},
                    {"name": "logits_predicted_class"}],
        "parameters": {"mc_samples": 20},
    }).encode()  # fmt: skip
    status, headers, body = call(
        server, "POST", "/v2/models/tiny_cls/infer", header + X.tobytes(),
        {"Inference-Header-Content-Length": str(len(header))},
    )  # fmt: skip
    assert status == 200, body
    length = int(headers["Inference-Header-Content-Length"])
    answer = json.loads(body[:length])
    entropy, classes = answer["outputs"]
    assert entropy["parameters"] == {"binary_data_size": 24}
    values = np.frombuffer(body[length:], "<f8")
    assert values.shape == (3,)
    assert ((values >= 0) & (values <= np.log(4) + 1e-9)).all()
    assert len(classes["data"]) == 3


@pytest.mark.parametrize(
    "case",
    [
        ("POST", "/v2/models/tiny_cls/infer", b"{", 400, "not valid JSON"),
        ("POST", "/v2/models/tiny_cls/infer", {"inputs": [{"name": "x", "datatype": "FP32",
         "shape": [1, 5], "data": [0, 0, 0, 0, 0]}]}, 400, "must have shape [-1, 6]"),
        ("POST", "/v2/models/tiny_cls/infer", infer_body(parameters={"mc_samples": 20_001}),
         400, "num_samples must be in 1..20000"),
        ("POST", "/v2/models/tiny_cls/infer", infer_body(outputs=[{"name": "logitz"}]), 400,
         "has no output 'logitz'"),
        ("POST", "/v2/models/tiny_cls/infer", {"inputs": [{"name": "x", "datatype": "FP32",
         "shape": [65, 6], "data": [0.0] * 390}]}, 429, "65 rows is more than the limit of 64"),
        ("POST", "/v2/models/tiny_cls/infer", b" " * (1024 * 1024 + 1), 413,
         "larger than the limit of 1048576 bytes"),
        ("POST", "/v2/models/nope/infer", infer_body(), 404, "model 'nope' not found"),
        ("POST", "/v2/models/tiny_cls/versions/9/infer", infer_body(), 404, "version '9'"),
        ("POST", "/v2/models/deterministic/infer", infer_body(), 503, "identical outputs"),
        ("GET", "/v2/models/tiny_cls/versions/latest", None, 400, "positive integer"),
        ("GET", "/v2/modelz", None, 404, "no route /v2/modelz"),
        ("GET", "/v2/models/tiny_cls/infer", None, 405, "GET is not allowed"),
        ("POST", "/v2/repository/models/nope/load", {}, 404, "model 'nope' not found"),
        ("POST", "/v2/repository/models/tiny_cls/load", {"parameters": {"file:1/model.onnx":
         "AAAA"}}, 400, "overriding a model's config or files is not supported"),
    ],
)  # fmt: skip
def test_errors_are_the_protocols_error_object_with_the_right_status(
    server: RunningServer, case: tuple[str, str, Any, int, str]
) -> None:
    method, path, body, status, fragment = case
    got, headers, raw = call(server, method, path, body)
    answer = json.loads(raw)
    assert (got, list(answer)) == (status, ["error"]), answer
    assert fragment in answer["error"]
    assert headers["Content-Type"].startswith("application/json")


def test_http_requests_are_in_the_same_metrics(server: RunningServer) -> None:
    def scrape() -> str:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
        return text

    line = 'mcd_request_duration_seconds_count{code="OK",method="ModelInfer",model="tiny_reg",version="1"}'
    before = next((float(x.split()[-1]) for x in scrape().splitlines() if x.startswith(line)), 0.0)
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 5],
                        "data": [0.0] * 5}]}  # fmt: skip
    ok(server, "POST", "/v2/models/tiny_reg/versions/1/infer", body)
    after = next(float(x.split()[-1]) for x in scrape().splitlines() if x.startswith(line))
    assert after == before + 1
    text = scrape()
    assert "\nprocess_resident_memory_bytes " in text
    assert "\nprocess_open_fds " in text


def test_http_and_grpc_together_without_a_failed_request(
    server: RunningServer, client: Client
) -> None:
    """Both servers share one event loop: 4 HTTP and 4 gRPC callers at once, 10 calls each."""
    failures: list[str] = []
    calls = {"http": 0, "grpc": 0}
    lock = threading.Lock()

    def http_caller() -> None:
        for _ in range(10):
            status, _, raw = call(server, "POST", "/v2/models/tiny_cls/infer",
                                  infer_body(parameters={"mc_samples": 200}))  # fmt: skip
            with lock:
                calls["http"] += 1
                if status != 200:
                    failures.append(raw.decode())

    def grpc_caller() -> None:
        for _ in range(10):
            try:
                client.predict("tiny_cls", X, num_samples=200)
            except Exception as exc:  # recorded, asserted below
                failures.append(repr(exc))
            with lock:
                calls["grpc"] += 1

    threads = [threading.Thread(target=f) for f in [http_caller] * 4 + [grpc_caller] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == []
    assert calls == {"http": 40, "grpc": 40}
