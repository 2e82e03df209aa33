"""The runner: one Ray actor that takes queued jobs from the store and runs each in Ray.

Each job runs in its own detached ``JobProcess`` actor, which drives a Ray Train
``TorchTrainer`` and writes the job's terminal status itself. While no job runs, the runner
keeps one such process started ahead, a standby, so that a job does not wait for a Python
process to import torch, transformers and Ray Train; the job's process ends with the job. The
runner claims jobs, hands them to processes, stops those, and notices the ones that died. The
store is the source of truth, so a restarted runner picks up where the last one stopped: it
adopts the processes still running and the standby, and a job whose process is gone goes back
to the queue and resumes from its last checkpoint. The runner also stops and fails a job that
breaks its ``limits``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
import traceback
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from jobs.data import DataCatalog, LabelledRows, PreparedData
from jobs.errors import NotFound, TuneloopError
from jobs.failures import Failure, FailureCode, classify, first_line, limit_breach
from jobs.features import cache_folder
from jobs.registry import Registry, resolve_base
from jobs.settings import Settings
from jobs.spec import JobSpec, StrategyKind
from jobs.store import Job, JobStatus, Store, utcnow
from jobs.train import (
    EVAL_FILE,
    WEIGHTS_FILE,
    TrainingInput,
    selection_metric,
    train_loop_per_worker,
)

log = logging.getLogger(__name__)

NAMESPACE = "tuneloop"
RUNNER_NAME = "tuneloop-runner"
JOB_PROCESS_PREFIX = "tuneloop-job-"


def process_prefix(settings: Settings) -> str:
    """The start of the names of one tuneloop's job processes: tuneloops that share a Ray
    cluster have databases of their own, and each keeps to the processes of its own."""
    database = hashlib.sha256(settings.resolved_database_url().encode()).hexdigest()[:10]
    return f"{JOB_PROCESS_PREFIX}{database}-"


def job_processes(settings: Settings, timeout: float = 120) -> tuple[dict[str, Any], list[Any]]:
    """This tuneloop's job processes in the cluster: those that run a job, by job id, and the
    idle ones. A process that does not answer within ``timeout`` is left out."""
    prefix = process_prefix(settings)
    actors: list[Any] = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(prefix):
            with contextlib.suppress(ValueError):  # gone since it was listed
                actors.append(ray.get_actor(entry["name"], namespace=NAMESPACE))
    asked = [actor.current_job.remote() for actor in actors]
    ray.wait(asked, num_returns=len(asked), timeout=timeout)
    running: dict[str, Any] = {}
    idle: list[Any] = []
    for actor, ref in zip(actors, asked, strict=True):
        try:
            job_id: str | None = ray.get(ref, timeout=0)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("a job process did not say which job it runs: %s", first_line(exc))
            continue
        if job_id is None:
            idle.append(actor)
        else:
            running[job_id] = actor
    return running, idle


def build_trainer(
    job: Job, spec: JobSpec, settings: Settings
) -> tuple[TorchTrainer, PreparedData, Path]:
    store = Store.open(settings.resolved_database_url(), upgrade=False)
    base_dir = resolve_base(spec, settings, store)
    data = DataCatalog(settings, store).load(
        spec.data, seed=spec.hyperparameters.seed, task=spec.task
    )
    cache = None
    if spec.strategy.kind is StrategyKind.FEATURE_EXTRACTION:
        root = settings.cache_dir() / "features"
        cache = str(cache_folder(root, base_dir, spec.hyperparameters.max_length))
    training = TrainingInput(
        job_id=job.id,
        spec=spec.to_document(),
        base_dir=str(base_dir),
        database_url=settings.resolved_database_url(),
        label_names=data.label_names,
        train_inputs=data.train.texts,
        train_labels=data.label_ids(data.train),
        val_inputs=data.validation.texts,
        val_labels=data.label_ids(data.validation),
        feature_cache=cache,
        placement_record=str(job_placement_folder(settings, job.id) / "workers"),
    )
    resources = spec.resources
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    metric, mode = selection_metric(spec)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(training),
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=resources.gpus_per_worker > 0,
            resources_per_worker=per_worker,
        ),
        run_config=RunConfig(
            name=job.id,
            storage_path=str(settings.checkpoints_dir()),
            failure_config=FailureConfig(max_failures=settings.max_worker_failures),
            checkpoint_config=CheckpointConfig(
                checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
        ),
    )
    return trainer, data, base_dir


def job_placement_folder(settings: Settings, job_id: str) -> Path:
    return settings.checkpoints_dir() / "placement" / job_id


def remove_placement_groups(settings: Settings, job_id: str) -> None:
    """Give back the CPUs of a job whose process was killed or died.

    The trainer in that process is gone with it, before it could release its workers'
    placement group, and Ray notices a dead trainer only through its State API, which needs
    the dashboard (see PlacementJanitor). The job's workers and a search's trials record
    their groups' ids, so the runner removes them.

    A job killed while its workers are still starting has recorded no group yet, and its CPUs
    wait for Ray's own clean-up. Naming the placement group from the job process, before the
    trainer creates it, would close that gap.
    """
    from jobs.search import PlacementJanitor, placement_folder, search_dir  # see _run_search

    PlacementJanitor(job_id, job_placement_folder(settings, job_id)).remove_all()
    PlacementJanitor(job_id, placement_folder(search_dir(settings, job_id))).remove_all()


@ray.remote(num_cpus=0, max_restarts=0, max_concurrency=4)
class JobProcess:
    """Runs one job to its end and records how it ended.

    It is started before its job is known, with everything a job imports loaded, and waits
    to ``take`` one. Anyone may ``wait`` on that job: the runner that handed it over, or a
    restarted runner adopting it.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings.model_validate(settings)
        self.store = Store.open(self.settings.resolved_database_url(), upgrade=False)
        self.job_id: str | None = None
        self._lock = threading.Lock()
        self._taken = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def take(self, job_id: str) -> None:
        """Start running ``job_id``; taking the same job again changes nothing."""
        with self._lock:
            if self.job_id is None:
                self.job_id = job_id
                self.thread.start()
                self._taken.set()
        self._check(job_id)

    def current_job(self) -> str | None:
        return self.job_id

    def wait(self, job_id: str) -> str:
        """Block until ``job_id`` has ended here; its status then."""
        self._taken.wait()
        self._check(job_id)
        self.thread.join()
        return self.store.get_job(job_id).status

    def _check(self, job_id: str) -> None:
        if self.job_id != job_id:
            raise RuntimeError(f"this job process runs job {self.job_id}, not {job_id}")

    def run(self) -> None:
        assert self.job_id is not None, "run starts only from take"
        try:
            self._run()
        except Exception as exc:  # the job fails; the process must still report why
            if not isinstance(exc, TuneloopError):
                self.store.append_log(self.job_id, "ERROR", traceback.format_exc())
            failure = classify(exc)
            self.store.transition(
                self.job_id, JobStatus.FAILED, error=failure.reason, error_code=failure.code
            )

    def _run(self) -> None:
        assert self.job_id is not None
        job = self.store.get_job(self.job_id)
        spec = JobSpec.model_validate(job.spec)
        self.store.append_log(
            job.id,
            "INFO",
            f"starting attempt {job.attempts}: "
            f"{spec.resources.workers} worker(s), strategy "
            f"{spec.strategy.kind.value}",
        )
        if spec.search is not None:
            self._run_search(job, spec)
            return
        trainer, data, base_dir = build_trainer(job, spec, self.settings)
        result = trainer.fit()
        if self.store.get_job(job.id).cancel_requested:
            self.store.transition(job.id, JobStatus.CANCELLED)
            return
        if result.error is not None:
            raise result.error

        metric, mode = selection_metric(spec)
        best = result.get_best_checkpoint(metric, mode) or result.checkpoint
        if best is None:
            raise RuntimeError("training finished without a checkpoint")
        with best.as_directory() as folder:
            self._publish(job, spec, Path(folder), data, base_dir)

    def _run_search(self, job: Job, spec: JobSpec) -> None:
        # Imported here: Ray Tune takes seconds to import, and a job process that runs no
        # search should not spend them before its first step.
        from jobs.search import run_search

        outcome = run_search(job, spec, self.settings, self.store)
        if outcome is None:
            self.store.transition(job.id, JobStatus.CANCELLED)
            return
        self._publish(
            job,
            outcome.spec,
            outcome.checkpoint,
            outcome.data,
            outcome.base_dir,
            extra={"search": outcome.summary},
        )

    def _publish(
        self,
        job: Job,
        spec: JobSpec,
        folder: Path,
        data: PreparedData,
        base_dir: Path,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Register a checkpoint as a version, let the champion/challenger rule decide on its
        promotion, and record the job as succeeded."""
        registry = Registry(self.settings, self.store)
        evaluation = json_file(folder / EVAL_FILE)
        version = registry.register(
            job_id=job.id,
            spec=spec,
            base_dir=base_dir,
            weights=folder / WEIGHTS_FILE,
            label_names=data.label_names,
            metrics=evaluation,
            dataset_hash=data.sha256,
            parent_version=job.parent_version,
        )
        judge = challenge_rows(spec, data, DataCatalog(self.settings, self.store))
        decision = registry.challenge(version, spec.serving.promote, judge.texts, judge.labels)
        self.store.append_log(
            job.id,
            "INFO",
            f"registered {spec.model_name} v{version.version}; "
            f"{'promoted' if decision.promote else 'not promoted'}: "
            f"{decision.reason}",
        )
        self.store.transition(
            job.id,
            JobStatus.SUCCEEDED,
            model_version=version.version,
            result={
                "metrics": evaluation,
                "best_epoch": evaluation.get("epoch"),
                "promotion": decision.to_dict(),
                "footprint": registry.footprint(version),
                **(extra or {}),
            },
        )


def challenge_rows(spec: JobSpec, data: PreparedData, catalog: DataCatalog) -> LabelledRows:
    """The labelled rows champion and challenger are compared on (see Serving)."""
    if spec.serving.challenge_dataset is None:
        return data.validation
    rows, _ = catalog.rows(
        spec.serving.challenge_dataset, None, spec.data, spec.task, "serving.challenge_dataset"
    )
    return rows


def json_file(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


class Runner:
    """Claims queued jobs while the cluster has room, and reaps, cancels and recovers them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store.open(settings.resolved_database_url())
        self.processes: dict[str, tuple[Any, ray.ObjectRef]] = {}
        self.standby: Any | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._waiting_logged: set[str] = set()
        self._cancel_seen: dict[str, float] = {}

    def recover(self) -> None:
        """After a restart of the runner: adopt the processes of running jobs and one idle
        process as the standby, requeue running jobs whose process is gone, and kill the
        processes of jobs that finished while no runner was there to reap them."""
        running, idle = job_processes(self.settings)
        for job in self.store.list_jobs(status=JobStatus.RUNNING, limit=10_000):
            actor = running.pop(job.id, None)
            if actor is None:
                self._process_lost(job.id, "its process was gone when the runner started")
                continue
            self.processes[job.id] = (actor, actor.wait.remote(job.id))
            log.info("job %s: adopted its running process", job.id)
        for job_id, actor in running.items():
            with contextlib.suppress(NotFound):
                if not JobStatus(self.store.get_job(job_id).status).finished:
                    continue  # not ended: whoever runs it now reaps it
            ray.kill(actor, no_restart=True)
            log.info("job %s: removed the process it left behind", job_id)
        if idle:
            self.standby = idle.pop()
        for actor in idle:
            ray.kill(actor, no_restart=True)

    def tick(self) -> None:
        self.reap()
        self.cancel_requested()
        self.enforce_limits()
        self.schedule()
        self.keep_standby()

    def keep_standby(self) -> None:
        """Start the next job's process ahead of it while no job runs. Its imports take a few
        seconds of CPU, which on a small node would come out of a running job's training; while
        jobs run, the next one starts its process itself."""
        if self.settings.standby_job_process and self.standby is None and not self.processes:
            self.standby = self._new_process()

    def reap(self) -> None:
        for job_id, (actor, ref) in list(self.processes.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            del self.processes[job_id]
            self._cancel_seen.pop(job_id, None)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                self._process_lost(job_id, f"its process died: {first_line(exc)}")
            ray.kill(actor, no_restart=True)

    def cancel_requested(self) -> None:
        """Give a cancelled job's workers time to stop cleanly, then kill its process.

        A clean stop lets Ray Train release the job's placement group at once; a killed
        process leaves that to Ray's own clean-up, which can hold the resources for a while.
        """
        now = time.monotonic()
        for job_id, (actor, _) in list(self.processes.items()):
            if not self.store.get_job(job_id).cancel_requested:
                continue
            first_seen = self._cancel_seen.setdefault(job_id, now)
            if now - first_seen < self.settings.cancel_grace_seconds:
                continue
            ray.kill(actor, no_restart=True)
            del self.processes[job_id]
            remove_placement_groups(self.settings, job_id)
            self.store.append_log(
                job_id,
                "WARNING",
                "workers did not stop within "
                f"{self.settings.cancel_grace_seconds:g}s; process killed",
            )
            self.store.transition(job_id, JobStatus.CANCELLED)

    def enforce_limits(self) -> None:
        """Stop and fail running jobs that are past their deadline or have stopped progressing."""
        now = utcnow()
        for job_id in list(self.processes):
            breach = limit_breach(
                self.store.get_job(job_id), now, self.settings.job_startup_seconds
            )
            if breach is not None:
                self._fail(job_id, breach)

    def _fail(self, job_id: str, failure: Failure) -> None:
        """Kill a job's process and record why; killing it ends its trainer and workers, which
        gives their CPUs back. The process goes first, so that it cannot finish the job after
        it was failed."""
        actor, _ = self.processes.pop(job_id)
        self._cancel_seen.pop(job_id, None)
        ray.kill(actor, no_restart=True)
        remove_placement_groups(self.settings, job_id)
        self.store.transition(
            job_id, JobStatus.FAILED, error=failure.reason, error_code=failure.code
        )

    def schedule(self) -> None:
        free_slots = self.settings.max_running_jobs - len(self.processes)
        if free_slots <= 0:
            return
        for job in self.store.pending_jobs(limit=free_slots * 4):
            if len(self.processes) >= self.settings.max_running_jobs:
                return
            spec = JobSpec.model_validate(job.spec)
            if not self._fits(job.id, spec):
                continue
            if self.store.transition(job.id, JobStatus.RUNNING):
                self._start(job.id)

    def _fits(self, job_id: str, spec: JobSpec) -> bool:
        need = demand(spec)
        free = ray.available_resources()
        starting = self._starting_demand()
        free_cpu = free.get("CPU", 0) - starting[0]
        free_gpu = free.get("GPU", 0) - starting[1]
        fits = free_cpu >= need[0] and free_gpu >= need[1]
        if not fits and job_id not in self._waiting_logged:
            self._waiting_logged.add(job_id)
            self.store.append_log(
                job_id,
                "INFO",
                f"waiting for {need[0]:g} CPU and {need[1]:g} GPU; "
                f"free now: {max(free_cpu, 0):g} CPU, {max(free_gpu, 0):g} GPU",
            )
        return fits

    def _starting_demand(self) -> tuple[float, float]:
        """Resources of started jobs whose workers are not up yet, so not yet taken from Ray.

        A job's first worker heartbeat means its resources are reserved in the cluster.
        """
        cpu = gpu = 0.0
        for job_id in self.processes:
            job = self.store.get_job(job_id)
            if (
                job.heartbeat_at is None
                or job.started_at is None
                or (job.heartbeat_at <= job.started_at)
            ):
                job_cpu, job_gpu = demand(JobSpec.model_validate(job.spec))
                cpu, gpu = cpu + job_cpu, gpu + job_gpu
        return cpu, gpu

    def _start(self, job_id: str) -> None:
        actor, self.standby = self.standby or self._new_process(), None
        actor.take.remote(job_id)
        self.processes[job_id] = (actor, actor.wait.remote(job_id))

    def _new_process(self) -> Any:
        # Ray Train workers hand each report to a one-slot queue that the trainer's controller
        # empties when it polls, every 2 s by default: an epoch shorter than that would wait.
        poll = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(self.settings.train_poll_seconds)}
        return JobProcess.options(
            name=f"{process_prefix(self.settings)}{uuid.uuid4().hex[:12]}",
            namespace=NAMESPACE,
            lifetime="detached",
            runtime_env={"env_vars": poll},
        ).remote(self.settings.model_dump(mode="json"))

    def _process_lost(self, job_id: str, reason: str) -> None:
        job = self.store.get_job(job_id)
        if job.status != JobStatus.RUNNING:
            return
        remove_placement_groups(self.settings, job_id)
        attempts = self.settings.max_job_attempts
        if job.cancel_requested:
            self.store.transition(job_id, JobStatus.CANCELLED)
        elif job.attempts < attempts:
            self.store.append_log(
                job_id,
                "WARNING",
                f"{reason}; requeued to resume from its "
                f"last checkpoint (attempt {job.attempts} of {attempts})",
            )
            self.store.transition(job_id, JobStatus.PENDING)
        else:
            self.store.transition(
                job_id,
                JobStatus.FAILED,
                error=f"{reason}; gave up after {job.attempts} attempts",
                error_code=FailureCode.INFRASTRUCTURE,
            )

    def run_forever(self) -> None:
        self.recover()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad tick must not stop the runner; the next one retries
                log.exception("runner tick failed")
            self._wake.wait(self.settings.runner_poll_seconds)
            self._wake.clear()

    def wake(self) -> None:
        """Tick now rather than at the next poll: a job was just queued."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def close(self) -> None:
        """Kill the standby; running jobs keep their processes, for the next runner to adopt."""
        if self.standby is not None:
            ray.kill(self.standby, no_restart=True)
            self.standby = None


def demand(spec: JobSpec) -> tuple[float, float]:
    """CPUs and GPUs a job's workers take."""
    resources = spec.resources
    return (
        resources.workers * resources.cpus_per_worker,
        resources.workers * resources.gpus_per_worker,
    )


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=4)
class RunnerActor:
    """The runner as one named, detached Ray actor; Ray restarts it if it dies."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from jobs.logs import configure_logging

        self.settings = Settings.model_validate(settings)
        configure_logging(self.settings)
        self.runner = Runner(self.settings)
        self.thread = threading.Thread(target=self.runner.run_forever, daemon=True)
        self.thread.start()

    def ping(self) -> bool:
        return self.thread.is_alive()

    def running_jobs(self) -> list[str]:
        return sorted(self.runner.processes)

    def wake(self) -> None:
        self.runner.wake()


def wake_runner() -> None:
    """Let the runner see a newly queued job at once; without a runner, it waits for one."""
    with contextlib.suppress(ValueError):  # no runner yet: it reads the queue when it starts
        ray.get_actor(RUNNER_NAME, namespace=NAMESPACE).wake.remote()


def ensure_runner(settings: Settings) -> Any:
    """Start the runner actor, or return the one already running."""
    return RunnerActor.options(
        name=RUNNER_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(settings.model_dump(mode="json"))
