"""The container image, built and run for real on a machine without a Docker engine.

The base is a local Debian 12 + Python 3.11 image (deploy/container/local-base-image.sh:
debootstrap, no registry), the build is buildah (vfs storage, chroot isolation) with CUDA=0
to stay small, the run is podman (runc, host network on a free 127.0.0.1 port pair). The test
waits for the image's HEALTHCHECK, calls Predict, scrapes the metrics port, serves a mounted
model repository instead of the baked-in one, and sends SIGTERM during a burst of requests:
none may fail, and the container must exit 0.

Opt-in, since the build takes minutes and downloads the serving wheels (~300 MB):
``make container-test`` (MCD_CONTAINER_TEST=1; needs root, ``make container-tools``, models/).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from mcdropout_client import Client, Prediction
from tests.deploy.conftest import ROOT, free_port, scrape, tool

pytestmark = [
    pytest.mark.container,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(
        os.environ.get("MCD_CONTAINER_TEST") != "1",
        reason="builds and runs the image (minutes): make container-test (MCD_CONTAINER_TEST=1)",
    ),
]

STORE = os.environ.get("MCD_CONTAINER_STORE", "/var/tmp/mcdropout-containers")
LOCAL_BASE = "localhost/mcdropout-base:bookworm-python3"  # deploy/container/env.sh
IMAGE = "localhost/mcdropout:container-test"
STORAGE = ["--root", f"{STORE}/root", "--runroot", f"{STORE}/runroot", "--storage-driver", "vfs"]
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_TIMEOUT_S = 1800
HEALTHY_TIMEOUT_S = 120
GRACE_PERIOD_S = 20
# Never in the runtime image: training, build and test tools, CUDA wheels (CPU build).
FORBIDDEN = ("torch", "onnxscript", "scikit-learn", "pytest", "grpcio-tools", "mypy", "ruff",
             "pip", "setuptools")  # fmt: skip


def podman(*args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
    command = [tool("podman", "make container-tools"), *STORAGE, "--cgroup-manager", "cgroupfs",
               "--events-backend", "file", "--runtime", "runc", *args]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    for name in ("buildah", "podman", "runc", "debootstrap"):
        tool(name, "make container-tools")
    if not list((ROOT / "models").glob("*/*/model.onnx")):
        pytest.fail("models/ holds no model: make models (the image bakes it in)")
    env = {**os.environ, "MCD_CONTAINER_STORE": STORE, "LOCAL_BASE": LOCAL_BASE,
           "IMAGE": IMAGE, "CUDA": "0", "BASE": LOCAL_BASE}  # fmt: skip
    if HOST_CA_BUNDLE.is_file():  # pip in the build trusts what the host trusts
        env["BUILD_CA_BUNDLE"] = str(HOST_CA_BUNDLE)
    log = tmp_path_factory.mktemp("build") / "build.log"
    for script in ("deploy/container/local-base-image.sh", "deploy/build-image.sh"):
        with log.open("a") as out:
            code = subprocess.run(
                [str(ROOT / script)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT_S, check=False,
            ).returncode  # fmt: skip
        assert code == 0, f"{script} exited {code}:\n{log.read_text()[-5000:]}"
    # Earlier builds of the tag leave unnamed images behind (a full copy each with vfs).
    subprocess.run(["buildah", *STORAGE, "rmi", "--prune"], capture_output=True, check=False)
    return IMAGE


@dataclass
class Container:
    name: str
    grpc_port: int
    metrics_port: int
    http_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr


def start(image: str, name: str, *extra: str) -> Container:
    """``podman run`` on a free port pair of 127.0.0.1; wait until the HEALTHCHECK passes."""
    podman("rm", "--force", name, check=False)
    container = Container(name, free_port(), free_port(), free_port())
    podman("run", "--detach", "--name", name, "--network", "host",
           "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096",
           "--env", "MCD_HOST=127.0.0.1", "--env", f"MCD_GRPC_PORT={container.grpc_port}",
           "--env", f"MCD_METRICS_PORT={container.metrics_port}",
           "--env", f"MCD_HTTP_PORT={container.http_port}",
           "--env", f"MCD_GRACE_PERIOD_S={GRACE_PERIOD_S}", *extra, image)  # fmt: skip
    deadline = time.monotonic() + HEALTHY_TIMEOUT_S
    while podman("healthcheck", "run", name, check=False).returncode != 0:
        state = podman("inspect", name, "--format", "{{.State.Status}}", check=False).stdout
        if state.strip() != "running" or time.monotonic() > deadline:
            raise AssertionError(f"{name} not healthy ({state.strip()}):\n{container.logs()}")
        time.sleep(1)
    return container


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[Container]:
    running = start(image, "mcdropout-container-test")
    yield running
    podman("rm", "--force", "--time", "0", running.name, check=False)


def test_image_configuration(image: str) -> None:
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert set(config["ExposedPorts"]) == {"8000/tcp", "8001/tcp", "8002/tcp"}
    assert config["Entrypoint"] == ["python", "-m", "service"]
    assert config["StopSignal"] == "SIGTERM"
    assert "MCD_MODEL_REPOSITORY=/models" in config["Env"]
    assert inspected["Healthcheck"]["Test"] == ["CMD", "python", "/opt/mcdropout/healthcheck.py"]


def test_runtime_has_only_the_serving_dependencies(container: Container) -> None:
    script = (
        "import importlib.metadata as m, json, shutil, sys; print(json.dumps({"
        "'dists': sorted(d.metadata['Name'].lower() for d in m.distributions()),"
        "'compilers': [c for c in ('gcc', 'cc', 'g++', 'clang') if shutil.which(c)],"
        "'python': sys.version}))"
    )
    result = podman("exec", container.name, "python", "-c", script)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    dists = {name.replace("_", "-") for name in found["dists"]}
    serving = {"onnxruntime-gpu", "onnx", "grpcio", "grpcio-health-checking", "grpcio-reflection",
               "protobuf", "prometheus-client", "numpy", "aiohttp", "mcdropout-serving"}  # fmt: skip
    assert serving <= dists, serving - dists
    assert not dists & set(FORBIDDEN), dists & set(FORBIDDEN)
    assert not [d for d in dists if d.startswith("nvidia-")]  # CUDA=0 leaves them out
    assert found["compilers"] == []


def test_health_predict_and_metrics(container: Container) -> None:
    rng = np.random.default_rng(0)
    with Client(container.target) as client:
        listed = client.list_models(timeout=10)
        assert sorted(m.name for m in listed) == ["digits", "housing"]
        digits = client.predict("digits", rng.random((3, 1, 8, 8), np.float32), num_samples=50)
        assert digits.mean.shape == (3, 10)
        housing = client.predict("housing", rng.random((2, 13), np.float32), num_samples=50)
        assert housing.num_samples == 50
    url = f"http://127.0.0.1:{container.http_port}"
    with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=10) as response:
        assert json.loads(response.read()) == {"ready": True}
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 13],
                        "data": [0.5] * 13}], "parameters": {"mc_samples": 20}}  # fmt: skip
    request = urllib.request.Request(f"{url}/v2/models/housing/infer", json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert [o["name"] for o in answer["outputs"]][:2] == ["medv", "medv_mean"]
    text = scrape(container.metrics_port)
    assert 'mcd_request_duration_seconds_count{code="OK",method="Predict",model="digits",version="1"} 1.0' in text  # fmt: skip
    assert 'mcd_request_duration_seconds_count{code="OK",method="ModelInfer",model="housing",version="1"} 1.0' in text  # fmt: skip
    assert 'provider="CPUExecutionProvider"' in text
    promtool = shutil.which("promtool")
    if promtool is not None:
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                               text=True, timeout=60, check=False)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr


def test_mounted_repository_replaces_the_baked_in_one(image: str) -> None:
    repository = Path(tempfile.mkdtemp(prefix="mcd-models-"))
    try:
        shutil.copytree(ROOT / "models" / "housing", repository / "housing")
        for path in (repository, *repository.rglob("*")):  # readable by the image's user
            path.chmod(0o755 if path.is_dir() else 0o644)
        mounted = start(image, "mcdropout-container-test-volume",
                        "--volume", f"{repository}:/models:ro")  # fmt: skip
        try:
            with Client(mounted.target) as client:
                listed = client.list_models(timeout=10)
            assert [m.name for m in listed] == ["housing"]
        finally:
            podman("rm", "--force", "--time", "0", mounted.name, check=False)
    finally:
        shutil.rmtree(repository)


def in_flight(metrics_port: int) -> float:
    for line in scrape(metrics_port).splitlines():
        if line.startswith('mcd_requests_in_flight{method="Predict"}'):
            return float(line.split()[-1])
    return 0.0


def test_sigterm_during_a_burst_fails_no_request(container: Container) -> None:
    """Runs last: it stops the module's container."""
    burst = 16
    images = np.random.default_rng(1).random((burst, 64, 1, 8, 8), np.float32)
    results: list[object] = [None] * burst
    done_at: list[float] = [0.0] * burst

    def call(i: int) -> None:
        try:
            with Client(container.target) as client:
                results[i] = client.predict("digits", images[i], num_samples=2000, timeout=60)
        except Exception as exc:
            results[i] = exc
        done_at[i] = time.monotonic()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(burst)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while in_flight(container.metrics_port) < burst // 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    signalled_at = time.monotonic()
    podman("kill", "--signal", "TERM", container.name)
    for t in threads:
        t.join(GRACE_PERIOD_S + 30)
    exit_code = podman("wait", container.name, timeout_s=GRACE_PERIOD_S + 30).stdout.strip()
    logs = container.logs()
    failed = [r for r in results if not isinstance(r, Prediction)]
    assert not failed, f"{len(failed)} of {burst} requests failed: {failed[:3]}\n{logs}"
    finished_after = sum(t > signalled_at for t in done_at)
    assert finished_after > 0, "no request was in flight at SIGTERM: the test proved nothing"
    assert exit_code == "0", logs
    assert "shutting down: health NOT_SERVING" in logs
    assert logs.rstrip().endswith("stopped")
