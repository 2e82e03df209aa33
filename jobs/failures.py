"""Why a job failed: a stable code for each way a job can end FAILED, and a reason for people.

The code says what to do next: ``data``, ``model`` and ``spec`` failures need a new
submission and are never retried; ``infrastructure`` failures (a process that died) are
retried by the runner up to ``TUNELOOP_MAX_JOB_ATTEMPTS``; ``timeout``, ``no_progress`` and
``memory`` mean the job broke one of its ``limits``; ``training`` is an error in training
itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import ray.exceptions
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

from jobs.errors import (
    DatasetInvalid,
    MemoryLimitExceeded,
    ModelUnavailable,
    PathRefused,
    SpecInvalid,
    TuneloopError,
)
from jobs.spec import JobSpec
from jobs.store import Job


class FailureCode(StrEnum):
    DATA = "data"
    MODEL = "model"
    SPEC = "spec"
    TIMEOUT = "timeout"
    NO_PROGRESS = "no_progress"
    MEMORY = "memory"
    INFRASTRUCTURE = "infrastructure"
    TRAINING = "training"


@dataclass(frozen=True)
class Failure:
    code: FailureCode
    reason: str


CODE_BY_ERROR: tuple[tuple[type[TuneloopError], FailureCode], ...] = (
    (DatasetInvalid, FailureCode.DATA),
    (PathRefused, FailureCode.DATA),
    (ModelUnavailable, FailureCode.MODEL),
    (SpecInvalid, FailureCode.SPEC),
    (MemoryLimitExceeded, FailureCode.MEMORY),
)


def classify(exc: BaseException) -> Failure:
    """The failure an exception raised while running a job stands for.

    A Ray Train failure carries each worker's own error; the first worker's is the cause, as
    the others usually fail only because it left the group.
    """
    if isinstance(exc, WorkerGroupError) and exc.worker_failures:
        rank, cause = min(exc.worker_failures.items())
        failure = classify(cause)
        return Failure(failure.code, f"training worker {rank}: {failure.reason}")
    wrapped = getattr(exc, "health_check_failure", None)  # Ray Train's note of a dead worker
    if isinstance(wrapped, BaseException):
        return classify(wrapped)
    if isinstance(exc, TuneloopError):
        code = next((c for kind, c in CODE_BY_ERROR if isinstance(exc, kind)), None)
        return Failure(code or FailureCode.TRAINING, exc.message)
    if isinstance(exc, ray.exceptions.OutOfMemoryError):
        return Failure(
            FailureCode.MEMORY,
            f"killed by Ray's memory monitor, the node being short of memory: {first_line(exc)}",
        )
    if isinstance(exc, ray.exceptions.RayActorError | TrainingFailedError):
        # Ray cannot tell who sent a SIGKILL; the kernel's out-of-memory killer is the usual one.
        killed = " (killed by SIGKILL, often for memory)" if "SIGKILL" in str(exc) else ""
        return Failure(FailureCode.INFRASTRUCTURE, f"its process died{killed}: {first_line(exc)}")
    return Failure(FailureCode.TRAINING, f"{type(exc).__name__}: {first_line(exc)}")


def limit_breach(job: Job, now: datetime, startup_seconds: float) -> Failure | None:
    """Which of its ``limits`` a running job has broken at ``now``, if any.

    Times are the store's naive UTC. Until the workers' first heartbeat (while the heartbeat
    is still the one stamped at the start) the job gets the longer of its no-progress limit
    and the runner's start-up allowance, since starting workers is not training.
    """
    if job.started_at is None or job.heartbeat_at is None:
        return None
    limits = JobSpec.model_validate(job.spec).limits
    running = (now - job.started_at).total_seconds()
    if running > limits.timeout_seconds:
        return Failure(
            FailureCode.TIMEOUT,
            f"ran {running:.0f}s, over its limits.timeout_seconds of {limits.timeout_seconds:g}",
        )
    quiet = (now - job.heartbeat_at).total_seconds()
    allowed = limits.no_progress_seconds
    if job.heartbeat_at <= job.started_at:
        allowed = max(allowed, startup_seconds)
    if quiet > allowed:
        return Failure(
            FailureCode.NO_PROGRESS,
            f"no progress for {quiet:.0f}s, over its limits.no_progress_seconds of "
            f"{limits.no_progress_seconds:g}: its training workers stopped reporting",
        )
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__
