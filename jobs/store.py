"""The database: the source of truth for jobs, datasets, logs, metrics and model versions.

SQLite in the home folder by default, any SQLAlchemy URL otherwise (PostgreSQL in production).
The schema is owned by the Alembic migrations in jobs/migrations; ``Store.open`` brings a
database up to date before use.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from jobs.errors import Conflict, NotFound

log = logging.getLogger(__name__)

# Tries at a model's next version number when another registration takes it first.
VERSION_ATTEMPTS = 8


class JobStatus(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


# RUNNING -> PENDING is the runner handing back a job whose process vanished, so that it
# resumes from its last checkpoint instead of being lost.
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PENDING}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Base(DeclarativeBase):
    pass


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    path: Mapped[str] = mapped_column(String(1024), doc="Relative to the data root.")
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), index=True, default=JobStatus.PENDING)
    trigger: Mapped[str] = mapped_column(String(16), default="user")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_code: Mapped[str | None] = mapped_column(
        String(32), nullable=True, doc="What kind of failure ended the job (jobs/failures.py)."
    )
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    dataset_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(128), unique=True, nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class JobLog(Base):
    __tablename__ = "job_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(8))
    message: Mapped[str] = mapped_column(Text)


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    __table_args__ = (UniqueConstraint("job_id", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class TrialState(StrEnum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    STOPPED = "STOPPED"
    FAILED = "FAILED"


class Trial(Base):
    """One trial of a search job: the values it tried, how it went and its best epoch.

    SUCCEEDED means it trained to its end (its own early stopping included); STOPPED means the
    scheduler, the time limit or a cancel ended it first.
    """

    __tablename__ = "trials"
    __table_args__ = (UniqueConstraint("job_id", "trial_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    trial_id: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    curve: Mapped[list[dict[str, float]]] = mapped_column(JSON, doc="Metrics of each epoch.")
    best_metric: Mapped[float | None] = mapped_column(Float, nullable=True)
    best_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    checkpoint: Mapped[str | None] = mapped_column(
        String(1024), nullable=True, doc="The best epoch's checkpoint folder."
    )
    is_best: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


def improves(score: float, best: float | None, mode: str) -> bool:
    """Whether ``score`` beats ``best`` in ``mode`` ("min" or "max"); a tie does not."""
    if best is None:
        return True
    return score < best if mode == "min" else score > best


class Model(Base):
    __tablename__ = "models"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    production_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(ForeignKey("models.name"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    path: Mapped[str] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    dataset_hash: Mapped[str] = mapped_column(String(64))
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Prediction(Base):
    """One logged prediction: what a served model was asked and what it answered."""

    __tablename__ = "predictions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    # The text, or for an image "image:" and its path under the data root.
    text: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(String(255))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Image models only: the model's own pooled features of the input, float32 bytes, which the
    # drift monitor compares instead of re-encoding every image.
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, default=None)

    __table_args__ = (Index("ix_predictions_model_version_at", "model_name", "version", "at"),)


class Feedback(Base):
    """A ground-truth label: for a logged prediction, or for a new row (with its text)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    prediction_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    text: Mapped[str | None] = mapped_column(Text, nullable=True)
    label: Mapped[str] = mapped_column(String(255))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class DriftReport(Base):
    """One drift check of a served model: its verdict, scores, and where its report lies."""

    __tablename__ = "drift_reports"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    drift_detected: Mapped[bool] = mapped_column(Boolean)
    checks: Mapped[dict[str, Any]] = mapped_column(JSON)
    reference_size: Mapped[int] = mapped_column(Integer)
    current_size: Mapped[int] = mapped_column(Integer)
    decision: Mapped[str | None] = mapped_column(Text, nullable=True)
    retrain_job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class ApiToken(Base):
    """A bearer token of the API. Only a SHA-256 digest of its secret is kept: the plain token
    is shown once, when it is made, and cannot be read back from here."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str | None] = mapped_column(
        String(32), nullable=True, doc="The token that made this one; none when bootstrapped."
    )
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a training worker writes; the busy timeout makes a writer
    # wait for the lock instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


class Store:
    """All reads and writes of tuneloop's state. Safe to open in any process of the cluster."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, upgrade: bool = True) -> Store:
        if upgrade:
            migrate(url)
        return cls(make_engine(url))

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # -- jobs ---------------------------------------------------------------------------------

    def create_job(self, job: Job) -> Job:
        with self.session() as session:
            session.add(job)
        self.append_log(job.id, "INFO", f"job {job.id} queued for model {job.model_name!r}")
        return job

    def get_job(self, job_id: str) -> Job:
        with self.session() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            return job

    def find_job_by_idempotency_key(self, key: str) -> Job | None:
        with self.session() as session:
            return session.scalars(select(Job).where(Job.idempotency_key == key)).first()

    def list_jobs(
        self, *, status: JobStatus | None = None, model_name: str | None = None, limit: int = 100
    ) -> list[Job]:
        query = select(Job).order_by(Job.created_at.desc()).limit(limit)
        if status is not None:
            query = query.where(Job.status == status)
        if model_name is not None:
            query = query.where(Job.model_name == model_name)
        with self.session() as session:
            return list(session.scalars(query))

    def pending_jobs(self, limit: int) -> list[Job]:
        query = (
            select(Job)
            .where(Job.status == JobStatus.PENDING)
            .order_by(Job.created_at, Job.id)
            .limit(limit)
        )
        with self.session() as session:
            return list(session.scalars(query))

    def transition(
        self,
        job_id: str,
        to: JobStatus,
        *,
        error: str | None = None,
        error_code: str | None = None,
        result: dict[str, Any] | None = None,
        model_version: int | None = None,
    ) -> bool:
        """Move a job to ``to``: the only place a job's status changes.

        The update is a compare-and-set on the statuses allowed to move to ``to``, so two
        processes racing to claim or finish the same job cannot both win. Returns whether this
        call made the change.
        """
        sources = [s for s, targets in ALLOWED_TRANSITIONS.items() if to in targets]
        now = utcnow()
        values: dict[str, Any] = {"status": to}
        if to is JobStatus.RUNNING:
            values |= {"started_at": now, "heartbeat_at": now, "attempts": Job.attempts + 1}
        if to.finished:
            values["finished_at"] = now
        if to is JobStatus.PENDING:
            values["started_at"] = None
        if error is not None:
            values["error"] = error
        if error_code is not None:
            values["error_code"] = error_code
        if result is not None:
            values["result"] = result
        if model_version is not None:
            values["model_version"] = model_version

        with self.session() as session:
            current = session.scalar(select(Job.status).where(Job.id == job_id))
            if current is None:
                raise NotFound(f"no job {job_id!r}", field="job_id")
            changed = session.execute(
                update(Job).where(Job.id == job_id, Job.status.in_(sources)).values(**values)
            ).rowcount
        if not changed:
            log.debug("job %s: %s -> %s refused, it is %s", job_id, current, to, current)
            return False

        line = f"status {current} -> {to}" + (f": {error}" if error else "")
        log.info("job %s: %s", job_id, line)
        self.append_log(job_id, "ERROR" if to is JobStatus.FAILED else "INFO", line)
        return True

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or flag a running one for the runner to stop."""
        job = self.get_job(job_id)
        if JobStatus(job.status).finished:
            raise Conflict(
                f"job {job_id!r} is already {job.status}; only queued or running "
                "jobs can be cancelled",
                field="job_id",
            )
        if job.status == JobStatus.PENDING and self.transition(job_id, JobStatus.CANCELLED):
            return self.get_job(job_id)
        with self.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        self.append_log(job_id, "INFO", "cancel requested")
        return self.get_job(job_id)

    def heartbeat(self, job_id: str) -> None:
        with self.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow()))

    def set_job_fields(self, job_id: str, **values: Any) -> None:
        """Write a job's non-status fields (dataset hash, result); never its status."""
        if "status" in values:
            raise ValueError("status changes go through Store.transition")
        with self.session() as session:
            session.execute(update(Job).where(Job.id == job_id).values(**values))

    def count_jobs_by_status(self) -> dict[str, int]:
        with self.session() as session:
            rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
            return {status: count for status, count in rows}

    def finished_jobs_summary(self) -> list[tuple[str, str, float | None]]:
        """(status, trigger, duration seconds) of every finished job, for the metrics."""
        finished = [s.value for s in JobStatus if s.finished]
        query = select(Job.status, Job.trigger, Job.started_at, Job.finished_at).where(
            Job.status.in_(finished)
        )
        with self.session() as session:
            return [
                (status, trigger, (end - start).total_seconds() if start and end else None)
                for status, trigger, start, end in session.execute(query)
            ]

    # -- logs and metrics ----------------------------------------------------------------------

    def append_log(self, job_id: str, level: str, message: str) -> None:
        with self.session() as session:
            session.add(JobLog(job_id=job_id, level=level, message=message))

    def read_log(self, job_id: str, *, after_id: int = 0, limit: int = 1000) -> list[JobLog]:
        query = (
            select(JobLog)
            .where(JobLog.job_id == job_id, JobLog.id > after_id)
            .order_by(JobLog.id)
            .limit(limit)
        )
        with self.session() as session:
            return list(session.scalars(query))

    def record_epoch(self, job_id: str, epoch: int, metrics: dict[str, float]) -> None:
        """Store one epoch's metrics; a resumed job that repeats an epoch overwrites it."""
        with self.session() as session:
            existing = session.scalars(
                select(EpochMetric).where(EpochMetric.job_id == job_id, EpochMetric.epoch == epoch)
            ).first()
            if existing is None:
                session.add(EpochMetric(job_id=job_id, epoch=epoch, metrics=metrics))
            else:
                existing.metrics = metrics
                existing.at = utcnow()

    def epoch_metrics(self, job_id: str) -> list[EpochMetric]:
        query = select(EpochMetric).where(EpochMetric.job_id == job_id).order_by(EpochMetric.epoch)
        with self.session() as session:
            return list(session.scalars(query))

    def count_epochs(self) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(EpochMetric)) or 0

    # -- search trials -------------------------------------------------------------------------

    def start_trial(self, job_id: str, trial_id: str, config: dict[str, Any]) -> None:
        """Record a trial as running; one restarted by a resumed search keeps its curve."""
        with self.session() as session:
            trial = self._trial(session, job_id, trial_id)
            if trial is None:
                session.add(
                    Trial(
                        job_id=job_id,
                        trial_id=trial_id,
                        config=config,
                        state=TrialState.RUNNING,
                        curve=[],
                        is_best=False,
                    )
                )
            else:
                trial.state, trial.finished_at, trial.error = TrialState.RUNNING, None, None

    def record_trial_epoch(
        self,
        job_id: str,
        trial_id: str,
        metrics: dict[str, float],
        *,
        metric: str,
        mode: str,
        checkpoint: str | None,
    ) -> None:
        """Add an epoch to a trial's curve, keeping its best epoch and the search's best trial.

        A repeated epoch (a trial resumed from a checkpoint) overwrites the earlier one. Of a
        trial's epochs that tie for best the latest counts, as it is the checkpoint Ray Train
        keeps; between trials a tie keeps the trial that got there first.
        """
        epoch = int(metrics["epoch"])
        with self.session() as session:
            trial = self._trial(session, job_id, trial_id)
            if trial is None:
                raise NotFound(f"job {job_id!r} has no trial {trial_id!r}", field="trial_id")
            kept = [row for row in trial.curve if row["epoch"] != epoch]
            trial.curve = sorted([*kept, metrics], key=lambda row: row["epoch"])
            score = metrics.get(metric)
            if score is None or (
                trial.best_metric is not None and improves(trial.best_metric, score, mode)
            ):
                return
            trial.best_metric, trial.best_epoch, trial.checkpoint = score, epoch, checkpoint
            leader = session.scalars(
                select(Trial).where(Trial.job_id == job_id, Trial.is_best.is_(True))
            ).first()
            if leader is None or leader.id == trial.id:
                trial.is_best = True
            elif improves(score, leader.best_metric, mode):
                leader.is_best, trial.is_best = False, True

    def finish_trial(
        self, job_id: str, trial_id: str, state: TrialState, *, error: str | None = None
    ) -> bool:
        """Move a running trial to ``state``; of two racing writers the first wins."""
        values: dict[str, Any] = {"state": state, "finished_at": utcnow()}
        if error is not None:
            values["error"] = error
        query = update(Trial).where(
            Trial.job_id == job_id, Trial.trial_id == trial_id, Trial.state == TrialState.RUNNING
        )
        with self.session() as session:
            return bool(session.execute(query.values(**values)).rowcount)

    def stop_running_trials(self, job_id: str) -> int:
        """Mark the trials a search left running as stopped; returns how many there were."""
        query = update(Trial).where(Trial.job_id == job_id, Trial.state == TrialState.RUNNING)
        with self.session() as session:
            result = session.execute(query.values(state=TrialState.STOPPED, finished_at=utcnow()))
            return int(result.rowcount)

    def list_trials(self, job_id: str) -> list[Trial]:
        query = select(Trial).where(Trial.job_id == job_id).order_by(Trial.trial_id)
        with self.session() as session:
            return list(session.scalars(query))

    def best_trial(self, job_id: str) -> Trial | None:
        query = select(Trial).where(Trial.job_id == job_id, Trial.is_best.is_(True))
        with self.session() as session:
            return session.scalars(query).first()

    def replace_epochs(self, job_id: str, curve: list[dict[str, float]]) -> None:
        """Make a job's epoch metrics exactly ``curve``: a search's winning trial, once known."""
        with self.session() as session:
            session.execute(delete(EpochMetric).where(EpochMetric.job_id == job_id))
            session.add_all(
                EpochMetric(job_id=job_id, epoch=int(row["epoch"]), metrics=row) for row in curve
            )

    @staticmethod
    def _trial(session: Session, job_id: str, trial_id: str) -> Trial | None:
        query = select(Trial).where(Trial.job_id == job_id, Trial.trial_id == trial_id)
        return session.scalars(query).first()

    # -- datasets ------------------------------------------------------------------------------

    def add_dataset(self, dataset: Dataset) -> Dataset:
        with self.session() as session:
            session.add(dataset)
        return dataset

    def get_dataset(self, dataset_id: str) -> Dataset:
        with self.session() as session:
            dataset = session.get(Dataset, dataset_id)
            if dataset is None:
                raise NotFound(f"no dataset {dataset_id!r}", field="dataset")
            return dataset

    def list_datasets(self) -> list[Dataset]:
        with self.session() as session:
            return list(session.scalars(select(Dataset).order_by(Dataset.created_at.desc())))

    # -- models --------------------------------------------------------------------------------

    def add_model_version(self, version: ModelVersion) -> ModelVersion:
        """Insert the next version number of a model, creating the model on first use.

        Jobs of one model can register at the same moment (two runners, or two job slots of
        one). Each registration inserts the model's row unless it is there, then takes the
        number under a lock: PostgreSQL's FOR UPDATE on that row, and on SQLite the database's
        single writer, held from that first insert. One refused all the same (a lock wait that
        ran out) is tried again.
        """
        attempt = 1
        while True:
            try:
                return self._insert_next_version(version)
            except (IntegrityError, OperationalError) as exc:
                if attempt == VERSION_ATTEMPTS:
                    raise
                log.info("model %s: retrying its next version number: %s", version.model_name, exc)
                time.sleep(0.05 * attempt)
                attempt += 1

    def _insert_next_version(self, version: ModelVersion) -> ModelVersion:
        name = version.model_name
        insert = postgresql_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        with self.session() as session:
            session.execute(insert(Model).values(name=name).on_conflict_do_nothing())
            session.execute(select(Model.name).where(Model.name == name).with_for_update())
            latest = session.scalar(
                select(func.max(ModelVersion.version)).where(ModelVersion.model_name == name)
            )
            version.version = (latest or 0) + 1
            session.add(version)
        return version

    def get_model(self, name: str) -> Model:
        with self.session() as session:
            model = session.get(Model, name)
            if model is None:
                raise NotFound(f"no model {name!r}", field="model_name")
            return model

    def list_models(self) -> list[Model]:
        with self.session() as session:
            return list(session.scalars(select(Model).order_by(Model.name)))

    def list_versions(self, name: str) -> list[ModelVersion]:
        query = (
            select(ModelVersion)
            .where(ModelVersion.model_name == name)
            .order_by(ModelVersion.version)
        )
        with self.session() as session:
            return list(session.scalars(query))

    def get_version(self, name: str, version: int) -> ModelVersion:
        query = select(ModelVersion).where(
            ModelVersion.model_name == name, ModelVersion.version == version
        )
        with self.session() as session:
            found = session.scalars(query).first()
            if found is None:
                raise NotFound(f"model {name!r} has no version {version}", field="version")
            return found

    def set_production(self, name: str, version: int) -> None:
        self.get_version(name, version)
        with self.session() as session:
            session.execute(
                update(Model).where(Model.name == name).values(production_version=version)
            )

    # -- API tokens ----------------------------------------------------------------------------

    def add_token(self, token: ApiToken) -> ApiToken:
        with self.session() as session:
            session.add(token)
        return token

    def find_token(self, token_id: str) -> ApiToken | None:
        with self.session() as session:
            return session.get(ApiToken, token_id)

    def list_tokens(self) -> list[ApiToken]:
        with self.session() as session:
            return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at)))

    def revoke_token(self, token_id: str) -> ApiToken:
        """Revoke a token from now on; revoking it again keeps the first time."""
        with self.session() as session:
            token = session.get(ApiToken, token_id)
            if token is None:
                raise NotFound(f"no token {token_id!r}", field="token_id")
            if token.revoked_at is None:
                token.revoked_at = utcnow()
            return token

    # -- traffic, feedback and drift -----------------------------------------------------------

    def add_predictions(self, rows: list[Prediction]) -> None:
        with self.session() as session:
            session.add_all(rows)

    def recent_predictions(
        self, name: str, version: int, *, limit: int, since: datetime | None = None
    ) -> list[Prediction]:
        """The newest ``limit`` logged predictions of one version, oldest first."""
        query = (
            select(Prediction)
            .where(Prediction.model_name == name, Prediction.version == version)
            .order_by(Prediction.at.desc(), Prediction.id)
            .limit(limit)
        )
        if since is not None:
            query = query.where(Prediction.at >= since)
        with self.session() as session:
            return list(reversed(list(session.scalars(query))))

    def add_feedback(self, rows: list[Feedback]) -> None:
        with self.session() as session:
            session.add_all(rows)

    def labelled_feedback(
        self, name: str, *, since: datetime | None = None
    ) -> list[tuple[str, str, str | None]]:
        """(text, label, prediction id) of every labelled row for a model, oldest first.

        A label for a logged prediction takes its text from the prediction log; a label whose
        prediction was never logged (sampled out, or dropped) is skipped.
        """
        query = (
            select(Feedback, Prediction.text)
            .outerjoin(Prediction, Prediction.id == Feedback.prediction_id)
            .where(Feedback.model_name == name)
            .order_by(Feedback.at, Feedback.id)
        )
        if since is not None:
            query = query.where(Feedback.at >= since)
        with self.session() as session:
            rows = session.execute(query).all()
        return [
            (feedback.text or logged, feedback.label, feedback.prediction_id)
            for feedback, logged in rows
            if (feedback.text or logged) is not None
        ]

    def add_drift_report(self, report: DriftReport) -> DriftReport:
        with self.session() as session:
            session.add(report)
        return report

    def list_drift_reports(self, name: str, limit: int = 50) -> list[DriftReport]:
        query = (
            select(DriftReport)
            .where(DriftReport.model_name == name)
            .order_by(DriftReport.at.desc())
            .limit(limit)
        )
        with self.session() as session:
            return list(session.scalars(query))

    def get_drift_report(self, report_id: str) -> DriftReport:
        with self.session() as session:
            report = session.get(DriftReport, report_id)
            if report is None:
                raise NotFound(f"no drift report {report_id!r}", field="report_id")
            return report

    def jobs_in_flight(self, name: str, trigger: str) -> list[Job]:
        query = select(Job).where(
            Job.model_name == name,
            Job.trigger == trigger,
            Job.status.in_([JobStatus.PENDING, JobStatus.RUNNING]),
        )
        with self.session() as session:
            return list(session.scalars(query))

    def last_job(self, name: str, trigger: str) -> Job | None:
        query = (
            select(Job)
            .where(Job.model_name == name, Job.trigger == trigger)
            .order_by(Job.created_at.desc())
            .limit(1)
        )
        with self.session() as session:
            return session.scalars(query).first()

    def set_drift_decision(self, report_id: str, decision: str, job_id: str | None) -> None:
        with self.session() as session:
            session.execute(
                update(DriftReport)
                .where(DriftReport.id == report_id)
                .values(decision=decision, retrain_job_id=job_id)
            )

    def promotion_decisions(self) -> list[tuple[str, bool]]:
        """(model, promoted) for every succeeded job, from the decision in its result."""
        query = select(Job.model_name, Job.result).where(Job.status == JobStatus.SUCCEEDED)
        with self.session() as session:
            rows = session.execute(query).all()
        return [
            (model, bool(result["promotion"]["promote"]))
            for model, result in rows
            if result and "promotion" in result
        ]
