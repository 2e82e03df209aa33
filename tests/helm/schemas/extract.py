"""Cut the CRD schemas the chart tests need down to small JSON files.

Sources: the CustomResourceDefinitions of KubeRay (ray.io_rayservices.yaml, ray.io/v1, generated
by controller-gen v0.16.5) and of the Prometheus Operator 0.93.0
(monitoring.coreos.com_podmonitors.yaml and monitoring.coreos.com_prometheusrules.yaml). From each
this keeps only the openAPIV3Schema of the served storage version and drops the descriptions,
which are most of the bytes and play no part in validation. Run it again when the operators the
chart targets change:

    python tests/helm/schemas/extract.py /path/to/crds/kuberay /path/to/crds/prometheus-operator
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
# output file name -> CRD file name
CRDS = {
    "rayservice-v1.json": "ray.io_rayservices.yaml",
    "podmonitor-v1.json": "monitoring.coreos.com_podmonitors.yaml",
    "prometheusrule-v1.json": "monitoring.coreos.com_prometheusrules.yaml",
}


def served_schema(crd: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The version name and openAPIV3Schema of the version that is served and stored."""
    for version in crd["spec"]["versions"]:
        if version.get("served") and version.get("storage"):
            return version["name"], version["schema"]["openAPIV3Schema"]
    raise ValueError(f"{crd['metadata']['name']!r} has no version that is both served and stored")


def without_descriptions(schema: Any) -> Any:
    """The schema with every `description` keyword removed.

    A key of `properties` is a field name, not a keyword, so a field called "description" (the
    PrometheusRule's annotations have none, but others may) is kept.
    """
    if isinstance(schema, list):
        return [without_descriptions(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    kept: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "description" and isinstance(value, str):
            continue
        if key == "properties":
            kept[key] = {name: without_descriptions(sub) for name, sub in value.items()}
        else:
            kept[key] = without_descriptions(value)
    return kept


def extract(crd_path: Path) -> dict[str, Any]:
    crd = yaml.load(crd_path.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader)
    version, schema = served_schema(crd)
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    return {
        "$comment": (
            f"openAPIV3Schema of {kind} {group}/{version} from {crd_path.name}, descriptions "
            "removed, written by tests/helm/schemas/extract.py; not edited by hand."
        ),
        **without_descriptions(schema),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crd_dirs", nargs="+", type=Path, help="folders holding the CRD files")
    args = parser.parse_args()
    for out_name, crd_name in CRDS.items():
        found = [folder / crd_name for folder in args.crd_dirs if (folder / crd_name).is_file()]
        if not found:
            parser.error(f"{crd_name} is in none of {[str(d) for d in args.crd_dirs]}")
        schema = extract(found[0])
        (HERE / out_name).write_text(
            json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n"
        )
        print(f"{HERE / out_name}: from {found[0]}")


if __name__ == "__main__":
    main()
