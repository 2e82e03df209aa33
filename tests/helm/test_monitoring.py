"""PodMonitors, the PrometheusRule and the dashboard ConfigMaps, each behind its own flag."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

Render = Callable[..., Any]
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MONITORING_KINDS = ("PodMonitor", "PrometheusRule", "ConfigMap")


def test_monitoring_objects_are_off_by_default(render: Render) -> None:
    rendering = render()

    assert [obj["kind"] for obj in rendering.objects if obj["kind"] in MONITORING_KINDS] == []


@pytest.mark.parametrize(
    ("flag", "kind"),
    [
        ("podMonitors", "PodMonitor"),
        ("prometheusRule", "PrometheusRule"),
        ("grafanaDashboards", "ConfigMap"),
    ],
)
def test_each_monitoring_flag_adds_only_its_own_objects(
    render: Render, flag: str, kind: str
) -> None:
    rendering = render({"monitoring": {flag: {"enabled": True}}})

    kinds = {obj["kind"] for obj in rendering.objects if obj["kind"] in MONITORING_KINDS}

    assert kinds == {kind}


def test_prometheus_rule_carries_the_alerts_file(render: Render) -> None:
    rule = render(scenario="monitoring-values").find("PrometheusRule")

    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))

    assert rule["spec"] == alerts
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_api_is_scraped_on_the_head_and_ray_metrics_on_every_ray_pod(render: Render) -> None:
    rendering = render(scenario="monitoring-values")
    api = rendering.find("PodMonitor", "tuneloop-api")
    ray = rendering.find("PodMonitor", "tuneloop-ray")
    cluster = rendering.find("RayService")["spec"]["rayClusterConfig"]
    ray_labels = cluster["headGroupSpec"]["template"]["metadata"]["labels"]

    assert api["spec"]["podMetricsEndpoints"] == [
        {
            "port": "serve",
            "path": "/metrics",
            "interval": "15s",
            # /metrics needs a read token: the metrics one, never the admin one.
            "authorization": {
                "type": "Bearer",
                "credentials": {"name": "tuneloop-api-tokens", "key": "metrics-token"},
            },
        }
    ]
    assert api["spec"]["selector"]["matchLabels"] == {**ray_labels, "ray.io/node-type": "head"}
    assert ray["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "interval": "15s"}]
    assert ray["spec"]["selector"]["matchLabels"] == ray_labels
    for monitor in (api, ray):
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_scraped_ports_are_named_on_the_ray_containers(render: Render) -> None:
    rendering = render(scenario="monitoring-values")
    ports_by_group = {
        group: {port["name"]: port["containerPort"] for port in container["ports"]}
        for group, container in rendering.ray_containers().items()
    }

    assert ports_by_group["head"]["serve"] == 8000
    assert all(ports["metrics"] == 8080 for ports in ports_by_group.values())


def test_each_dashboard_is_a_configmap_labelled_for_the_grafana_sidecar(render: Render) -> None:
    configmaps = render(scenario="monitoring-values").all("ConfigMap")
    sources = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))

    by_file = {name: cm for cm in configmaps for name in cm["data"]}

    assert sorted(by_file) == [source.name for source in sources]
    for source in sources:
        configmap = by_file[source.name]
        assert configmap["data"][source.name] == source.read_text(encoding="utf-8")
        assert json.loads(configmap["data"][source.name])["uid"] == source.stem
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["metadata"]["namespace"] == "monitoring"
        assert configmap["metadata"]["annotations"] == {"grafana_folder": "tuneloop"}


def test_dashboard_label_and_namespace_are_configurable(render: Render) -> None:
    values = {"enabled": True, "label": "dashboards", "labelValue": "tuneloop"}
    configmaps = render({"monitoring": {"grafanaDashboards": values}}).all("ConfigMap")

    assert configmaps
    for configmap in configmaps:
        assert configmap["metadata"]["labels"]["dashboards"] == "tuneloop"
        assert "grafana_dashboard" not in configmap["metadata"]["labels"]
        assert configmap["metadata"]["namespace"] == "ml"
