"""Compatibility with the kserve SDK's REST client (kserve 0.21, v2 protocol), run from the
SDK's own venv (.venv-kserve, built by ``make kserve-env``, which ``make test`` runs). Without
that venv the test skips, saying how to build it (CI, MCD_REQUIRE_TOOLS=1: it fails)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import RunningServer

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("kserve_checks.py")
PYTHON = ROOT / ".venv-kserve" / "bin" / "python"


@pytest.fixture(scope="module")
def facts(server: RunningServer) -> dict[str, Any]:
    if not PYTHON.exists():
        message = f"the kserve SDK's venv is missing ({PYTHON}): run `make kserve-env`"
        if os.environ.get("MCD_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    result = subprocess.run(
        [str(PYTHON), str(SCRIPT), server.http_url],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT / "tests",
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\n{result.stdout}"
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def test_health(facts: dict[str, Any]) -> None:
    assert (facts["live"], facts["ready"], facts["model_ready"], facts["unknown_ready"]) == (
        True, True, True, False,
    )  # fmt: skip


@pytest.mark.parametrize("form", ["json", "binary"])
def test_infer(facts: dict[str, Any], form: str) -> None:
    answer = facts[form]
    assert (answer["id"], answer["model_name"]) == ("k", "tiny_cls")
    assert answer["parameters"]["mc_samples"] == 30
    outputs = answer["outputs"]
    assert outputs["logits"]["datatype"] == "FP32"
    assert outputs["logits_mean"] == {**outputs["logits_mean"], "datatype": "FP64",
                                      "shape": [3, 4]}  # fmt: skip
    assert outputs["logits_predicted_label"]["datatype"] == "BYTES"
    assert outputs["logits_entropy"]["shape"] == [3]


def test_errors_raise_with_the_status_and_message(facts: dict[str, Any]) -> None:
    assert facts["error"]["status"] == 404
    assert "model 'nope' not found" in facts["error"]["message"]
