"""Triton's model repository extension under load: tritonclient's load_model / unload_model
(and the REST routes) while callers infer, with 0 failed requests. A server of its own on a
copy of the test repository, since the test unloads models and touches files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ExportedModels
from tests.support.server import RunningServer, running_server

SCRIPT = Path(__file__).with_name("tritonclient_control_checks.py")


@pytest.fixture(scope="module")
def repository(test_models: ExportedModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("control-repository")
    for name in ("tiny_reg", "tiny_cls"):
        shutil.copytree(test_models.repository / name, copy / name)
    return copy


@pytest.fixture(scope="module")
def control_server(
    repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with running_server(repository, tmp_path_factory.mktemp("control-server")) as running:
        yield running


def test_load_and_unload_under_load_fail_no_request(
    control_server: RunningServer, repository: Path
) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), control_server.target, control_server.http_url,
         str(repository)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stderr}\n{result.stdout}"
    facts: dict[str, Any] = json.loads(result.stdout)
    assert facts["failures"] == []
    assert facts["every_caller_ran"]
    assert facts["calls"] > 0
    assert facts["unloaded_ready"] == [False, False, False]
    assert facts["loaded_ready"] == [True, True, True]
    assert ("tiny_cls", "", "UNAVAILABLE", "unloaded on request") in [
        tuple(entry) for entry in facts["index_after_unload"]
    ]
    assert facts["stats_versions"] == ["1", "2"]
    assert facts["tiny_cls_answers"]
    log = control_server.log()
    assert log.count("reloaded tiny_reg version 2") == 3  # a new copy swapped in each round
