"""The `helm test` pod checks the API's /healthz through the API Service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Render = Callable[..., Any]


def test_helm_test_pod_calls_healthz_on_the_api_service(render: Render) -> None:
    pod = render().find("Pod", "tuneloop-test-api")
    container = pod["spec"]["containers"][0]

    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    assert container["image"] == "tuneloop:0.1.0"
    assert "http://tuneloop-api:8000/healthz" in container["command"][-1]


def test_helm_test_pod_runs_without_privileges(render: Render) -> None:
    pod = render().find("Pod", "tuneloop-test-api")

    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
