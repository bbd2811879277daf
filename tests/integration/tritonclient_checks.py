"""Calls a running server with the real tritonclient[grpc] and prints what it saw as JSON.

Run by tests/integration/test_tritonclient.py in a process of its own: tritonclient's
generated code and the server's (``service.gen.inference``) both define the ``inference.*``
messages, and protobuf's default descriptor pool refuses a second definition, so the two can
never be imported into one process. This script imports neither the service nor the tests.

    python tests/integration/tritonclient_checks.py 127.0.0.1:8001

It expects the integration test repository (models ``tiny_cls`` and ``tiny_reg``). Each check
records facts rather than asserting, so that the pytest side shows exactly what differed.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

LABELS = ["ant", "bee", "cat", "dog"]


def x_input(rows: int, seed: int = 0, datatype: str = "FP32") -> grpcclient.InferInput:
    x = np.random.default_rng(seed).standard_normal((rows, 6))
    infer_input = grpcclient.InferInput("x", [rows, 6], datatype)
    infer_input.set_data_from_numpy(x.astype(np.float32 if datatype == "FP32" else np.float64))
    return infer_input


def error_facts(error: InferenceServerException) -> dict[str, Any]:
    return {"type": type(error).__name__, "status": error.status(), "message": error.message()}


def check_health(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "tiny_cls": client.is_model_ready("tiny_cls"),
        "tiny_reg_v1": client.is_model_ready("tiny_reg", "1"),
        "tiny_reg_v9": client.is_model_ready("tiny_reg", "9"),
        "unknown": client.is_model_ready("nope"),
    }


def check_metadata(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    server = client.get_server_metadata(as_json=True)
    model = client.get_model_metadata("tiny_cls", as_json=True)
    return {"server": server, "model": model}


def check_infer_raw(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    result = client.infer("tiny_cls", [x_input(5)], parameters={"mc_samples": 200}, request_id="a")
    response = result.get_response(as_json=True)
    mean = result.as_numpy("logits_mean")
    classes = result.as_numpy("logits_predicted_class")
    labels = result.as_numpy("logits_predicted_label")
    entropy = result.as_numpy("logits_entropy")
    mi = result.as_numpy("logits_mutual_information")
    expected_entropy = result.as_numpy("logits_expected_entropy")
    return {
        "id": response.get("id"),
        "model_version": response["model_version"],
        "mc_samples": response["parameters"]["mc_samples"]["int64_param"],
        "outputs": [o["name"] for o in response["outputs"]],
        "shapes": {o["name"]: list(result.as_numpy(o["name"]).shape) for o in response["outputs"]},
        "dtypes": {o["name"]: str(result.as_numpy(o["name"]).dtype) for o in response["outputs"]},
        "mean_row_sums": mean.sum(axis=1).tolist(),
        "classes_are_argmax": bool((classes == mean.argmax(axis=1)).all()),
        "labels_match": [label.decode() for label in labels] == [LABELS[c] for c in classes],
        "mi_is_entropy_gap": bool(np.allclose(mi, entropy - expected_entropy, atol=1e-12)),
    }


def check_requested_outputs(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    outputs = [
        grpcclient.InferRequestedOutput("logits_entropy"),
        grpcclient.InferRequestedOutput("logits_mean"),
    ]
    result = client.infer("tiny_cls", [x_input(3)], outputs=outputs)
    response = result.get_response(as_json=True)
    return {
        "outputs": [o["name"] for o in response["outputs"]],
        "entropy_shape": list(result.as_numpy("logits_entropy").shape),
        "std_absent": result.as_numpy("logits_std") is None,
        "default_mc_samples": response["parameters"]["mc_samples"]["int64_param"],
    }


def check_own_output_name(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    """A script written for the deterministic model: it names the graph's output."""
    everything = client.infer("tiny_cls", [x_input(3)], parameters={"mc_samples": 40})
    named = client.infer(
        "tiny_cls", [x_input(3)], outputs=[grpcclient.InferRequestedOutput("logits")]
    )
    logits = everything.as_numpy("logits")
    return {
        "dtype": str(logits.dtype),
        "shape": list(logits.shape),
        "is_the_mean": bool(
            np.array_equal(logits, everything.as_numpy("logits_mean").astype(np.float32))
        ),
        "named_outputs": [o["name"] for o in named.get_response(as_json=True)["outputs"]],
    }


