"""Compatibility with the reference Open Inference Protocol client, tritonclient[grpc] 2.73.

tritonclient runs in a subprocess (tritonclient_checks.py), never in this process: its
generated ``inference.*`` messages clash with the server's in protobuf's default descriptor
pool, which test_oip.py loads. The script prints what it saw as JSON; the assertions are here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import service
from tests.integration.conftest import RunningServer

SCRIPT = Path(__file__).with_name("tritonclient_checks.py")


@pytest.fixture(scope="module")
def facts(server: RunningServer) -> dict[str, Any]:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.fail("tritonclient is not installed: pip install -e '.[dev]' (make test does)")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), server.target],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\n{result.stdout}"
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def test_liveness_and_readiness(facts: dict[str, Any]) -> None:
    assert facts["health"] == {
        "live": True, "ready": True, "tiny_cls": True, "tiny_reg_v1": True,
        "tiny_reg_v9": False, "unknown": False,
    }  # fmt: skip


def test_server_and_model_metadata(facts: dict[str, Any]) -> None:
    server = facts["metadata"]["server"]
    assert server == {
        "name": "mcdropout", "version": service.__version__,
        "extensions": ["parameters", "mc_dropout", "model_configuration", "statistics",
                       "model_repository", "binary_tensor_data"],
    }  # fmt: skip
    model = facts["metadata"]["model"]
    assert (model["name"], model["versions"], model["platform"]) == (
        "tiny_cls", ["1"], "onnxruntime_mcdropout",
    )  # fmt: skip
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "6"]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]}
    assert outputs["logits_mean"] == ("FP64", ["-1", "4"])
    assert outputs["logits_predicted_label"] == ("BYTES", ["-1"])
    assert outputs["logits_mutual_information"] == ("FP64", ["-1"])


def test_infer_with_raw_inputs(facts: dict[str, Any]) -> None:
    raw = facts["infer_raw"]
    assert (raw["id"], raw["model_version"], raw["mc_samples"]) == ("a", "1", "200")
    assert raw["outputs"] == [
        "logits", "logits_mean", "logits_variance", "logits_std", "logits_predicted_class",
        "logits_predicted_label", "logits_entropy", "logits_expected_entropy",
        "logits_mutual_information", "logits_variation_ratio",
    ]  # fmt: skip
    assert raw["shapes"]["logits_mean"] == [5, 4]
    assert raw["shapes"]["logits_predicted_label"] == [5]
    assert raw["dtypes"]["logits_mean"] == "float64"
    assert raw["dtypes"]["logits_predicted_class"] == "int64"
    assert raw["dtypes"]["logits_predicted_label"] == "object"
    assert all(abs(s - 1) < 1e-6 for s in raw["mean_row_sums"])  # float32 softmax
    assert raw["classes_are_argmax"]
    assert raw["labels_match"]
    assert raw["mi_is_entropy_gap"]


def test_infer_with_requested_outputs(facts: dict[str, Any]) -> None:
    requested = facts["requested_outputs"]
    assert requested["outputs"] == ["logits_entropy", "logits_mean"]
    assert requested["entropy_shape"] == [3]
    assert requested["std_absent"]
    assert requested["default_mc_samples"] == "50"


def test_async_infer(facts: dict[str, Any]) -> None:
    assert facts["async_infer"] == {
        "error": None,
        "mean_shape": [4, 2],
        "variance_nonnegative": True,
    }


def test_stream_answers_in_order_with_the_error_in_place(facts: dict[str, Any]) -> None:
    answers = facts["stream"]["answers"]
    assert [a.get("id") for a in answers] == ["0", "1", None, "3", "4", "5"]
    assert [a.get("mc_samples") for a in answers] == ["10", "11", None, "13", "14", "15"]
    error = answers[2]["error"]
    assert error["type"] == "InferenceServerException"
    assert error["message"].startswith("INVALID_ARGUMENT: input 'features' must have shape")


@pytest.mark.parametrize(
    ("case", "status", "fragment"),
    [
        ("unknown_model", "StatusCode.NOT_FOUND", "model 'nope' not found"),
        ("wrong_datatype", "StatusCode.INVALID_ARGUMENT", "must be float32, got float64"),
        ("float_mc_samples", "StatusCode.INVALID_ARGUMENT", "'mc_samples' must be an integer"),
        ("unknown_output", "StatusCode.INVALID_ARGUMENT", "has no output 'logitz'"),
        ("unknown_mc_parameter", "StatusCode.INVALID_ARGUMENT", "unknown parameter 'mc_sample'"),
        ("sequence", "StatusCode.INVALID_ARGUMENT", "sequences are not supported"),
        ("priority", "StatusCode.INVALID_ARGUMENT", "priorities are not supported"),
        ("unknown_model_config", "StatusCode.NOT_FOUND", "model 'nope' not found"),
        ("too_many_rows", "StatusCode.RESOURCE_EXHAUSTED", "65 rows is more than the limit"),
        ("unknown_model_metadata", "StatusCode.NOT_FOUND", "model 'nope' not found"),
    ],
)
def test_errors_raise_inference_server_exception_with_the_status(
    facts: dict[str, Any], case: str, status: str, fragment: str
) -> None:
    error = facts["errors"][case]
    assert error["type"] == "InferenceServerException"
    assert error["status"] == status
    assert fragment in error["message"]


def test_the_graphs_own_output_name_answers_its_mean(facts: dict[str, Any]) -> None:
    assert facts["own_output_name"] == {
        "dtype": "float32", "shape": [3, 4], "is_the_mean": True, "named_outputs": ["logits"],
    }  # fmt: skip


def test_model_config_statistics_and_repository_index(facts: dict[str, Any]) -> None:
    found = facts["config_statistics_index"]
    config = found["config"]
    assert (config["name"], config["max_batch_size"]) == ("tiny_reg", 64)
    assert config["inputs"] == [["features", "TYPE_FP32", ["5"]]]
    assert config["outputs"] == ["y", "y_mean", "y_variance", "y_std"]
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [64], "max_queue_delay_microseconds": "500",
    }  # fmt: skip
    assert found["rows_counted"] == 3
    assert found["successes_counted"] == 1
    assert ["tiny_reg", "1"] in found["versions"]  # (JSON makes the tuples lists)
    assert ["tiny_reg", "2"] in found["versions"]
    assert ["tiny_cls", "1", "READY"] in found["index"]
    assert ["deterministic", "1", "UNAVAILABLE"] in found["index"]


def test_asyncio_client(facts: dict[str, Any]) -> None:
    assert facts["aio"] == {"live": True, "mean_shape": [2, 4]}
