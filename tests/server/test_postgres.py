"""The runner and the job routes on a real PostgreSQL, each test on a fresh schema of its own.

The runner runs in this process, ticked by the test, on the session's real Ray cluster; its
job processes and training workers write to the same PostgreSQL. The routes are the real
FastAPI application called in process, with no Serve in front. Skipped, with the reason, when
no PostgreSQL listens.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from fastapi.testclient import TestClient

from jobs.runner import Runner
from jobs.settings import Settings
from jobs.spec import parse_spec
from jobs.store import Job, JobStatus, Store
from jobs.submission import submit_job
from server.api import Services, build_api, set_services
from server.auth import Scope, issue_token
from tests.conftest import fresh_postgres_url, postgres_reachable, tiny_spec
from tests.factories import read_sentiment

pytestmark = pytest.mark.integration

REVIEWS = "reviews.csv"


@pytest.fixture
def pg_settings(ray_cluster: None, tmp_path: Path) -> Settings:
    reason = postgres_reachable()
    if reason:
        pytest.skip(reason)
    settings = Settings(
        home=tmp_path / "home",
        database_url=fresh_postgres_url(),
        runner_poll_seconds=0.2,
        max_running_jobs=1,
        max_job_attempts=2,
    )
    settings.ensure_dirs()
    read_sentiment("amazon").iloc[:120].to_csv(settings.resolved_data_root() / REVIEWS, index=False)
    return settings


@pytest.fixture
def pg_store(pg_settings: Settings) -> Iterator[Store]:
    opened = Store.open(pg_settings.resolved_database_url())
    yield opened
    opened.engine.dispose()


@pytest.fixture
def make_runner(pg_settings: Settings) -> Iterator[Callable[[], Runner]]:
    """Runners on the test's schema, their database connections closed at the end."""
    made: list[Runner] = []

    def make() -> Runner:
        made.append(Runner(pg_settings))
        return made[-1]

    yield make
    for runner in made:
        runner.close()
        runner.store.engine.dispose()


def submit(store: Store, settings: Settings, spec: dict[str, Any]) -> Job:
    return submit_job(store=store, settings=settings, spec=parse_spec(spec))


def run_until_finished(
    runners: list[Runner], store: Store, ids: list[str], timeout: float = 420
) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [store.get_job(job_id) for job_id in ids]
        if all(JobStatus(job.status).finished for job in jobs):
            return jobs
        for runner in runners:
            runner.tick()
        time.sleep(0.2)
    states = {job_id: (job.status, job.error) for job_id in ids if (job := store.get_job(job_id))}
    raise AssertionError(f"jobs did not finish in {timeout:.0f}s: {states}")


def started_attempts(store: Store, job_id: str) -> int:
    return sum(line.message.startswith("starting attempt") for line in store.read_log(job_id))


def test_job_routes_and_runner_work_on_postgresql(
    pg_settings: Settings,
    pg_store: Store,
    tiny_model_dir: Path,
    make_runner: Callable[[], Runner],
) -> None:
    set_services(Services(pg_settings, pg_store, predictor=None, metrics=None))
    spec = tiny_spec(tiny_model_dir, REVIEWS, model_name="on-postgres")
    _, token = issue_token(pg_store, name="tests", scope=Scope.ADMIN)
    with TestClient(build_api(), headers={"Authorization": f"Bearer {token}"}) as http:
        created = http.post("/v1/jobs", json=spec)
        assert created.status_code == 201, created.text
        refused = http.post("/v1/jobs", json={**spec, "limits": {"timeout_seconds": 0}})
        assert refused.status_code == 422
        assert refused.json()["error"]["field"] == "limits.timeout_seconds"
        queued = http.post("/v1/jobs", json=spec).json()
        assert http.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "CANCELLED"

        job_id = created.json()["id"]
        run_until_finished([make_runner()], pg_store, [job_id])
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert (job["status"], job["attempts"], job["model_version"]) == ("SUCCEEDED", 1, 1)
        epochs = http.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2]
        lines = [line["message"] for line in http.get(f"/v1/jobs/{job_id}/log").json()["lines"]]
        assert "status RUNNING -> SUCCEEDED" in lines
        listed = http.get("/v1/jobs", params={"status": "SUCCEEDED"}).json()["jobs"]
        assert [j["id"] for j in listed] == [job_id]
        assert http.get("/v1/jobs/job-missing").status_code == 404


