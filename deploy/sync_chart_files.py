"""Copy the alert rules and dashboards into the Helm chart, which cannot read files outside itself.

deploy/ holds the files people edit (deploy/prometheus/alerts.yml, and the dashboards written by
deploy/grafana/generate.py); helm/tuneloop/files/ holds copies. Run this after changing either;
with --check it changes nothing and exits 1 when a copy is missing or differs, which is what the
tests assert too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHART_FILES = REPO / "helm" / "tuneloop" / "files"


def pairs() -> list[tuple[Path, Path]]:
    """(source, copy) for every file the chart carries."""
    found = [(REPO / "deploy" / "prometheus" / "alerts.yml", CHART_FILES / "alerts.yml")]
    for source in sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json")):
        found.append((source, CHART_FILES / "dashboards" / source.name))
    return found


def stale_copies() -> list[Path]:
    """Copies that differ from their source, are missing, or have no source any more."""
    expected = pairs()
    stale = [copy for source, copy in expected if not _same(source, copy)]
    kept = {copy for _, copy in expected}
    stale += [extra for extra in CHART_FILES.glob("dashboards/*.json") if extra not in kept]
    return stale


def sync() -> None:
    expected = pairs()
    kept = {copy for _, copy in expected}
    for extra in CHART_FILES.glob("dashboards/*.json"):
        if extra not in kept:
            extra.unlink()
    for source, copy in expected:
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, copy)


def _same(source: Path, copy: Path) -> bool:
    return copy.is_file() and source.read_bytes() == copy.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale copies, change nothing")
    args = parser.parse_args()
    if not args.check:
        sync()
        return 0
    stale = stale_copies()
    for path in stale:
        print(f"stale: {path.relative_to(REPO)}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
