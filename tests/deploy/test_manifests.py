"""Kubernetes and KServe manifests and the compose file, offline.

Core kinds (Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget) are validated
strictly (unknown fields rejected) with kubernetes-validate against the oldest Kubernetes the
manifests target and the newest it knows. kubernetes-validate has no schema for custom
resources (PodMonitor, ServingRuntime, InferenceService, Kustomization): their container specs
are validated as core containers inside a Pod, the rest by the required fields and the
references between the files (labels, ports, names, settings).
"""

from __future__ import annotations

import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from service import metrics
from service.settings import ENV_PREFIX, Settings, load_settings
from tests.deploy.conftest import DEPLOY, ROOT

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate not installed: pip install -e '.[dev]'"
)

K8S = DEPLOY / "kubernetes"
KSERVE = DEPLOY / "kserve"
# Native gRPC probes are GA since 1.27; 1.30 is the oldest release still maintained by
# the main cloud providers when this was written.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CORE_FILES = ("deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml")
KSERVE_MODEL_FIELDS = ("runtime", "modelFormat", "protocolVersion", "storageUri", "storage")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def resources() -> dict[tuple[str, str], dict[str, Any]]:
    """Every resource of deploy/kubernetes and deploy/kserve by (kind, name)."""
    found = {}
    for path in (*K8S.glob("*.yaml"), *KSERVE.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "prometheus-adapter-values.yaml"):
            continue
        for doc in documents(path):
            found[doc["kind"], doc["metadata"]["name"]] = doc
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", ())}


def check_settings(env: dict[str, str]) -> Settings:
    """Every MCD_* variable names a real setting and the server accepts its value."""
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)}
    unknown = {name for name in env if name.startswith(ENV_PREFIX)} - known
    assert not unknown, f"not settings of the server: {unknown}"
    return load_settings([], env)


