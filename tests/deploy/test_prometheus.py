"""Monitoring for real: a Prometheus (the Debian package) on loopback scrapes the running server
with the job and rules of deploy/prometheus/, answers docs/deploy.md's p99 latency query and every
query of the Grafana dashboard; promtool finds no problem in the exposition text."""

from __future__ import annotations

import json
import math
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mcdropout_client import Client, InvalidArgumentError, NotFoundError
from tests.deploy.conftest import DEPLOY, free_port, scrape, tool
from tests.support.server import RunningServer
from tools.launcher import ChildProcess

P99_QUERY = (  # docs/deploy.md's query
    "histogram_quantile(0.99, sum by (le, model) "
    '(rate(mcd_request_duration_seconds_bucket{method="Predict"}[5m])))'
)
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "mcdropout.json"
# Grafana's variables, as the dashboard shows all models over a one-minute window.
VARIABLES = {"$__rate_interval": "1m", "$model": ".*"}
QUERY_TIMEOUT_S = 60.0


def send_requests(client: Client) -> None:
    """One round of traffic: both models, plus calls that fail (for the errors panel)."""
    rng = np.random.default_rng()
    client.predict("tiny_cls", {"x": rng.normal(size=(4, 6)).astype(np.float32)}, num_samples=50)
    client.predict("tiny_reg", {"features": rng.normal(size=(2, 5)).astype(np.float32)})
    # NOT_FOUND (the model's metadata), then INVALID_ARGUMENT (a wrong shape, from Predict)
    with pytest.raises(NotFoundError):
        client.predict("no_such_model", {"features": np.zeros((1, 5), np.float32)})
    with pytest.raises(InvalidArgumentError):
        client.predict("tiny_reg", {"features": np.zeros((1, 4), np.float32)})


class Traffic:
    """Requests every 20 ms in a thread while the test queries (bounded in count and time)."""

    def __init__(self, target: str, max_rounds: int = 3000) -> None:
        self._target = target
        self._max_rounds = max_rounds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            with Client(self._target) as client:
                for _ in range(self._max_rounds):
                    send_requests(client)
                    if self._stop.wait(0.02):
                        return
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=promql)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, promql: str, timeout_s: float = QUERY_TIMEOUT_S) -> list[dict[str, Any]]:
        """Poll until the query has a finite sample (the first scrape comes after seconds)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(promql)
            if any(math.isfinite(float(r["value"][1])) for r in result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no finite answer in {timeout_s} s to {promql}: {result}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(deploy_server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:  # fmt: skip
    binary = tool("prometheus", "apt-get install prometheus (make deploy-tools)")
    workdir = tmp_path_factory.mktemp("prometheus")
    # deploy/prometheus/prometheus.yml with the test's target, a fast scrape and the rules.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "prometheus" / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{deploy_server.metrics_port}"]}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [binary, f"--config.file={workdir / 'prometheus.yml'}",
               f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    server = Prometheus(port)

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    with ChildProcess("prometheus", command, log_path=workdir / "prometheus.log") as process:
        process.wait_until(ready, timeout_s=30)
        yield server


@pytest.fixture(scope="module")
def traffic(deploy_server: RunningServer) -> Iterator[Traffic]:
    with Traffic(deploy_server.target) as running:
        yield running
    assert running.error is None, repr(running.error)


def test_exposition_passes_promtool_check_metrics(deploy_server: RunningServer) -> None:
    promtool = tool("promtool", "apt-get install prometheus (make deploy-tools)")
    with Client(deploy_server.target) as client:
        send_requests(client)
    text = scrape(deploy_server.metrics_port)
    assert 'mcd_request_duration_seconds_bucket{code="OK",le="0.0005",method="Predict",model="tiny_cls",version="1"}' in text  # fmt: skip
    result = subprocess.run(
        [promtool, "check", "metrics"],
        input=text, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    problems = result.stdout + result.stderr
    assert result.returncode == 0, problems
    assert problems.strip() == ""


def test_p99_latency_query_answers(
    prometheus: Prometheus, traffic: Traffic, record_property: pytest.RecordProperty
) -> None:
    result = prometheus.wait_for(P99_QUERY)
    by_model = {r["metric"]["model"]: float(r["value"][1]) for r in result}
    record_property("p99_s", by_model)
    assert 0 < by_model["tiny_cls"] < 60, by_model
    targets = prometheus.get("/api/v1/targets")["activeTargets"]
    assert [t["labels"]["job"] for t in targets] == ["mcdropout"]
    assert targets[0]["health"] == "up", targets


def test_recording_rules_evaluate(prometheus: Prometheus, traffic: Traffic) -> None:
    p99 = prometheus.wait_for('mcd:request_duration_seconds:p99_5m{model="tiny_cls",method="Predict"}')  # fmt: skip
    assert p99[0]["metric"]["job"] == "mcdropout"
    assert prometheus.wait_for("mcd:queue_capacity")[0]["value"][1] == "65"
    # INVALID_ARGUMENT and NOT_FOUND are the client's: no server-side error rate.
    assert prometheus.query("mcd:request_errors:ratio_rate5m > 0") == []
    groups = prometheus.get("/api/v1/rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 14
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]  # fmt: skip
    firing = [r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"]
    assert firing == [], firing


#: Panels whose series exist only on CUDA hosts (NVML).
GPU_PANELS = {"GPU memory"}


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    targets = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            targets.append((panel["title"], expr))
    return targets


def test_every_dashboard_query_answers(prometheus: Prometheus, traffic: Traffic) -> None:
    targets = dashboard_targets()
    assert len(targets) >= 15
    for title, expr in targets:
        assert "$" not in expr, f"{title}: unknown variable in {expr}"
        if title in GPU_PANELS:  # no GPU here: the query must parse, its answer is empty
            assert prometheus.query(expr) == [], title
            continue
        result = prometheus.wait_for(expr)
        if title == "Errors by code":  # the client-side codes the traffic provokes
            codes = {r["metric"]["code"] for r in result}
            assert codes == {"NOT_FOUND", "INVALID_ARGUMENT"}, codes
    models = prometheus.get("/api/v1/label/model/values", **{"match[]": "mcd_model_info"})
    assert models == ["tiny_cls", "tiny_reg"]


def test_dashboard_and_provisioning_fit_together() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "model"}
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [chr(65 + i) for i in range(len(panel["targets"]))]  # fmt: skip
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]  # fmt: skip
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "mcdropout.yml").read_text())["providers"]  # fmt: skip
    compose = yaml.safe_load((Path(DEPLOY).parent / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
