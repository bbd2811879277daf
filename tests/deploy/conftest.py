"""Deployment fixtures: a small model repository exported in the test session, the real server
on 127.0.0.1 (tests/support/server.py), and lookups of the external tools the tests use."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from export import export_model
from tests.integration.conftest import tiny_classifier, tiny_regressor
from tests.support.server import RunningServer, running_server

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def tool(name: str, install: str) -> str:
    """The path of an executable (the venv's bin first), or skip the test saying how to get it."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}:/usr/sbin:/usr/bin:/sbin")
    if found is None:
        found = shutil.which(name)
    if found is None:
        message = f"{name} not installed: {install}"
        if os.environ.get("MCD_REQUIRE_TOOLS") == "1":  # CI: a missing tool is a failure
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    """A port free on 127.0.0.1 right now (for tools that cannot bind port 0 and report it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(metrics_port: int) -> str:
    """The server's exposition text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        return str(r.read().decode())


@pytest.fixture(scope="session")
def deploy_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny models (a classifier and a regressor), quick to export and to serve."""
    repository = tmp_path_factory.mktemp("deploy-repository")
    common = {"repository": repository, "max_num_samples": 20_000, "verify_samples": 2000}
    export_model(tiny_classifier(), torch.randn(8, 6), name="tiny_cls", task="classification",
                 input_names=["x"], output_names=["logits"], labels=["ant", "bee", "cat", "dog"],
                 default_num_samples=50, **common)  # fmt: skip
    export_model(tiny_regressor(), torch.randn(8, 5), name="tiny_reg", task="regression",
                 input_names=["features"], output_names=["y"], **common)  # fmt: skip
    return repository


@pytest.fixture(scope="session")
def deploy_server(
    deploy_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with running_server(deploy_repository, tmp_path_factory.mktemp("deploy-server")) as running:
        yield running
