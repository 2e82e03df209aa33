"""Rendering the chart with Helm's own engine (the Go SDK, through helm-python-sdk), offline.

A scenario is the chart's defaults plus one file of helm/tuneloop/ci/, as `helm install -f` would
apply it; "default" is the defaults alone. Tests reach everything here through fixtures.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tuneloop"
RELEASE = "tuneloop"
NAMESPACE = "ml"


def _scenarios() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {"default": {}}
    for path in sorted((CHART / "ci").glob("*.yaml")):
        found[path.stem] = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return found


SCENARIOS = _scenarios()


@dataclass
class Rendering:
    """What one `helm template` gives: the files and the objects parsed from them."""

    files: dict[str, str]
    objects: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.objects = []
        for path, text in self.files.items():
            if not path.endswith("NOTES.txt"):
                self.objects += [doc for doc in yaml.safe_load_all(text) if doc]

    @property
    def notes(self) -> str:
        return self.files[f"{CHART.name}/templates/NOTES.txt"]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def find(self, kind: str, name: str | None = None) -> dict[str, Any]:
        """The one object of that kind (and name); fails the test unless there is exactly one."""
        found = [obj for obj in self.all(kind) if name is None or obj["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def secret_value(self, name: str, key: str) -> str:
        return base64.b64decode(self.find("Secret", name)["data"][key]).decode()

    def pod_specs(self) -> dict[str, dict[str, Any]]:
        """Pod spec of the Ray head ("head") and of each worker group, by group name."""
        cluster = self.find("RayService")["spec"]["rayClusterConfig"]
        specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
        for group in cluster.get("workerGroupSpecs", []):
            specs[group["groupName"]] = group["template"]["spec"]
        return specs

    def ray_containers(self) -> dict[str, dict[str, Any]]:
        return {name: spec["containers"][0] for name, spec in self.pod_specs().items()}

    def env(self, group: str = "head") -> dict[str, dict[str, Any]]:
        """Environment of a Ray container, by variable name."""
        return {item["name"]: item for item in self.ray_containers()[group].get("env", [])}


@pytest.fixture(scope="session")
def chart() -> Iterator[helm_python.Chart]:
    with helm_python.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render(chart: helm_python.Chart) -> Callable[..., Rendering]:
    """Render with values layered over one scenario's, as `-f ci/<scenario>.yaml --set ...`."""
    cache: dict[str, Rendering] = {}

    def _render(values: dict[str, Any] | None = None, scenario: str = "default") -> Rendering:
        if values is None and scenario in cache:
            return cache[scenario]
        merged = _deep_merge(SCENARIOS[scenario], values or {})
        rendering = Rendering(
            chart.render(values=merged, name=RELEASE, namespace=NAMESPACE, is_install=True)
        )
        if values is None:
            cache[scenario] = rendering
        return rendering

    return _render


@pytest.fixture(params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def scenario_values(scenario: str) -> dict[str, Any]:
    return SCENARIOS[scenario]


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
