"""Hyperparameter search end to end, over HTTP, on the session's real local Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import ray
from typer.testing import CliRunner

from jobs.runner import job_processes
from server.cli import app
from server.client import ApiError
from tests.conftest import Stack, tiny_spec
from tests.factories import read_sentiment

pytestmark = pytest.mark.integration

SPACE = {
    "hyperparameters.head_lr": {"loguniform": [1e-3, 1e-2]},
    "strategy.frozen_layers": {"choice": [0, 1, 2]},
}


@pytest.fixture(scope="module")
def reviews(stack: Stack) -> str:
    return stack.data_file("search-reviews.csv", read_sentiment("amazon").iloc[:200])


def search_spec(
    tiny_model_dir: Path, reviews: str, model_name: str, **search: Any
) -> dict[str, Any]:
    spec = tiny_spec(tiny_model_dir, reviews, model_name=model_name, hyperparameters={"epochs": 3})
    spec["search"] = {"space": SPACE, "trials": 4, "max_concurrent": 2, **search}
    return spec


def free_cpus() -> float:
    return float(ray.available_resources().get("CPU", 0))


def wait_for_cpus(stack: Stack, before: float, timeout: float) -> None:
    """Wait until the cluster's free CPUs are back to ``before``, naming any group left."""
    try:
        stack.wait_for(lambda: free_cpus() >= before, timeout, "every trial's CPUs to come back")
    except AssertionError as exc:
        left = {
            group_id: (table["state"], table["bundles"])
            for group_id, table in ray.util.placement_group_table().items()
            if table["state"] != "REMOVED"
        }
        raise AssertionError(f"{exc}: {free_cpus()} of {before} CPUs free; groups {left}") from None


def actor_processes(*classes: str) -> list[str]:
    """Command lines of this session's processes that run actors of the named classes.

    Read from /proc below this session's raylet, since another Ray cluster may share the machine.
    """
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found: list[str] = []
    below = list(children.get(raylet, []))
    while below:
        pid = below.pop()
        below.extend(children.get(pid, []))
        if any(name in commands.get(pid, "") for name in classes):
            found.append(commands[pid])
    return found


TRIAL_ACTORS = ("ImplicitFunc", "TrainController", "RayTrainWorker")


def started_lines(stack: Stack, job_id: str) -> list[str]:
    return [
        line["message"].split()[1]
        for line in stack.client.log(job_id)
        if line["message"].startswith("trial ") and " started: " in line["message"]
    ]


def curl(stack: Stack, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """Call the API with curl, as a user at a shell would."""
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail-with-body", "-X", method,
         "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {stack.token}",
         "--data-binary", "@-", f"{stack.url}{path}"],
        input=json.dumps(body), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"curl {method} {path}: {done.stderr} {done.stdout}"
    return dict(json.loads(done.stdout))


@contextmanager
def watched_in_cli(
    stack: Stack, job_id: str
) -> Iterator[tuple[subprocess.Popen[str], list[tuple[float, str]]]]:
    """Run ``tuneloop jobs trials --watch`` as its own process; collect its lines as they come,
    each with the time it arrived."""
    command = Path(sys.executable).with_name("tuneloop")
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        [str(command), "jobs", "trials", job_id, "--watch", "--url", stack.url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200", "TUNELOOP_TOKEN": stack.token},
    ) as process:  # fmt: skip

        def collect() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append((time.time(), line.rstrip()))

        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        try:
            yield process, lines
        finally:
            process.kill()
            reader.join(timeout=10)


