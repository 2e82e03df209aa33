"""How a failed job is named: the failure codes, and the limits the runner enforces."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import ray.exceptions
from ray.train.v2.api.exceptions import WorkerGroupError

from jobs.errors import DatasetInvalid, MemoryLimitExceeded, PathRefused, SpecInvalid
from jobs.failures import FailureCode, classify, limit_breach
from jobs.spec import parse_spec
from jobs.store import Job, JobStatus, Store, utcnow
from tests.jobs.test_store import make_job


def spec_document(**limits: Any) -> dict[str, Any]:
    return {"model_name": "reviews", "data": {"path": "reviews.csv"}, "limits": limits}


def running_job(started_ago: float, quiet_for: float | None, **limits: Any) -> Job:
    """A job as the store holds it, started and last heard from so many seconds ago."""
    now = utcnow()
    started = now - timedelta(seconds=started_ago)
    heartbeat = started if quiet_for is None else now - timedelta(seconds=quiet_for)
    return Job(
        id="job-limits",
        spec=parse_spec(spec_document(**limits)).to_document(),
        status=JobStatus.RUNNING,
        started_at=started,
        heartbeat_at=heartbeat,
    )


def test_spec_limits_have_defaults_and_caps() -> None:
    limits = parse_spec(spec_document()).limits
    assert (limits.timeout_seconds, limits.no_progress_seconds, limits.memory_mb) == (
        86400,
        900,
        None,
    )
    for field, value in (("timeout_seconds", 8 * 86400), ("no_progress_seconds", 1)):
        with pytest.raises(SpecInvalid) as caught:
            parse_spec(spec_document(**{field: value}))
        assert caught.value.field == f"limits.{field}"
    with pytest.raises(SpecInvalid) as caught:
        parse_spec(spec_document(deadline=10))
    assert caught.value.field == "limits.deadline"


def test_data_errors_are_data_failures() -> None:
    for error in (DatasetInvalid("no column 'label'"), PathRefused("'a.csv' does not exist")):
        failure = classify(error)
        assert (failure.code, failure.reason) == (FailureCode.DATA, error.message)


def test_a_worker_over_its_memory_limit_is_a_memory_failure() -> None:
    error = MemoryLimitExceeded("resident memory reached 300 MiB, over its limits.memory_mb of 128")
    failure = classify(WorkerGroupError("worker 0 failed", {1: ValueError("peer"), 0: error}))
    assert failure.code == FailureCode.MEMORY
    assert failure.reason == f"training worker 0: {error.message}"


def test_ray_memory_monitor_kill_is_a_memory_failure() -> None:
    killed = ray.exceptions.OutOfMemoryError(
        "Task was killed due to the node running low on memory."
    )
    failure = classify(WorkerGroupError("worker 0 failed", {0: killed}))
    assert failure.code == FailureCode.MEMORY
    assert "Ray's memory monitor" in failure.reason and "running low on memory" in failure.reason


def test_a_dead_worker_is_an_infrastructure_failure_and_other_errors_are_training() -> None:
    died = classify(WorkerGroupError("worker 0 failed", {0: ray.exceptions.ActorDiedError()}))
    assert died.code == FailureCode.INFRASTRUCTURE
    assert died.reason.startswith("training worker 0: its process died: The actor died")
    other = classify(ValueError("header is not valid safetensors"))
    assert (other.code, other.reason) == (
        FailureCode.TRAINING,
        "ValueError: header is not valid safetensors",
    )


def test_a_job_within_its_limits_is_left_running() -> None:
    assert limit_breach(running_job(60, 2), utcnow(), startup_seconds=300) is None


def test_a_job_past_its_deadline_breaks_its_timeout() -> None:
    job = running_job(130, 1, timeout_seconds=120)
    breach = limit_breach(job, utcnow(), startup_seconds=300)
    assert breach is not None and breach.code == FailureCode.TIMEOUT
    assert "over its limits.timeout_seconds of 120" in breach.reason


def test_a_job_whose_workers_went_quiet_makes_no_progress() -> None:
    job = running_job(100, 40, no_progress_seconds=30)
    breach = limit_breach(job, utcnow(), startup_seconds=300)
    assert breach is not None and breach.code == FailureCode.NO_PROGRESS
    assert "no progress for 40s, over its limits.no_progress_seconds of 30" in breach.reason


def test_starting_workers_get_the_start_up_allowance() -> None:
    starting = running_job(100, None, no_progress_seconds=30)
    assert limit_breach(starting, utcnow(), startup_seconds=300) is None
    breach = limit_breach(starting, utcnow(), startup_seconds=60)
    assert breach is not None and breach.code == FailureCode.NO_PROGRESS


def test_a_failed_job_keeps_its_error_code(store: Store) -> None:
    job = make_job(store)
    store.transition(job.id, JobStatus.RUNNING)
    store.transition(
        job.id, JobStatus.FAILED, error="no progress for 40s", error_code=FailureCode.NO_PROGRESS
    )
    failed = store.get_job(job.id)
    assert (failed.error_code, failed.error) == ("no_progress", "no progress for 40s")
