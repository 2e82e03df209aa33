"""The Helm chart carries byte-identical copies of deploy/'s alert rules and dashboards.

deploy/ is canonical; deploy/sync_chart_files.py makes the copies in helm/tuneloop/files/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "helm" / "tuneloop" / "files"


def test_chart_alerts_are_a_byte_identical_copy_of_deploy_alerts() -> None:
    source = REPO / "deploy" / "prometheus" / "alerts.yml"

    assert (FILES / "alerts.yml").read_bytes() == source.read_bytes(), (
        "run python deploy/sync_chart_files.py"
    )


def test_chart_dashboards_are_byte_identical_copies_of_deploy_dashboards() -> None:
    sources = sorted((REPO / "deploy" / "grafana" / "dashboards").glob("*.json"))
    copies = sorted((FILES / "dashboards").glob("*.json"))

    assert [c.name for c in copies] == [s.name for s in sources]
    for source, copy in zip(sources, copies, strict=True):
        assert copy.read_bytes() == source.read_bytes(), "run python deploy/sync_chart_files.py"


def test_sync_check_reports_nothing_stale() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "sync_chart_files.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
