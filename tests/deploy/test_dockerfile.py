"""deploy/Dockerfile agrees with the project's pins and with what the Helm chart assumes."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text(encoding="utf-8")


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, f"ARG {name} has no default"
    return match[1]


def _pin(package: str) -> str:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for requirement in project["dependencies"]:
        match = re.fullmatch(rf"{package}(\[[\w,]+\])?==(\S+)", requirement)
        if match:
            return match[2]
    raise AssertionError(f"pyproject.toml does not pin {package}")


def test_base_image_is_the_cpu_ray_image_of_the_pinned_ray() -> None:
    assert _arg("RAY_IMAGE_TAG") == f"{_pin('ray')}-py311-cpu"
    assert "FROM rayproject/ray:${RAY_IMAGE_TAG}" in DOCKERFILE


def test_torch_is_pinned_to_the_project_version_from_the_cpu_index() -> None:
    assert _arg("TORCH_VERSION") == _pin("torch")
    assert _arg("TORCH_INDEX_URL").endswith("/whl/cpu")


def test_image_runs_as_the_ray_user_the_chart_expects() -> None:
    values = yaml.safe_load((REPO / "helm" / "tuneloop" / "values.yaml").read_text())
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.MULTILINE)

    assert users == ["ray"]
    assert values["podSecurityContext"]["runAsUser"] == 1000
    assert values["ray"]["version"] == _pin("ray")


def test_build_context_admits_only_what_the_wheel_needs() -> None:
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    rules = [line for line in ignore.splitlines() if line and not line.startswith("#")]

    assert rules[0] == "*"
    assert {"!pyproject.toml", "!jobs/", "!monitoring/", "!server/"} <= set(rules)
