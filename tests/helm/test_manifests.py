"""Every rendered object is one the API server would accept.

Core kinds are checked against Kubernetes' own schemas (kubernetes-validate ships them), in
strict mode, which refuses unknown fields the API server would silently drop. Custom resources
are checked against the openAPIV3Schema of their CRD, cut down by schemas/extract.py; there too
unknown fields are refused, since KubeRay and the Prometheus Operator would drop them unread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version

SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRD_SCHEMAS = {
    ("ray.io/v1", "RayService"): "rayservice-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-v1.json",
}
# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest with schemas.
KUBE_VERSIONS = ["1.27.0", latest_version()]


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever the CRD lists the known ones."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if "properties" in schema:
        strict["properties"] = {name: _strict(sub) for name, sub in schema["properties"].items()}
        open_ended = "additionalProperties" in schema or schema.get(
            "x-kubernetes-preserve-unknown-fields"
        )
        if not open_ended:
            strict["additionalProperties"] = False
    return strict


@cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / CRD_SCHEMAS[(api_version, kind)]).read_text(encoding="utf-8"))
    return jsonschema.Draft7Validator(_strict(schema))


def _is_custom(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_core_objects_match_kubernetes_schemas(
    render: Callable[..., Any], scenario: str, kube_version: str
) -> None:
    core = [obj for obj in render(scenario=scenario).objects if not _is_custom(obj)]
    assert core, "every scenario renders core objects"

    for obj in core:
        try:
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            name = f"{obj['kind']}/{obj['metadata']['name']}"
            pytest.fail(f"{name} at {list(error.absolute_path)}: {error.message}")


def test_custom_resources_match_their_crd_schemas(
    render: Callable[..., Any], scenario: str
) -> None:
    custom = [obj for obj in render(scenario=scenario).objects if _is_custom(obj)]
    assert any(obj["kind"] == "RayService" for obj in custom)

    for obj in custom:
        errors = list(_crd_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj))
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert not errors, [f"{name} at {list(e.absolute_path)}: {e.message}" for e in errors]


def test_strict_crd_validation_refuses_a_misspelt_field(render: Callable[..., Any]) -> None:
    # Guards the guard: without _strict, a typo in the RayService would pass unnoticed.
    rayservice = render().find("RayService")
    misspelt = json.loads(json.dumps(rayservice))
    misspelt["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}

    assert not list(_crd_validator("ray.io/v1", "RayService").iter_errors(rayservice))
    assert list(_crd_validator("ray.io/v1", "RayService").iter_errors(misspelt))


def test_every_object_is_named_and_labelled_for_the_release(
    render: Callable[..., Any], scenario: str
) -> None:
    for obj in render(scenario=scenario).objects:
        labels = obj["metadata"].get("labels", {})
        name = f"{obj['kind']}/{obj['metadata']['name']}"

        assert labels.get("app.kubernetes.io/instance") == "tuneloop", name
        assert labels.get("app.kubernetes.io/name") == "tuneloop", name
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", name
        assert labels.get("helm.sh/chart", "").startswith("tuneloop-"), name
        assert len(obj["metadata"]["name"]) <= 63, name