def validate_as_pod(containers: list[dict[str, Any]]) -> None:
    """Validate container specs of a custom resource against the core Container schema."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
           "spec": {"containers": containers}}  # fmt: skip
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", CORE_FILES)
def test_core_manifests_validate_strictly(name: str, version: str) -> None:
    docs = documents(K8S / name)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_a_typo() -> None:
    """The validation above is not vacuous."""
    (deployment,) = documents(K8S / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["startupProbe"]["grpc"]["servce"] = ""
    with pytest.raises(kubernetes_validate.ValidationError, match="servce"):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)


def test_deployment_serves_grpc_on_a_gpu_with_probes() -> None:
    deployment = resources()["Deployment", "mcdropout"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = check_settings(env_of(container))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "http": settings.http_port, "grpc": settings.grpc_port, "metrics": settings.metrics_port,
        "health": settings.health_port,
    }  # fmt: skip
    assert settings.host == "0.0.0.0"
    assert settings.device == "gpu"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    # Start-up on gRPC health, on the plaintext health port (the kubelet's gRPC probes speak no
    # TLS); readiness and liveness on KServe v2's routes, over HTTPS with the same certificate.
    assert settings.tls_cert_file is not None
    assert container["startupProbe"]["grpc"] == {"port": settings.health_port, "service": ""}
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/v2/health/ready",
        "port": "http",
        "scheme": "HTTPS",
    }
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/v2/health/live",
        "port": "http",
        "scheme": "HTTPS",
    }
    # SIGKILL only after the preStop pause and the server's own drain and grace periods.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    stop_s = pause + settings.drain_period_s + settings.grace_period_s
    assert pod["terminationGracePeriodSeconds"] > stop_s
    # The image's user (Dockerfile: USER 10001:10001).
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    # The admission limit the queue alert divides by.
    assert settings.compute_workers + settings.max_queue_size == 65


def test_deployment_mounts_the_tls_and_token_secrets_the_settings_name() -> None:
    pod = resources()["Deployment", "mcdropout"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = check_settings(env_of(container))
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert {s["secretName"] for s in secrets.values()} == {"mcdropout-tls", "mcdropout-auth"}
    mounted = {}
    for name, secret in secrets.items():
        assert mounts[name]["readOnly"] is True
        # Readable by the server's group (fsGroup), by no one else.
        assert secret["defaultMode"] == 0o440
        assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
        mounted[secret["secretName"]] = Path(mounts[name]["mountPath"])
    # The keys of a kubernetes.io/tls secret, and the token file's key of mcdropout-auth.
    assert settings.tls_cert_file == mounted["mcdropout-tls"] / "tls.crt"
    assert settings.tls_key_file == mounted["mcdropout-tls"] / "tls.key"
    assert settings.auth_token_file == mounted["mcdropout-auth"] / "tokens"
    text = (K8S / "deployment.yaml").read_text()
    assert "kubectl create secret tls mcdropout-tls" in text
    assert "kubectl create secret generic mcdropout-auth --from-file=tokens=" in text
    # Mutual TLS is one uncommented variable away, on the same secret's ca.crt.
    assert f"value: {mounted['mcdropout-tls'] / 'ca.crt'}" in text


def test_services_hpa_pdb_point_at_the_deployment() -> None:
    found = resources()
    deployment = found["Deployment", "mcdropout"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}  # fmt: skip
    services = [doc for (kind, _), doc in found.items() if kind == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"mcdropout", "mcdropout-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert found["Service", "mcdropout-headless"]["spec"]["clusterIP"] == "None"
    hpa = found["HorizontalPodAutoscaler", "mcdropout"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "mcdropout"}  # fmt: skip
    assert hpa["minReplicas"] >= 2
    (pods_metric,) = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
    assert f"# TYPE {pods_metric} gauge" in metrics.exposition().decode()
    adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == pods_metric
    assert rule["seriesQuery"].startswith(pods_metric + "{")
    pdb = found["PodDisruptionBudget", "mcdropout"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_podmonitor_scrapes_the_metrics_port_as_job_mcdropout() -> None:
    found = resources()
    monitor = found["PodMonitor", "mcdropout"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    labels = found["Deployment", "mcdropout"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    # The alert rules select job="mcdropout", the job of deploy/prometheus/prometheus.yml.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert labels[monitor["spec"]["jobLabel"]] == prometheus["scrape_configs"][0]["job_name"]


def test_kustomization_lists_every_manifest_and_sets_the_image() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}  # fmt: skip
    assert listed == present
    image = resources()["Deployment", "mcdropout"]["spec"]["template"]["spec"]["containers"][0]["image"]  # fmt: skip
    assert [i["name"] for i in kustomization["images"]] == [image.split(":")[0]]


def test_kserve_runtime_speaks_open_inference_protocol_over_rest_and_grpc() -> None:
    found = resources()
    runtime = found["ServingRuntime", "mcdropout"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["v2", "grpc-v2"]
    assert spec["multiModel"] is False
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe expects
    validate_as_pod(spec["containers"])
    settings = check_settings(env_of(container))
    assert str(settings.model_repository) == "/mnt/models"  # where KServe puts storageUri
    ports = [(p["name"], p["containerPort"]) for p in container["ports"]]
    assert ports == [("http1", settings.http_port), ("h2c", settings.grpc_port)]
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/v2/health/ready", "port": settings.http_port,
    }  # fmt: skip
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(settings.metrics_port)


def test_inference_service_uses_the_runtime() -> None:
    found = resources()
    runtime = found["ServingRuntime", "mcdropout"]["spec"]
    (service,) = [doc for (kind, _), doc in found.items() if kind == "InferenceService"]
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == "mcdropout"
    formats = {(f["name"], f["version"]) for f in runtime["supportedModelFormats"]}
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats
    assert model["protocolVersion"] in runtime["protocolVersions"]
    assert model["protocolVersion"] == "grpc-v2"
    assert model["storageUri"]
    assert model["ports"] == runtime["containers"][0]["ports"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The rest of the model spec is a core container.
    container = {k: v for k, v in model.items() if k not in KSERVE_MODEL_FIELDS}
    validate_as_pod([{"name": "kserve-container", **container}])
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"


def test_compose_wires_server_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"mcdropout", "prometheus", "grafana"}
    server = services["mcdropout"]
    assert (ROOT / server["build"]["context"] / "Dockerfile").is_file()
    settings = check_settings({k: str(v) for k, v in server["environment"].items()})
    published = {int(p.rsplit(":", 1)[1]) for p in server["ports"]}
    assert published == {8000, 8001, 8002}  # the image's MCD_HTTP/GRPC/METRICS_PORT
    stop_s = int(server["stop_grace_period"].rstrip("s"))
    assert stop_s > settings.drain_period_s + settings.grace_period_s
    for service in services.values():  # every mounted host path exists
        for volume in service.get("volumes", ()):
            assert (ROOT / volume.split(":")[0]).exists(), volume
    # TLS and tokens from compose secrets (files made by deploy/secrets/make-dev-secrets.sh),
    # mounted at /run/secrets/<name>; the health check asks the plaintext health port.
    declared = compose["secrets"]
    assert set(server["secrets"]) == set(declared)
    for name in server["secrets"]:
        assert declared[name]["file"].startswith("./deploy/secrets/"), name
    in_container = {f"/run/secrets/{name}" for name in server["secrets"]}
    for path in (settings.tls_cert_file, settings.tls_key_file, settings.auth_token_file):
        assert str(path) in in_container, path
    assert settings.health_port > 0
    assert settings.health_port not in published
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (target,) = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == "mcdropout:8002"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    gpu = yaml.safe_load((DEPLOY / "docker-compose.gpu.yml").read_text())["services"]["mcdropout"]
    assert check_settings(gpu["environment"]).device == "gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]


def test_the_compose_secrets_script_makes_credentials_the_server_accepts(tmp_path: Path) -> None:
    """deploy/secrets/make-dev-secrets.sh writes every file docker-compose.yml mounts, and the
    server takes them: certificate and key match, the CA parses, the token file has a token."""
    from service.protocol.auth import BearerTokens
    from service.protocol.tls import ServerCertificates
    from tests.deploy.conftest import tool

    tool("openssl", "apt-get install openssl")
    script = DEPLOY / "secrets" / "make-dev-secrets.sh"
    subprocess.run([str(script), str(tmp_path)], check=True, capture_output=True, timeout=60)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for secret in compose["secrets"].values():
        assert (tmp_path / Path(secret["file"]).name).is_file(), secret
    certificates = ServerCertificates(
        tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    )
    assert certificates.mutual
    BearerTokens(tmp_path / "tokens")
    # The generated files are never committed.
    ignored = (DEPLOY / "secrets" / ".gitignore").read_text().splitlines()
    assert "*" in ignored
