"""Every metric that an alert rule or a dashboard queries is one that really exists.

A misspelt metric does not fail a query, it returns nothing, so a dashboard stays empty and an
alert never fires. The expressions are parsed with a real PromQL parser and each selected metric
must be exported by tuneloop, by Ray (names and sources below), or by Prometheus itself.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import promql_parser
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# tuneloop's own metrics (monitoring/ defines them), by type.
TUNELOOP_GAUGES = {
    "tuneloop_jobs",
    "tuneloop_drift_score",
    "tuneloop_drift_detected",
    "tuneloop_drift_last_check_timestamp_seconds",
}
TUNELOOP_COUNTERS = {
    "tuneloop_jobs_finished_total",
    "tuneloop_epochs_total",
    "tuneloop_predictions_total",
    "tuneloop_prediction_log_dropped_total",
    "tuneloop_retrains_total",
    "tuneloop_promotions_total",
}
TUNELOOP_HISTOGRAMS = {"tuneloop_job_duration_seconds", "tuneloop_prediction_latency_seconds"}

# Ray 2.60.0's metrics used here. Ray exports each with a "ray_" prefix, a Counter with a
# "_total" suffix and a Histogram as _bucket/_sum/_count series. Each maps to the file under
# site-packages/ray that defines it and the name as written there; Serve's ingress metrics are
# defined once per protocol, and tuneloop's API is HTTP.
SERVE_INGRESS = "serve/_private/request_ingress_metrics.py"
NODE_GAUGES = "dashboard/modules/reporter/reporter_agent.py"
RAY_METRICS = {
    "ray_serve_num_http_requests_total": (SERVE_INGRESS, 'f"serve_num_{protocol_name}_requests"'),
    "ray_serve_num_http_error_requests_total": (
        SERVE_INGRESS,
        'f"serve_num_{protocol_name}_error_requests"',
    ),
    "ray_serve_http_request_latency_ms_bucket": (
        SERVE_INGRESS,
        'f"serve_{protocol_name}_request_latency_ms"',
    ),
    "ray_serve_deployment_replica_healthy": (
        "serve/_private/deployment_state.py",
        '"serve_deployment_replica_healthy"',
    ),
    "ray_node_cpu_utilization": (NODE_GAUGES, '"node_cpu_utilization"'),
    "ray_node_mem_used": (NODE_GAUGES, '"node_mem_used"'),
    "ray_node_mem_total": (NODE_GAUGES, '"node_mem_total"'),
    "ray_node_gpus_utilization": (NODE_GAUGES, '"node_gpus_utilization"'),
}
# Written by Prometheus for every alerting rule it evaluates; the drift dashboard shows it.
PROMETHEUS_METRICS = {"ALERTS"}

ALLOWED = (
    TUNELOOP_GAUGES
    | TUNELOOP_COUNTERS
    | {f"{name}_{suffix}" for name in TUNELOOP_HISTOGRAMS for suffix in ("bucket", "sum", "count")}
    | set(RAY_METRICS)
    | PROMETHEUS_METRICS
)

# Grafana replaces these before a query reaches Prometheus.
GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b")
GRAFANA_VARIABLE = re.compile(r"\$\{?\w+(:\w+)?\}?")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*\w+\)$")


def _grafana_to_promql(expr: str) -> str:
    return GRAFANA_VARIABLE.sub("x", GRAFANA_INTERVALS.sub("5m", expr))


def _rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    return [
        (f"alerts.yml {rule['alert']}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def _dashboard_expressions() -> list[tuple[str, str]]:
    found = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        for panel in panels:
            for target in panel["targets"]:
                found.append((f"{path.name} {panel['title']}", target["expr"]))
        for annotation in dashboard["annotations"]["list"]:
            if "expr" in annotation:
                found.append((f"{path.name} annotation {annotation['name']}", annotation["expr"]))
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                match = LABEL_VALUES.match(variable["definition"])
                assert match, f"{path.name}: variable {variable['name']} is not label_values()"
                found.append((f"{path.name} variable {variable['name']}", match["selector"]))
    return [(where, _grafana_to_promql(expr)) for where, expr in found]


def _metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None:
                equal = [
                    m.value
                    for m in node.matchers.matchers
                    if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal
                ]
                assert equal, f"{expr!r} selects metrics by a pattern; name them instead"
                name = equal[0]
            names.add(name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


EXPRESSIONS = _rule_expressions() + _dashboard_expressions()


@pytest.mark.parametrize(("where", "expr"), EXPRESSIONS, ids=[w for w, _ in EXPRESSIONS])
def test_every_queried_metric_is_exported(where: str, expr: str) -> None:
    names = _metric_names(expr)

    assert names, f"{where}: {expr!r} selects no metric"
    assert names <= ALLOWED, f"{where}: unknown metrics {sorted(names - ALLOWED)}"


def test_every_tuneloop_metric_appears_on_a_dashboard() -> None:
    used = set().union(*(_metric_names(expr) for _, expr in _dashboard_expressions()))
    # A histogram is on a dashboard when any of its series is.
    bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}

    tuneloop = TUNELOOP_GAUGES | TUNELOOP_COUNTERS | TUNELOOP_HISTOGRAMS

    assert tuneloop - used - bases == set()


def test_the_parser_finds_names_in_nested_expressions() -> None:
    expr = 'sum(rate(a_total[5m])) / on() group_left max({__name__="b"}) + time() - c offset 1h'

    assert _metric_names(expr) == {"a_total", "b", "c"}


@pytest.mark.parametrize(
    ("source", "definition"),
    [RAY_METRICS[name] for name in sorted(RAY_METRICS)],
    ids=sorted(RAY_METRICS),
)
def test_ray_metrics_are_defined_in_the_installed_ray(source: str, definition: str) -> None:
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed")

    text = (Path(spec.origin).parent / source).read_text(encoding="utf-8")

    assert definition in text, f"{definition} is no longer defined in ray/{source}"
