"""Compatibility with the reference KServe v2 REST client, tritonclient.http 2.73 (sync, with
binary tensor data by default and JSON on request, gzip both ways, and asyncio).

tritonclient runs in a subprocess (tritonclient_http_checks.py), never in this process, as for
its gRPC client (test_tritonclient.py). The script prints what it saw as JSON; the assertions
are here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import service
from tests.integration.conftest import RunningServer

SCRIPT = Path(__file__).with_name("tritonclient_http_checks.py")
CLS_OUTPUTS = [
    "logits", "logits_mean", "logits_variance", "logits_std", "logits_predicted_class",
    "logits_predicted_label", "logits_entropy", "logits_expected_entropy",
    "logits_mutual_information", "logits_variation_ratio",
]  # fmt: skip


@pytest.fixture(scope="module")
def facts(server: RunningServer) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), f"127.0.0.1:{server.http_port}"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\n{result.stdout}"
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def test_health_and_metadata(facts: dict[str, Any]) -> None:
    health = facts["health"]
    assert {k: health[k] for k in ("live", "ready", "tiny_cls", "tiny_reg_v1", "tiny_reg_v9",
                                   "unknown")} == {
        "live": True, "ready": True, "tiny_cls": True, "tiny_reg_v1": True,
        "tiny_reg_v9": False, "unknown": False,
    }  # fmt: skip
    assert health["server"]["version"] == service.__version__
    assert "binary_tensor_data" in health["server"]["extensions"]
    model = health["model"]
    assert (model["name"], model["versions"]) == ("tiny_cls", ["1"])
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 6]}]
    assert [o["name"] for o in model["outputs"]] == CLS_OUTPUTS


@pytest.mark.parametrize("form", ["binary", "json"])
def test_infer(facts: dict[str, Any], form: str) -> None:
    answer = facts[form]
    assert answer["model_version"] == "1"
    assert answer["id"] == ("b" if form == "binary" else "j")
    assert all(abs(s - 1) < 1e-6 for s in answer["mean_row_sums"])
    assert answer["classes_are_argmax"]
    assert answer["labels_match"]
    assert answer["own_is_mean"]
    assert answer["dtypes"]["logits"] == "float32"
    assert answer["dtypes"]["logits_mean"] == "float64"
    assert answer["dtypes"]["logits_predicted_class"] == "int64"
    if form == "binary":
        assert (answer["mc_samples"], answer["mean_shape"]) == (200, [5, 4])
        assert answer["outputs"] == answer["binary"] == CLS_OUTPUTS
    else:
        assert (answer["mc_samples"], answer["mean_shape"]) == (50, [3, 4])
        assert answer["outputs"] == [
            "logits", "logits_mean", "logits_predicted_class", "logits_predicted_label",
        ]  # fmt: skip
        assert answer["binary"] == []


def test_regression_with_intervals_and_gzip(facts: dict[str, Any]) -> None:
    regression = facts["regression"]
    assert regression["mean_shape"] == [4, 2]
    assert "y_interval_empirical_0.9_upper" in regression["outputs"]
    assert regression["lower_below_upper"]


def test_config_statistics_and_index(facts: dict[str, Any]) -> None:
    extensions = facts["extensions"]
    assert extensions["config"] == ["tiny_reg", 64, [5]]
    assert extensions["inference_count_positive"]
    assert extensions["success_count_positive"]
    assert ["tiny_cls", "1", "READY"] in extensions["index"]


@pytest.mark.parametrize(
    ("case", "status", "fragment"),
    [
        ("unknown_model", "404", "model 'nope' not found"),
        ("wrong_datatype", "400", "must be float32, got float64"),
        ("float_mc_samples", "400", "'mc_samples' must be an integer"),
        ("unknown_mc_parameter", "400", "unknown parameter 'mc_sample'"),
        ("sequence", "400", "sequences are not supported"),
        ("too_many_rows", "429", "65 rows is more than the limit"),
        ("unknown_model_metadata", "404", "model 'nope' not found"),
    ],
)
def test_errors(facts: dict[str, Any], case: str, status: str, fragment: str) -> None:
    error = facts["errors"][case]
    assert str(error["status"]) == status
    assert fragment in error["message"]


def test_asyncio_client(facts: dict[str, Any]) -> None:
    assert facts["aio"] == {"ready": True, "mean_shape": [2, 4]}
