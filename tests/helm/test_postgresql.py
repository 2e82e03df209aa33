"""The bundled PostgreSQL: its Secret, Service and StatefulSet agree with each other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

Render = Callable[..., Any]


def test_database_url_points_at_the_bundled_service_with_the_generated_password(
    render: Render,
) -> None:
    rendering = render()
    service = rendering.find("Service", "tuneloop-postgresql")

    url = urlsplit(rendering.secret_value("tuneloop-postgresql", "url"))
    password = rendering.secret_value("tuneloop-postgresql", "password")

    assert url.scheme == "postgresql+psycopg"
    assert (url.hostname, url.port) == ("tuneloop-postgresql.ml.svc", 5432)
    assert service["spec"]["ports"][0]["port"] == 5432
    assert url.username == "tuneloop" and url.path == "/tuneloop"
    assert unquote(url.password or "") == password and len(password) == 32


def test_a_given_password_is_escaped_in_the_url(render: Render) -> None:
    password = "p@ss w/rd:+%"
    rendering = render({"database": {"bundled": {"password": password}}})

    url = urlsplit(rendering.secret_value("tuneloop-postgresql", "url"))

    assert unquote(url.password or "") == password
    assert url.hostname == "tuneloop-postgresql.ml.svc"


def test_service_selects_the_statefulset_pods_only(render: Render) -> None:
    rendering = render()
    service = rendering.find("Service", "tuneloop-postgresql")
    statefulset = rendering.find("StatefulSet", "tuneloop-postgresql")

    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]

    assert service["spec"]["selector"] == pod_labels
    assert statefulset["spec"]["selector"]["matchLabels"] == pod_labels
    assert pod_labels["app.kubernetes.io/component"] == "database"


def test_postgres_reads_its_password_from_the_secret_and_keeps_data_on_a_volume(
    render: Render,
) -> None:
    statefulset = render().find("StatefulSet", "tuneloop-postgresql")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]

    env = {item["name"]: item for item in container["env"]}
    [claim] = statefulset["spec"]["volumeClaimTemplates"]

    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "tuneloop-postgresql",
        "key": "password",
    }
    assert env["PGDATA"]["value"].startswith(container["volumeMounts"][0]["mountPath"] + "/")
    assert claim["metadata"]["name"] == container["volumeMounts"][0]["name"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_external_database_renders_no_postgresql(render: Render) -> None:
    rendering = render(scenario="external-db-values")

    names = [obj["metadata"]["name"] for obj in rendering.objects]

    assert not [name for name in names if "postgresql" in name]
