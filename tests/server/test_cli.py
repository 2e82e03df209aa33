"""The tuneloop command against the running application."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from server.cli import app
from tests.conftest import Stack, tiny_spec
from tests.factories import read_sentiment

pytestmark = pytest.mark.integration


def run(stack: Stack, *args: str) -> str:
    result = CliRunner().invoke(
        app, [*args, "--url", stack.url, "--token", stack.token], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_submit_follow_list_show_and_predict(
    stack: Stack, tiny_model_dir: Path, tmp_path: Path
) -> None:
    data = stack.data_file("cli.csv", read_sentiment("amazon").iloc[:200])
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec(tiny_model_dir, data, model_name="cli")))

    followed = run(stack, "submit", str(spec_file), "--follow")
    assert "SUCCEEDED: cli v1, validation accuracy" in followed
    assert "epoch 2/2" in followed
    job_id = followed.split("submitted ")[1].split()[0]

    assert job_id in run(stack, "jobs", "list")
    shown = run(stack, "jobs", "show", job_id)
    assert '"status": "SUCCEEDED"' in shown and '"epochs"' in shown
    assert "status RUNNING -> SUCCEEDED" in run(stack, "jobs", "log", job_id)
    assert "v1" in run(stack, "predict", "cli", "what a great phone")
    assert "yes" in run(stack, "models", "show", "cli")


def test_invalid_spec_file_exits_with_the_reason(stack: Stack, tmp_path: Path) -> None:
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text("model_name: cli\ndata: {path: x.csv}\nhyperparameters: {epochs: 0}\n")
    result = CliRunner().invoke(
        app, ["submit", str(spec_file), "--url", stack.url, "--token", stack.token]
    )
    assert result.exit_code == 1
    assert "hyperparameters.epochs" in result.output
