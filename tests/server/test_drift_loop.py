"""Drift on real data closes the loop: a retraining job nobody submitted, then a promotion. A
real Prometheus then scrapes the application and finds every metric the dashboards and alert
rules query."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server.auth import Scope, issue_token
from tests.conftest import RAY_METRICS_PORT, Stack, free_port
from tests.deploy.test_metric_names import EXPRESSIONS, _metric_names
from tests.factories import read_sentiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Ray exports GPU utilisation only from nodes that have GPUs; this machine has none.
ONLY_ON_GPU_NODES = {"ray_node_gpus_utilization"}


@pytest.fixture(scope="module")
def drifted(stack: Stack) -> dict[str, Any]:
    """Train on Amazon reviews, then send Yelp reviews with labels; returns the drift report
    that started a retraining job."""
    # A champion that learnt little (four epochs at a low head rate: about 0.6 on Yelp), and
    # plenty of labelled Yelp traffic, so that the challenger wins on the held-out labels by a
    # clear margin. With eight epochs at 3e-3 the champion reached 0.81 on Yelp and the
    # challenger lost to it on one holdout draw in twelve; these settings won every draw by at
    # least 8 points.
    data = stack.data_file("drift-amazon.csv", read_sentiment("amazon").iloc[:150])
    spec = {
        "model_name": "drifting",
        "data": {"path": data, "validation_split": 0.2},
        "strategy": {"kind": "feature_extraction"},
        "hyperparameters": {"epochs": 4, "batch_size": 32, "head_lr": 1e-3},
        "monitoring": {
            "schedule_seconds": 2,
            "window_size": 150,
            "reference_size": 120,
            "retrain": {"min_window": 100, "cooldown_seconds": 0},
        },
    }
    first = stack.client.wait(stack.client.submit(spec)["id"], timeout=300)
    assert first["status"] == "SUCCEEDED", first["error"]

    yelp = read_sentiment("yelp").iloc[:480]
    texts, labels = yelp["text"].tolist(), yelp["label"].astype(str).tolist()
    for start in range(0, len(texts), 40):
        answer = stack.client.predict("drifting", texts[start : start + 40])
        stack.client.feedback(
            "drifting",
            labels=[
                {"prediction_id": p["id"], "label": y}
                for p, y in zip(answer["predictions"], labels[start : start + 40], strict=True)
            ],
        )

    def retrain_report() -> dict[str, Any] | None:
        reports = stack.client.drift_reports("drifting")
        return next((r for r in reports if r["retrain_job_id"]), None)

    stack.wait_for(lambda: retrain_report() is not None, 180, "a drift report with a retrain")
    report = retrain_report()
    assert report is not None
    return report


def test_drift_starts_a_retraining_job_that_gets_promoted(
    stack: Stack, drifted: dict[str, Any]
) -> None:
    assert drifted["drift_detected"]
    assert drifted["checks"]["embedding"]["detected"]

    retrain = stack.client.wait(drifted["retrain_job_id"], timeout=300)
    assert retrain["trigger"] == "retrain" and retrain["parent_version"] == 1
    assert retrain["status"] == "SUCCEEDED", retrain["error"]
    assert retrain["result"]["promotion"]["promote"], retrain["result"]["promotion"]["reason"]
    assert stack.client.model("drifting")["production_version"] == 2
    assert stack.client.predict("drifting", ["The pasta was cold."])["version"] == 2
    retrains = [
        j["id"] for j in stack.client.jobs(model_name="drifting") if j["trigger"] == "retrain"
    ]
    assert retrains == [retrain["id"]]

    html = httpx.get(f"{stack.url}/v1/drift/{drifted['id']}/report", headers=stack.auth, timeout=30)
    assert html.status_code == 200 and "<html" in html.text.lower()
    scraped = httpx.get(f"{stack.url}/metrics", headers=stack.auth, timeout=30).text
    assert 'tuneloop_drift_detected{check="embedding",model="drifting"} 1.0' in scraped
    assert 'tuneloop_retrains_total{model="drifting"} 1.0' in scraped


def test_stationary_traffic_raises_no_drift(stack: Stack) -> None:
    amazon = read_sentiment("amazon").sample(frac=1.0, random_state=3)
    data = stack.data_file("steady-amazon.csv", amazon.iloc[:500])
    spec = {
        "model_name": "steady",
        "data": {"path": data, "validation_split": 0.2},
        "strategy": {"kind": "feature_extraction"},
        "hyperparameters": {"epochs": 4, "batch_size": 32, "head_lr": 3e-3},
        "monitoring": {
            "schedule_seconds": 2,
            "window_size": 150,
            "reference_size": 300,
            "retrain": {"min_window": 100},
        },
    }
    job = stack.client.wait(stack.client.submit(spec)["id"], timeout=300)
    assert job["status"] == "SUCCEEDED", job["error"]
    stack.client.predict("steady", amazon["text"].iloc[500:650].tolist())
    stack.wait_for(lambda: bool(stack.client.drift_reports("steady")), 120, "a drift check")
    report = stack.client.drift_reports("steady")[0]
    assert not report["drift_detected"], report["checks"]
    assert report["retrain_job_id"] is None


@pytest.fixture
def prometheus(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus server scraping the application's /metrics, with a read token from a
    file as deploy/prometheus/prometheus.yml has it, and Ray's metrics port."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary; the project's set-up installs Debian's 'prometheus'")
    _, token = issue_token(stack.store, name="prometheus", scope=Scope.READ)
    (tmp_path / "tuneloop-metrics.token").write_text(token)
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "tuneloop",
                "authorization": {"credentials_file": "tuneloop-metrics.token"},
                "static_configs": [{"targets": [stack.url.removeprefix("http://")]}],
            },
            {"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{RAY_METRICS_PORT}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={address}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://{address}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_prometheus_scrapes_every_metric_the_dashboards_and_rules_use(
    stack: Stack, drifted: dict[str, Any], prometheus: str
) -> None:
    stack.client.wait(drifted["retrain_job_id"], timeout=300)
    stack.client.predict("drifting", ["One more request, so the serving series exist."])
    wanted = set().union(*(_metric_names(expr) for _, expr in EXPRESSIONS))
    wanted -= {"ALERTS"} | ONLY_ON_GPU_NODES  # ALERTS is Prometheus's own series

    def missing() -> set[str]:
        try:
            response = httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=10)
        except httpx.HTTPError:
            return wanted
        return wanted - set(response.json()["data"])

    try:
        stack.wait_for(lambda: not missing(), 90, "Prometheus to scrape every queried metric")
    finally:
        assert missing() == set()
