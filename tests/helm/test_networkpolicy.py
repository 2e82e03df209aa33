"""The NetworkPolicies keep Ray's internal ports (GCS 6379, client 10001, dashboard 8265) and
the database inside the release, with the dashboard open to the KubeRay operator alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Render = Callable[..., Any]
RAY_PODS = {
    "podSelector": {
        "matchLabels": {
            "app.kubernetes.io/name": "tuneloop",
            "app.kubernetes.io/instance": "tuneloop",
            "app.kubernetes.io/component": "ray",
        }
    }
}
KUBERAY_OPERATOR = [
    {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
    }
]
INTERNAL_PORTS = {6379, 10001, 8265}
OPEN_PORTS = {8000, 8080}


def _ray_policy(rendering: Any) -> dict[str, Any]:
    return rendering.find("NetworkPolicy", "tuneloop-ray")


def test_ray_policy_selects_the_ray_pods(render: Render, scenario: str) -> None:
    policy = _ray_policy(render(scenario=scenario))

    assert policy["spec"]["podSelector"] == RAY_PODS["podSelector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_only_the_api_and_metrics_ports_admit_peers_outside_the_release(
    render: Render, scenario: str
) -> None:
    policy = _ray_policy(render(scenario=scenario))

    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from")
        if peers == [RAY_PODS]:
            continue  # the release's own Ray pods: every port
        ports = {p["port"] for p in rule.get("ports", [])}
        assert ports, f"a rule admitting {peers or 'anyone'} must name its ports"
        if ports & INTERNAL_PORTS:
            assert ports == {8265} and peers == KUBERAY_OPERATOR, rule
        else:
            assert ports <= OPEN_PORTS, rule


def test_dashboard_stays_closed_when_no_operator_peers_are_given(render: Render) -> None:
    policy = _ray_policy(render({"networkPolicy": {"operator": []}}))

    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}

    assert ports == OPEN_PORTS


def test_api_and_metrics_peers_are_configurable(render: Render) -> None:
    rules = _ray_policy(render(scenario="monitoring-values"))["spec"]["ingress"]
    release_pods = {
        "podSelector": {
            "matchLabels": {
                "app.kubernetes.io/name": "tuneloop",
                "app.kubernetes.io/instance": "tuneloop",
            }
        }
    }

    by_port = {rule["ports"][0]["port"]: rule.get("from") for rule in rules if "ports" in rule}

    # The release's own pods (the `helm test` pod) keep access to the API.
    assert by_port[8000] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        release_pods,
    ]
    assert by_port[8080] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_database_admits_only_the_ray_pods_on_its_port(render: Render) -> None:
    policy = render().find("NetworkPolicy", "tuneloop-postgresql")

    assert policy["spec"]["ingress"] == [
        {"from": [RAY_PODS], "ports": [{"protocol": "TCP", "port": 5432}]}
    ]


def test_policies_can_be_turned_off(render: Render) -> None:
    assert render({"networkPolicy": {"enabled": False}}).all("NetworkPolicy") == []
