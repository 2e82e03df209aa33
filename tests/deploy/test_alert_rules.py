"""deploy/prometheus: the alert rules pass promtool's checks and unit tests, and every alert is
tested both firing and quiet."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian: apt-get install prometheus)",
)


def _promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _load(name: str) -> Any:
    return yaml.safe_load((PROMETHEUS / name).read_text(encoding="utf-8"))


def _alert_names() -> set[str]:
    return {rule["alert"] for group in _load("alerts.yml")["groups"] for rule in group["rules"]}


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    result = _promtool("check", "rules", "alerts.yml")

    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_rules_pass_promtool_unit_tests() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")

    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_local_prometheus_config_passes_promtool_check(tmp_path: Path) -> None:
    # promtool insists that the token file exists; the real one is made by each user and ignored
    # by git, so the config is checked in a copy of the folder with a stand-in.
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROMETHEUS / name, tmp_path / name)
    (tmp_path / "tuneloop-metrics.token").write_text("tl_000000000000_" + "A" * 43)

    result = _promtool("check", "config", "prometheus.yml", cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in _load("alerts_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])

    alerts = _alert_names()

    assert alerts - firing == set(), "alerts without a firing case in alerts_test.yml"
    assert alerts - quiet == set(), "alerts without a quiet case in alerts_test.yml"
    assert (firing | quiet) - alerts == set(), "alerts_test.yml tests alerts that do not exist"


def test_every_alert_has_a_severity_summary_and_description() -> None:
    for group in _load("alerts.yml")["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert rule["annotations"]["description"], rule["alert"]


def test_the_requested_alerts_exist() -> None:
    assert _alert_names() == {
        "TuneloopDriftDetected",
        "TuneloopDriftCheckStale",
        "TuneloopRetrainFailed",
        "TuneloopJobFailureRateHigh",
        "TuneloopPredictorErrorRateHigh",
        "TuneloopPredictorLatencyHigh",
    }


def test_local_prometheus_scrapes_the_api_and_loads_the_alerts() -> None:
    config = _load("prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}

    assert config["rule_files"] == ["alerts.yml"]
    assert jobs["tuneloop"]["metrics_path"] == "/metrics"
    assert jobs["tuneloop"]["authorization"] == {"credentials_file": "tuneloop-metrics.token"}
    assert jobs["tuneloop"]["static_configs"] == [{"targets": ["127.0.0.1:8000"]}]
    assert jobs["ray"]["static_configs"] == [{"targets": ["127.0.0.1:8080"]}]