def test_search_submitted_with_curl_is_watched_live_and_its_winner_served(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    before = free_cpus()
    spec = search_spec(tiny_model_dir, reviews, "searched", reduction_factor=2)
    submitted = curl(stack, "POST", "/v1/jobs", spec)
    with watched_in_cli(stack, submitted["id"]) as (watcher, seen):
        assert watcher.wait(timeout=420) == 0, "\n".join(line for _, line in seen)
    job = stack.client.job(submitted["id"])
    assert job["status"] == "SUCCEEDED", job["error"]

    found = stack.client.trials(job["id"])
    assert (found["metric"], found["mode"]) == ("val_accuracy", "max")
    trials = found["trials"]
    assert len(trials) == 4
    for trial in trials:
        assert set(trial["config"]) == set(SPACE)
        assert trial["state"] in {"SUCCEEDED", "STOPPED"}
        epochs = [row["epoch"] for row in trial["curve"]]
        assert epochs == list(range(1, len(epochs) + 1)) and 1 <= len(epochs) <= 3
        assert trial["best_metric"] == max(row["val_accuracy"] for row in trial["curve"])
    (best,) = [trial for trial in trials if trial["is_best"]]
    assert best["best_metric"] == max(trial["best_metric"] for trial in trials)

    # The CLI showed each trial as it started, while the search was still running, and the
    # winner once it was done.
    # The store keeps naive UTC times.
    finished = datetime.fromisoformat(job["finished_at"]).replace(tzinfo=UTC).timestamp()
    for trial in trials:
        (started_at,) = [at for at, line in seen if f"trial {trial['trial_id']} started: " in line]
        assert started_at < finished
    assert any(
        f"SUCCEEDED: searched v{job['model_version']} from trial {best['trial_id']}" in line
        for _, line in seen
    )
    shown = "\n".join(line for _, line in seen)
    assert all(trial["trial_id"] in shown for trial in trials) and "head_lr" in shown

    summary = job["result"]["search"]
    assert summary["best_trial"] == best["trial_id"] and summary["trials"] == 4
    assert summary["trial_epochs"] == sum(len(trial["curve"]) for trial in trials) <= 12
    assert [e["epoch"] for e in stack.client.epochs(job["id"])] == [
        row["epoch"] for row in best["curve"]
    ]

    assert stack.client.model("searched")["production_version"] == job["model_version"]
    answered = curl(stack, "POST", "/v1/models/searched/predict", {"inputs": ["great phone"]})
    assert answered["version"] == job["model_version"]
    saved = json.loads(
        (stack.settings.models_dir() / "searched" / job["id"] / "spec.json").read_text()
    )
    assert saved["search"] is None
    assert saved["hyperparameters"]["head_lr"] == best["config"]["hyperparameters.head_lr"]
    assert saved["strategy"]["frozen_layers"] == best["config"]["strategy.frozen_layers"]
    messages = [line["message"] for line in stack.client.log(job["id"])]
    assert any(m.startswith(f"search done: trial {best['trial_id']} is best") for m in messages)
    assert any(
        m.startswith(f"registered searched v{job['model_version']}; promoted") for m in messages
    )

    wait_for_cpus(stack, before, 60)

    listed = CliRunner().invoke(
        app, ["jobs", "trials", job["id"], "--url", stack.url, "--token", stack.token]
    )
    assert listed.exit_code == 0, listed.output
    assert all(trial["trial_id"] in listed.output for trial in trials) and "*" in listed.output


def test_search_over_the_trial_limit_is_refused_before_queuing(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    before = len(stack.client.jobs())
    spec = search_spec(tiny_model_dir, reviews, "too-many", trials=stack.settings.max_trials + 1)
    with pytest.raises(ApiError) as caught:
        stack.client.submit(spec)
    assert (caught.value.status, caught.value.field) == (422, "search.trials")
    assert str(stack.settings.max_trials + 1) in caught.value.message
    assert len(stack.client.jobs()) == before


def test_trials_of_an_unknown_job_are_404(stack: Stack) -> None:
    with pytest.raises(ApiError) as caught:
        stack.client.trials("job-missing")
    assert caught.value.status == 404


def test_cancel_stops_every_trial_of_a_search(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    before = free_cpus()
    spec = search_spec(tiny_model_dir, reviews, "halted", scheduler="none")
    spec["hyperparameters"] |= {"epochs": 100, "batch_size": 8}
    job = stack.client.submit(spec)

    def training_trials() -> list[dict[str, Any]]:
        return [t for t in stack.client.trials(job["id"])["trials"] if t["curve"]]

    stack.wait_for(lambda: len(training_trials()) == 2, 240, "two trials to train")
    assert actor_processes(*TRIAL_ACTORS)
    stack.client.cancel(job["id"])
    stack.wait_for(
        lambda: stack.client.job(job["id"])["status"] == "CANCELLED", 90, "the search to cancel"
    )
    wait_for_cpus(stack, before, 60)
    stack.wait_for(
        lambda: not actor_processes(*TRIAL_ACTORS), 60, "the trials' actors and workers to exit"
    )

    trials = stack.client.trials(job["id"])["trials"]
    assert {trial["state"] for trial in trials} <= {"STOPPED"}
    trained = {trial["trial_id"]: len(trial["curve"]) for trial in trials}
    threading.Event().wait(5)
    later = stack.client.trials(job["id"])["trials"]
    assert {trial["trial_id"]: len(trial["curve"]) for trial in later} == trained
    assert all(count < 100 for count in trained.values())


def test_resumed_search_does_not_rerun_finished_trials(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    spec = search_spec(tiny_model_dir, reviews, "restored", scheduler="none", max_concurrent=1)
    spec["hyperparameters"] |= {"epochs": 2}
    job = stack.client.submit(spec)

    def finished() -> list[str]:
        trials = stack.client.trials(job["id"])["trials"]
        return [t["trial_id"] for t in trials if t["state"] == "SUCCEEDED"]

    stack.wait_for(lambda: len(finished()) >= 2, 300, "two trials to finish")
    done_before = finished()
    threading.Event().wait(4)  # past the period at which Tune saves the experiment's state
    running, _ = job_processes(stack.settings)
    ray.kill(running[job["id"]], no_restart=True)

    ended = stack.client.wait(job["id"], timeout=420)
    assert ended["status"] == "SUCCEEDED", ended["error"]
    assert ended["attempts"] == 2
    messages = [line["message"] for line in stack.client.log(ended["id"])]
    assert any(m.startswith("resuming the search: ") for m in messages)
    starts = started_lines(stack, job["id"])
    for trial_id in done_before:
        assert starts.count(trial_id) == 1, (trial_id, starts)
    trials = stack.client.trials(job["id"])["trials"]
    assert len(trials) == 4 and sum(trial["is_best"] for trial in trials) == 1


def test_a_search_winner_that_does_not_beat_production_is_kept_not_served(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    champion = tiny_spec(
        tiny_model_dir, reviews, model_name="defended", hyperparameters={"epochs": 4}
    )
    first = stack.client.wait(stack.client.submit(champion)["id"], timeout=240)
    assert first["status"] == "SUCCEEDED", first["error"]
    # A challenger that can hardly move from its random head: two trials of one epoch at
    # learning rates a thousand times too small.
    weak = tiny_spec(
        tiny_model_dir,
        reviews,
        model_name="defended",
        strategy={"kind": "feature_extraction"},
        hyperparameters={"epochs": 1, "encoder_lr": 1e-9, "head_lr": 1e-6},
    )
    weak["search"] = {
        "space": {"hyperparameters.head_lr": {"loguniform": [1e-7, 1e-6]}},
        "trials": 2,
        "max_concurrent": 2,
        "scheduler": "none",
    }
    job = stack.client.wait(stack.client.submit(weak)["id"], timeout=300)
    assert job["status"] == "SUCCEEDED", job["error"]

    decision = job["result"]["promotion"]
    assert decision["promote"] is False, decision
    assert decision["champion_version"] == first["model_version"] == 1
    assert decision["challenger_score"] <= decision["champion_score"]
    model = stack.client.model("defended")
    assert model["production_version"] == 1
    assert [v["version"] for v in model["versions"]] == [1, 2]  # the winner is kept, not served
    assert stack.client.predict("defended", ["great phone"])["version"] == 1
    messages = [line["message"] for line in stack.client.log(job["id"])]
    assert any(
        m.startswith("registered defended v2; not promoted: challenger ")
        and "does not beat champion v1" in m
        for m in messages
    ), messages
