"""The values combinations the chart refuses, each with a message naming the value at fault."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import helm_python
import pytest

CASES: dict[str, tuple[dict[str, Any], str]] = {
    "both-databases": (
        {"database": {"external": {"enabled": True, "existingSecret": "db"}}},
        "database.bundled.enabled and database.external.enabled are both true",
    ),
    "no-database": (
        {"database": {"bundled": {"enabled": False}}},
        "no database: set database.bundled.enabled=true, or database.external.enabled=true",
    ),
    "external-database-without-secret": (
        {"database": {"bundled": {"enabled": False}, "external": {"enabled": True}}},
        "database.external.existingSecret must name a Secret holding the database URL",
    ),
    "s3-without-bucket": (
        {"artifacts": {"s3": {"enabled": True}}},
        "artifacts.s3.bucket must be set when artifacts.s3.enabled is true",
    ),
    "no-artifact-store": (
        {"persistence": {"enabled": False}},
        "artifacts have nowhere to go: set artifacts.s3.enabled=true",
    ),
    "volume-not-shareable": (
        {"persistence": {"accessModes": ["ReadWriteOnce"]}},
        "persistence.accessModes must include ReadWriteMany, since the head and the workers mount "
        "the volume together; got [ReadWriteOnce]",
    ),
    "fewer-max-than-min-workers": (
        {"ray": {"workers": {"cpu": {"minReplicas": 5, "maxReplicas": 2}}}},
        "ray.workers.cpu.minReplicas (5) is greater than ray.workers.cpu.maxReplicas (2)",
    ),
    "gpu-group-fewer-max-than-min": (
        {"ray": {"workers": {"gpu": {"enabled": True, "minReplicas": 3, "maxReplicas": 1}}}},
        "ray.workers.gpu.minReplicas (3) is greater than ray.workers.gpu.maxReplicas (1)",
    ),
    "one-key-for-both-tokens": (
        {"apiTokens": {"metricsKey": "admin-token"}},
        'apiTokens.adminKey and apiTokens.metricsKey are both "admin-token"',
    ),
    "ingress-without-hosts": (
        {"ingress": {"enabled": True, "hosts": []}},
        "ingress.hosts must list at least one host when ingress.enabled is true",
    ),
}


@pytest.mark.parametrize(("values", "message"), CASES.values(), ids=CASES.keys())
def test_inconsistent_values_fail_naming_the_value(
    render: Callable[..., Any], values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render(values)


def test_existing_claim_needs_no_access_modes(render: Callable[..., Any]) -> None:
    # The claim exists already; its access modes are the storage admin's business.
    rendering = render(
        {"persistence": {"existingClaim": "shared", "accessModes": ["ReadWriteOnce"]}}
    )

    assert rendering.all("PersistentVolumeClaim") == []
