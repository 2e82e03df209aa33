"""Faults on the session's real local Ray cluster: dead processes, stalls, deadlines, memory.

Each fault is a real one: processes are killed or stopped with signals, found under this
session's own raylet or asked for their pid, so another Ray cluster on the machine is never
touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from jobs.runner import NAMESPACE, RUNNER_NAME, job_processes
from jobs.store import Job, JobStatus
from server.local import wait_healthy
from tests.conftest import Stack, tiny_spec
from tests.factories import read_sentiment
from tests.server.test_jobs_api import train_worker_pids
from tests.server.test_search_api import free_cpus, wait_for_cpus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reviews(stack: Stack) -> str:
    return stack.data_file("fault-reviews.csv", read_sentiment("amazon").iloc[:120])


def actor_pid(actor: Any) -> int:
    """The pid of the process an actor lives in, asked of the actor itself."""
    return int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60))


def runner_pid() -> int:
    return actor_pid(ray.get_actor(RUNNER_NAME, namespace=NAMESPACE))


def api_replica_pid() -> int:
    (name,) = [
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["namespace"] == "serve" and "#Api#" in entry["name"]
    ]
    return actor_pid(ray.get_actor(name, namespace="serve"))


def restarted_pid(find: Any, old: int, stack: Stack) -> int:
    """Wait for a killed actor to come back in a new process, and return that process's pid."""
    found: list[int] = []

    def back() -> bool:
        try:
            found.append(find())
        except (ray.exceptions.RayError, ValueError):
            return False
        return found[-1] != old

    stack.wait_for(back, 120, "the killed actor to be restarted")
    return found[-1]


def jobs_of(stack: Stack, ids: list[str]) -> list[Job]:
    return [stack.store.get_job(job_id) for job_id in ids]


def finished(stack: Stack, ids: list[str]) -> int:
    return sum(JobStatus(job.status).finished for job in jobs_of(stack, ids))


def messages(stack: Stack, job_id: str) -> list[str]:
    return [line.message for line in stack.store.read_log(job_id)]


def test_killing_the_runner_and_the_api_replica_loses_no_job(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    ids = [
        stack.client.submit(
            tiny_spec(
                tiny_model_dir, reviews, model_name=f"survivor-{i}", hyperparameters={"epochs": 1}
            )
        )["id"]
        for i in range(20)
    ]
    stack.wait_for(
        lambda: any(job.status == JobStatus.RUNNING for job in jobs_of(stack, ids)),
        120,
        "a first job to run",
    )
    old_runner = runner_pid()
    os.kill(old_runner, signal.SIGKILL)
    restarted_pid(runner_pid, old_runner, stack)

    done_before = finished(stack, ids)
    stack.wait_for(lambda: finished(stack, ids) >= done_before + 2, 300, "two more jobs to end")
    old_api = api_replica_pid()
    os.kill(old_api, signal.SIGKILL)
    restarted_pid(api_replica_pid, old_api, stack)
    wait_healthy(stack.url, timeout=120)

    stack.wait_for(lambda: finished(stack, ids) == len(ids), 900, "all 20 jobs to end")
    for job in jobs_of(stack, ids):
        assert job.status == JobStatus.SUCCEEDED, (job.id, job.error)
        lines = messages(stack, job.id)
        assert sum(line.startswith("starting attempt") for line in lines) == 1, (job.id, lines)
        assert sum(line.startswith("epoch 1/1") for line in lines) == 1, (job.id, lines)
        assert [e.epoch for e in stack.store.epoch_metrics(job.id)] == [1]
        versions = stack.store.list_versions(job.model_name)
        assert [(v.version, v.job_id) for v in versions] == [(1, job.id)]
    assert stack.client.health()["status"] == "ok"

    # The restarted runner took over the process started ahead rather than starting another
    # beside it, and every finished job's process is gone.
    def processes() -> tuple[int, int]:
        running, idle = job_processes(stack.settings)
        return len(running), len(idle)

    stack.wait_for(lambda: processes() == (0, 1), 60, "no job's process and one started ahead")


@pytest.fixture
def stopped_processes() -> Iterator[list[int]]:
    """Pids a test stopped with SIGSTOP; any still there are let go when it ends."""
    stopped: list[int] = []
    yield stopped
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_stalled_and_overdue_jobs_fail_with_the_reason_and_free_their_cpus(
    stack: Stack, tiny_model_dir: Path, reviews: str, stopped_processes: list[int]
) -> None:
    before = free_cpus()
    long_run = {"epochs": 100, "batch_size": 8}
    stalled = stack.client.submit(
        tiny_spec(
            tiny_model_dir,
            reviews,
            model_name="stalled",
            hyperparameters=long_run,
            limits={"no_progress_seconds": 10},
        )
    )["id"]
    stack.wait_for(lambda: stack.store.epoch_metrics(stalled), 180, "the first epoch")
    (worker,) = train_worker_pids()
    os.kill(worker, signal.SIGSTOP)
    stopped_processes.append(worker)
    # A hundred epochs of 750 single-row steps cannot end within the deadline on any CPU; on
    # the stalled job's 90 rows the job once succeeded before it. The deadline falls after the
    # start of the workers even on a slow machine (28 s measured on 2 cores): a job killed
    # before its workers record their placement group leaves the group to Ray's own slower
    # clean-up (see jobs.runner.remove_placement_groups).
    many_reviews = stack.data_file("overdue-reviews.csv", read_sentiment("amazon"))
    overdue = stack.client.submit(
        tiny_spec(
            tiny_model_dir,
            many_reviews,
            model_name="overdue",
            hyperparameters={"epochs": 100, "batch_size": 1},
            limits={"timeout_seconds": 60},
        )
    )["id"]

    stack.wait_for(lambda: finished(stack, [stalled, overdue]) == 2, 180, "both jobs to end")
    for job_id, code, limit in (
        (stalled, "no_progress", "limits.no_progress_seconds of 10"),
        (overdue, "timeout", "limits.timeout_seconds of 60"),
    ):
        job = stack.store.get_job(job_id)
        assert (job.status, job.error_code) == (JobStatus.FAILED, code), job.error
        assert job.error is not None and limit in job.error
        assert f"status RUNNING -> FAILED: {job.error}" in messages(stack, job_id)
        running, _ = job_processes(stack.settings)
        assert job_id not in running
    wait_for_cpus(stack, before, 90)
    assert len(stack.store.epoch_metrics(stalled)) < 100


def test_a_worker_over_its_memory_limit_fails_the_job_with_the_reason(
    stack: Stack, tiny_model_dir: Path, reviews: str
) -> None:
    # A torch worker holds a few hundred MiB once imported, so 128 MiB is broken for real.
    before = free_cpus()
    spec = tiny_spec(tiny_model_dir, reviews, model_name="greedy", limits={"memory_mb": 128})
    job = stack.client.wait(stack.client.submit(spec)["id"], timeout=300, interval=0.5)
    assert (job["status"], job["error_code"]) == ("FAILED", "memory"), job["error"]
    assert job["attempts"] == 1
    assert "over its limits.memory_mb of 128" in job["error"]
    assert f"status RUNNING -> FAILED: {job['error']}" in messages(stack, job["id"])
    assert stack.store.epoch_metrics(job["id"]) == []
    wait_for_cpus(stack, before, 90)