def check_config_statistics_index(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    config = client.get_model_config("tiny_reg", as_json=True)["config"]
    before = client.get_inference_statistics("tiny_cls", as_json=True)["model_stats"][0]
    client.infer("tiny_cls", [x_input(3)], parameters={"mc_samples": 5})
    after = client.get_inference_statistics("tiny_cls", as_json=True)["model_stats"][0]
    every = client.get_inference_statistics(as_json=True)["model_stats"]
    index = client.get_model_repository_index(as_json=True)["models"]
    return {
        "config": {
            "name": config["name"],
            "max_batch_size": config["max_batch_size"],
            "inputs": [(i["name"], i["data_type"], i["dims"]) for i in config["input"]],
            "outputs": [o["name"] for o in config["output"]],
            "dynamic_batching": config.get("dynamic_batching"),
        },
        "rows_counted": int(after["inference_count"]) - int(before.get("inference_count", 0)),
        "successes_counted": int(after["inference_stats"]["success"]["count"])
        - int(before["inference_stats"]["success"].get("count", 0)),
        "versions": sorted((s["name"], s["version"]) for s in every),
        "index": sorted((m["name"], m.get("version", ""), m["state"]) for m in index),
    }


def check_async_infer(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.async_infer(
        "tiny_reg",
        [_features(4)],
        callback=lambda result, error: done.put((result, error)),
        parameters={"mc_samples": 30},
    )
    result, error = done.get(timeout=30)
    return {
        "error": None if error is None else error_facts(error),
        "mean_shape": list(result.as_numpy("y_mean").shape),
        "variance_nonnegative": bool((result.as_numpy("y_variance") >= 0).all()),
    }


def _features(rows: int, columns: int = 5) -> grpcclient.InferInput:
    infer_input = grpcclient.InferInput("features", [rows, columns], "FP32")
    infer_input.set_data_from_numpy(np.ones((rows, columns), np.float32))
    return infer_input


def check_stream(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(6):
            columns = 4 if i == 2 else 5  # request 2 has the wrong shape
            client.async_stream_infer(
                "tiny_reg",
                [_features(2, columns)],
                request_id=str(i),
                parameters={"mc_samples": 10 + i},
            )
        seen = []
        for _ in range(6):
            result, error = answers.get(timeout=30)
            if error is not None:
                seen.append({"error": error_facts(error)})
            else:
                response = result.get_response(as_json=True)
                seen.append(
                    {
                        "id": response["id"],
                        "mc_samples": response["parameters"]["mc_samples"]["int64_param"],
                        "mean_shape": list(result.as_numpy("y_mean").shape),
                    }
                )
    finally:
        client.stop_stream()
    return {"answers": seen}


def check_errors(client: grpcclient.InferenceServerClient) -> dict[str, Any]:
    calls: dict[str, Callable[[], Any]] = {
        "unknown_model": lambda: client.infer("nope", [x_input(1)]),
        "wrong_datatype": lambda: client.infer("tiny_cls", [x_input(1, datatype="FP64")]),
        "float_mc_samples": lambda: client.infer(
            "tiny_cls", [x_input(1)], parameters={"mc_samples": 1.5}
        ),
        "unknown_output": lambda: client.infer(
            "tiny_cls", [x_input(1)], outputs=[grpcclient.InferRequestedOutput("logitz")]
        ),
        "unknown_mc_parameter": lambda: client.infer(
            "tiny_cls", [x_input(1)], parameters={"mc_sample": 3}
        ),
        "sequence": lambda: client.infer("tiny_cls", [x_input(1)], sequence_id=5),
        "priority": lambda: client.infer("tiny_cls", [x_input(1)], priority=2),
        "unknown_model_config": lambda: client.get_model_config("nope"),
        "too_many_rows": lambda: client.infer("tiny_cls", [x_input(65)]),
        "unknown_model_metadata": lambda: client.get_model_metadata("nope"),
    }
    facts: dict[str, Any] = {}
    for name, call in calls.items():
        try:
            call()
            facts[name] = {"type": None}
        except InferenceServerException as error:
            facts[name] = error_facts(error)
    return facts


async def _aio(target: str) -> dict[str, Any]:
    async with aioclient.InferenceServerClient(target) as client:
        x = aioclient.InferInput("x", [2, 6], "FP32")
        x.set_data_from_numpy(np.zeros((2, 6), np.float32))
        result = await client.infer("tiny_cls", [x], parameters={"mc_samples": 20})
        return {
            "live": await client.is_server_live(),
            "mean_shape": list(result.as_numpy("logits_mean").shape),
        }


def main(target: str) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(target)
    checks: dict[str, Callable[[grpcclient.InferenceServerClient], dict[str, Any]]] = {
        "health": check_health,
        "metadata": check_metadata,
        "infer_raw": check_infer_raw,
        "own_output_name": check_own_output_name,
        "config_statistics_index": check_config_statistics_index,
        "requested_outputs": check_requested_outputs,
        "async_infer": check_async_infer,
        "stream": check_stream,
        "errors": check_errors,
    }
    facts = {name: check(client) for name, check in checks.items()}
    facts["aio"] = asyncio.run(_aio(target))
    client.close()
    return facts


if __name__ == "__main__":
    json.dump(main(sys.argv[1]), sys.stdout, indent=1, sort_keys=True)
