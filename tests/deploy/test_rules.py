"""The Prometheus configuration and alert rules, checked by promtool: syntax, and the alert unit
tests of deploy/prometheus/alerts_test.yml (promtool test rules)."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from service.settings import Settings
from tests.deploy.conftest import DEPLOY, tool

PROMETHEUS = DEPLOY / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    return tool("promtool", "apt-get install prometheus (make deploy-tools)")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def test_config_is_valid(promtool: str) -> None:
    result = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_are_valid(promtool: str) -> None:
    result = run(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing() -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "McdHighP99Latency", "McdHighErrorRate", "McdTargetDown", "McdNoModelReady",
        "McdModelMissingOnReplica", "McdQueueNearFull", "McdRestarting",
        "McdFileDescriptorsNearLimit", "McdGpuMemoryNearFull",
    }  # fmt: skip
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", ()) if t["exp_alerts"]}  # fmt: skip
    assert fired == alerts


def test_queue_capacity_is_the_default_admission_limit() -> None:
    """mcd:queue_capacity must follow --compute-workers + --max-queue-size."""
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    (expr,) = [r["expr"] for g in rules["groups"] for r in g["rules"]
               if r.get("record") == "mcd:queue_capacity"]  # fmt: skip
    match = re.fullmatch(r"vector\((\d+)\)", expr.strip())
    assert match is not None, expr
    defaults = Settings()
    assert int(match.group(1)) == defaults.compute_workers + defaults.max_queue_size
