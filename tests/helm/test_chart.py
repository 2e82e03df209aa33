"""The chart as a whole: lint, values documentation and the values schema."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "tuneloop"
# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and a current one.
KUBE_VERSIONS = ["v1.27.0", "v1.37.0"]
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(?: |$)")
SEVERITY_WARNING = 2


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_chart_lints_without_warnings_for_every_scenario(
    scenario_values: dict[str, Any], kube_version: str
) -> None:
    report = helm_python.lint(CHART, scenario_values, strict=True, kube_version=kube_version)

    problems = [m for m in report["messages"] if m["severity"] >= SEVERITY_WARNING]
    assert report["errors"] == [] and problems == [], report


def test_every_scenario_passes_the_values_schema(
    chart: helm_python.Chart, scenario_values: dict[str, Any]
) -> None:
    chart.validate_schema(scenario_values)


@pytest.mark.parametrize(
    ("values", "path"),
    [
        ({"logFormat": "xml"}, "/logFormat"),
        ({"ray": {"workers": {"gpu": {"gpusPerWorker": 0}}}}, "/ray/workers/gpu/gpusPerWorker"),
        ({"persistence": {"mountPath": "relative/path"}}, "/persistence/mountPath"),
        ({"databse": {}}, "databse"),
        ({"ingress": {"hosts": [{"host": "a.example", "paths": [{"path": "/"}]}]}}, "pathType"),
    ],
    ids=["unknown-log-format", "no-gpus", "relative-mount", "misspelt-key", "no-path-type"],
)
def test_schema_rejects_bad_values_naming_them(
    render: Callable[..., Any], values: dict[str, Any], path: str
) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=re.escape(path)):
        render(values)


def _schema_node(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow local $refs (and a lone allOf) to the node that has the properties."""
    while "$ref" in schema or "allOf" in schema:
        if "$ref" in schema:
            schema = root["definitions"][schema["$ref"].rsplit("/", 1)[-1]]
        else:
            schema = schema["allOf"][0]
    return schema


def _value_keys(text: str) -> list[tuple[tuple[str, ...], int]]:
    """(key path, line index) of every mapping key of values.yaml outside lists."""
    keys: list[tuple[tuple[str, ...], int]] = []
    stack: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines()):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stripped.startswith("-"):
            stack.append((indent, "[]"))
            continue
        match = KEY_LINE.match(line)
        if not match:
            continue
        path = (*(key for _, key in stack), match["key"])
        stack.append((indent, match["key"]))
        if "[]" not in path:
            keys.append((path, number))
    return keys


def _doc_comment_above(lines: list[str], number: int) -> str:
    """The first line of the comment block right above a line, or "" when there is none."""
    first = ""
    index = number - 1
    while index >= 0 and lines[index].lstrip().startswith("#"):
        first = lines[index].strip()
        index -= 1
    return first


def _documented_keys() -> list[tuple[tuple[str, ...], bool, dict[str, Any] | None]]:
    """Each key of values.yaml that needs documenting: (path, has `# --`, its schema node).

    Keys inside a free-form value (resources, labels, annotations...) are part of that value and
    need no documentation of their own. A key the schema lacks comes with None.
    """
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    lines = text.splitlines()
    schema = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    found = []
    for path, number in _value_keys(text):
        parent: dict[str, Any] | None = schema
        for key in path[:-1]:
            properties = _schema_node(parent, schema).get("properties") if parent else None
            parent = properties.get(key) if properties is not None else None
        if parent is None or "properties" not in _schema_node(parent, schema):
            continue  # inside a free-form value, or under a key already reported as missing
        node = _schema_node(parent, schema)["properties"].get(path[-1])
        documented = _doc_comment_above(lines, number).startswith("# --")
        found.append((path, documented, node))
    return found


def test_every_value_is_documented_where_it_is_set() -> None:
    undocumented = [".".join(path) for path, documented, _ in _documented_keys() if not documented]

    assert undocumented == [], "values.yaml keys without a `# --` comment"


def test_every_value_is_described_in_the_schema() -> None:
    missing = [".".join(path) for path, _, node in _documented_keys() if node is None]
    undescribed = [
        ".".join(path)
        for path, _, node in _documented_keys()
        if node is not None and not node.get("description")
    ]

    assert missing == [], "values.yaml keys absent from values.schema.json"
    assert undescribed == [], "schema entries without a description"


def test_values_file_parses_to_what_helm_reads(chart: helm_python.Chart) -> None:
    # A guard for the line-based parsing above: it must see the same top-level keys as YAML.
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    top = {path[0] for path, _ in _value_keys(text) if len(path) == 1}

    assert top == set(yaml.safe_load(text)) == set(chart.values)