def test_two_runners_never_start_the_same_job(
    pg_settings: Settings,
    pg_store: Store,
    tiny_model_dir: Path,
    make_runner: Callable[[], Runner],
) -> None:
    spec = tiny_spec(tiny_model_dir, REVIEWS, model_name="raced", hyperparameters={"epochs": 1})
    ids = [submit(pg_store, pg_settings, spec).id for _ in range(4)]
    runners = [make_runner(), make_runner()]
    barrier = threading.Barrier(len(runners))
    claimed: list[set[str]] = []
    lock = threading.Lock()

    def claim(runner: Runner) -> None:
        barrier.wait()
        runner.schedule()
        with lock:
            claimed.append(set(runner.processes))

    threads = [threading.Thread(target=claim, args=(runner,)) for runner in runners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 2 and not claimed[0] & claimed[1]
    assert len(claimed[0] | claimed[1]) == 2

    for job in run_until_finished(runners, pg_store, ids):
        assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1), job.error
        assert started_attempts(pg_store, job.id) == 1
        assert [e.epoch for e in pg_store.epoch_metrics(job.id)] == [1]


def test_data_errors_fail_at_once_without_retries(
    pg_settings: Settings,
    pg_store: Store,
    tiny_model_dir: Path,
    make_runner: Callable[[], Runner],
) -> None:
    data_root = pg_settings.resolved_data_root()
    rows = read_sentiment("amazon").iloc[:120]
    rows.to_csv(data_root / "deleted.csv", index=False)
    rows.to_csv(data_root / "unlabelled.csv", index=False)
    deleted = submit(pg_store, pg_settings, tiny_spec(tiny_model_dir, "deleted.csv"))
    unlabelled = submit(pg_store, pg_settings, tiny_spec(tiny_model_dir, "unlabelled.csv"))
    (data_root / "deleted.csv").unlink()
    rows.drop(columns="label").to_csv(data_root / "unlabelled.csv", index=False)

    jobs = run_until_finished([make_runner()], pg_store, [deleted.id, unlabelled.id])
    for job, quoted in zip(jobs, ("deleted.csv", "'label'"), strict=True):
        assert (job.status, job.error_code, job.attempts) == (JobStatus.FAILED, "data", 1)
        assert job.error is not None and quoted in job.error
        assert f"status RUNNING -> FAILED: {job.error}" in [
            line.message for line in pg_store.read_log(job.id)
        ]


def test_a_dying_job_process_is_retried_up_to_the_limit_then_fails(
    pg_settings: Settings,
    pg_store: Store,
    tiny_model_dir: Path,
    make_runner: Callable[[], Runner],
) -> None:
    spec = tiny_spec(tiny_model_dir, REVIEWS, model_name="doomed", hyperparameters={"epochs": 50})
    job_id = submit(pg_store, pg_settings, spec).id
    runner = make_runner()
    killed: list[int] = []
    deadline = time.monotonic() + 300
    while not JobStatus(pg_store.get_job(job_id).status).finished:
        assert time.monotonic() < deadline, "the job did not fail in 300s"
        runner.tick()
        attempts = pg_store.get_job(job_id).attempts
        if job_id in runner.processes and len(killed) < attempts:
            process, _ = runner.processes[job_id]
            pid = ray.get(process.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.2)

    job = pg_store.get_job(job_id)
    assert (job.status, job.error_code, job.attempts) == (JobStatus.FAILED, "infrastructure", 2)
    assert len(killed) == 2
    assert job.error is not None and job.error.endswith("gave up after 2 attempts")
    assert job.error.startswith("its process died")
    lines = [line.message for line in pg_store.read_log(job_id)]
    assert sum("requeued to resume from its last checkpoint" in line for line in lines) == 1
