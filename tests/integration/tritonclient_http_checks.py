"""Calls a running server's KServe v2 HTTP port with the real tritonclient.http (its sync client,
binary tensor data by default and JSON on request, and its asyncio client) and prints what it
saw as JSON. Run by tests/integration/test_tritonclient_http.py in a process of its own, like
tritonclient_checks.py (tritonclient's generated code cannot share a process with the server's).

    python tests/integration/tritonclient_http_checks.py 127.0.0.1:8000

It expects the integration test repository (models ``tiny_cls`` and ``tiny_reg``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from tritonclient.utils import InferenceServerException

LABELS = ["ant", "bee", "cat", "dog"]


def x_input(rows: int, binary: bool = True, datatype: str = "FP32") -> httpclient.InferInput:
    x = np.random.default_rng(rows).standard_normal((rows, 6))
    infer_input = httpclient.InferInput("x", [rows, 6], datatype)
    infer_input.set_data_from_numpy(
        x.astype(np.float32 if datatype == "FP32" else np.float64), binary_data=binary
    )
    return infer_input


def check_health_and_metadata(client: httpclient.InferenceServerClient) -> dict[str, Any]:
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "tiny_cls": client.is_model_ready("tiny_cls"),
        "tiny_reg_v1": client.is_model_ready("tiny_reg", "1"),
        "tiny_reg_v9": client.is_model_ready("tiny_reg", "9"),
        "unknown": client.is_model_ready("nope"),
        "server": client.get_server_metadata(),
        "model": client.get_model_metadata("tiny_cls"),
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _answer(result: httpclient.InferResult) -> dict[str, Any]:
    response = result.get_response()
    mean = result.as_numpy("logits_mean")
    classes = result.as_numpy("logits_predicted_class")
    labels = result.as_numpy("logits_predicted_label")
    return {
        "id": response.get("id"),
        "model_version": response["model_version"],
        "mc_samples": response["parameters"]["mc_samples"],
        "outputs": [o["name"] for o in response["outputs"]],
        "binary": [
            o["name"] for o in response["outputs"] if "binary_data_size" in o.get("parameters", {})
        ],
        "dtypes": {o["name"]: str(result.as_numpy(o["name"]).dtype) for o in response["outputs"]},
        "mean_shape": list(mean.shape),
        "mean_row_sums": mean.sum(axis=1).tolist(),
        "classes_are_argmax": bool((classes == mean.argmax(axis=1)).all()),
        # JSON carries BYTES as strings, binary data as bytes (tritonclient keeps each as it came)
        "labels_match": [_text(label) for label in labels] == [LABELS[c] for c in classes],
        "own_is_mean": bool(np.array_equal(result.as_numpy("logits"), mean.astype(np.float32))),
    }


def check_infer_binary(client: httpclient.InferenceServerClient) -> dict[str, Any]:
    """tritonclient.http's default: binary inputs, every output binary."""
    result = client.infer("tiny_cls", [x_input(5)], parameters={"mc_samples": 200}, request_id="b")
    return _answer(result)


def check_infer_json(client: httpclient.InferenceServerClient) -> dict[str, Any]:
    """JSON inputs and JSON outputs (binary_data=False on both sides)."""
    outputs = [
        httpclient.InferRequestedOutput(name, binary_data=False)
        for name in ("logits", "logits_mean", "logits_predicted_class", "logits_predicted_label")
    ]
    result = client.infer("tiny_cls", [x_input(3, binary=False)], outputs=outputs, request_id="j")
    return _answer(result)


def check_regression_and_compression(client: httpclient.InferenceServerClient) -> dict[str, Any]:
    features = httpclient.InferInput("features", [4, 5], "FP32")
    features.set_data_from_numpy(np.ones((4, 5), np.float32))
    result = client.infer(
        "tiny_reg",
        [features],
        parameters={"mc_samples": 30, "mc_interval_levels": "0.9"},
        request_compression_algorithm="gzip",
        response_compression_algorithm="gzip",
    )
    return {
        "outputs": [o["name"] for o in result.get_response()["outputs"]],
        "mean_shape": list(result.as_numpy("y_mean").shape),
        "lower_below_upper": bool(
            (
                result.as_numpy("y_interval_gaussian_0.9_lower")
                < result.as_numpy("y_interval_gaussian_0.9_upper")
            ).all()
        ),
    }


def check_extensions(client: httpclient.InferenceServerClient) -> dict[str, Any]:
    config = client.get_model_config("tiny_reg")
    stats = client.get_inference_statistics("tiny_cls")["model_stats"][0]
    index = client.get_model_repository_index()
    return {
        "config": [config["name"], config["max_batch_size"], config["input"][0]["dims"]],
        "inference_count_positive": stats["inference_count"] > 0,
        "success_count_positive": stats["inference_stats"]["success"]["count"] > 0,
        "index": sorted((m["name"], m["version"], m["state"]) for m in index),
    }


def check_errors(client: httpclient.InferenceServerClient) -> dict[str, Any]:
    calls: dict[str, Callable[[], Any]] = {
        "unknown_model": lambda: client.infer("nope", [x_input(1)]),
        "wrong_datatype": lambda: client.infer("tiny_cls", [x_input(1, datatype="FP64")]),
        "float_mc_samples": lambda: client.infer(
            "tiny_cls", [x_input(1)], parameters={"mc_samples": 1.5}
        ),
        "unknown_mc_parameter": lambda: client.infer(
            "tiny_cls", [x_input(1)], parameters={"mc_sample": 3}
        ),
        "sequence": lambda: client.infer("tiny_cls", [x_input(1)], sequence_id=3),
        "too_many_rows": lambda: client.infer("tiny_cls", [x_input(65)]),
        "unknown_model_metadata": lambda: client.get_model_metadata("nope"),
    }
    facts: dict[str, Any] = {}
    for name, call in calls.items():
        try:
            call()
            facts[name] = {"status": None}
        except InferenceServerException as error:
            facts[name] = {"status": error.status(), "message": error.message()}
    return facts


async def _aio(url: str) -> dict[str, Any]:
    async with aioclient.InferenceServerClient(url) as client:
        x = aioclient.InferInput("x", [2, 6], "FP32")
        x.set_data_from_numpy(np.zeros((2, 6), np.float32))
        result = await client.infer("tiny_cls", [x], parameters={"mc_samples": 20})
        return {
            "ready": await client.is_server_ready(),
            "mean_shape": list(result.as_numpy("logits_mean").shape),
        }


def main(url: str) -> dict[str, Any]:
    client = httpclient.InferenceServerClient(url)
    checks: dict[str, Callable[[httpclient.InferenceServerClient], dict[str, Any]]] = {
        "health": check_health_and_metadata,
        "binary": check_infer_binary,
        "json": check_infer_json,
        "regression": check_regression_and_compression,
        "extensions": check_extensions,
        "errors": check_errors,
    }
    facts = {name: check(client) for name, check in checks.items()}
    facts["aio"] = asyncio.run(_aio(url))
    client.close()
    return facts


if __name__ == "__main__":
    json.dump(main(sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
