"""NOTES.txt tells the user where the API, the token, the dashboards and the alerts are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Render = Callable[..., Any]


def test_notes_tell_how_to_reach_the_api_and_read_the_token(render: Render) -> None:
    notes = render().notes

    assert "kubectl -n ml port-forward svc/tuneloop-api 8000:8000" in notes
    assert "http://tuneloop-api.ml.svc:8000" in notes
    assert "kubectl -n ml get secret tuneloop-api-tokens \\\n" in notes
    assert "-o jsonpath='{.data.admin-token}' | base64 -d" in notes
    assert "tuneloop tokens create --name <who>" in notes
    assert "svc/tuneloop-head-svc 8265:8265" in notes


def test_notes_give_the_ingress_url_and_where_dashboards_and_alerts_appear(
    render: Render,
) -> None:
    notes = render(scenario="monitoring-values").notes

    assert "https://tuneloop.example.com/" in notes
    assert "PodMonitors tuneloop-api" in notes
    assert "PrometheusRule tuneloop" in notes
    assert "ConfigMaps labelled grafana_dashboard=1\n  in namespace monitoring" in notes
    assert '"tuneloop / Drift and retraining"' in notes


def test_notes_say_how_to_turn_monitoring_on_when_it_is_off(render: Render) -> None:
    notes = render().notes

    for flag in ("podMonitors", "prometheusRule", "grafanaDashboards"):
        assert f"monitoring.{flag}.enabled=true" in notes


def test_notes_warn_when_datasets_have_no_shared_volume(render: Render) -> None:
    notes = render(scenario="s3-values").notes

    assert "Artifacts: s3://tuneloop-artifacts/prod" in notes
    assert "WARNING: persistence.enabled is false" in notes


def test_notes_name_an_existing_token_secret(render: Render) -> None:
    notes = render(scenario="external-db-values").notes

    assert "From the Secret tuneloop-api-tokens: the admin token under key admin," in notes
    assert "-o jsonpath='{.data.admin}'" in notes
    assert "URL from Secret tuneloop-db" in notes
