"""What the REST API returns: the same words as the store, shaped for clients."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from jobs.search import search_metric
from jobs.spec import JobSpec
from jobs.store import Dataset, EpochMetric, Job, JobLog, Model, ModelVersion, Trial
from server.auth import Scope


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class JobOut(Out):
    id: str
    model_name: str
    status: str
    trigger: str
    spec: dict[str, Any]
    error: str | None
    error_code: str | None
    result: dict[str, Any] | None
    model_version: int | None
    parent_version: int | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls.model_validate(job)


class JobList(BaseModel):
    jobs: list[JobOut]


class LogLineOut(Out):
    id: int
    at: datetime
    level: str
    message: str


class JobLogOut(BaseModel):
    job_id: str
    lines: list[LogLineOut]

    @classmethod
    def of(cls, job_id: str, lines: list[JobLog]) -> JobLogOut:
        return cls(job_id=job_id, lines=[LogLineOut.model_validate(line) for line in lines])


class EpochOut(Out):
    epoch: int
    metrics: dict[str, float]
    at: datetime


class JobMetricsOut(BaseModel):
    job_id: str
    epochs: list[EpochOut]

    @classmethod
    def of(cls, job_id: str, epochs: list[EpochMetric]) -> JobMetricsOut:
        return cls(job_id=job_id, epochs=[EpochOut.model_validate(e) for e in epochs])


class TrialOut(Out):
    trial_id: str
    state: str
    config: dict[str, Any] = Field(description="The searched values, by spec path.")
    curve: list[dict[str, float]] = Field(description="The metrics of each epoch.")
    best_metric: float | None
    best_epoch: int | None
    is_best: bool = Field(description="Whether this trial leads the search.")
    error: str | None
    started_at: datetime
    finished_at: datetime | None


class TrialList(BaseModel):
    job_id: str
    metric: str | None = Field(description="What trials are compared on; None if no search.")
    mode: str | None = Field(description="min or max: which way the metric improves.")
    trials: list[TrialOut]

    @classmethod
    def of(cls, job: Job, trials: list[Trial]) -> TrialList:
        spec = JobSpec.model_validate(job.spec)
        metric, mode = search_metric(spec) if spec.search else (None, None)
        return cls(
            job_id=job.id,
            metric=metric,
            mode=mode,
            trials=[TrialOut.model_validate(t) for t in trials],
        )


class DatasetOut(Out):
    id: str
    name: str
    format: str
    sha256: str
    size_bytes: int
    rows: int
    created_at: datetime

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetOut:
        return cls.model_validate(dataset)


class DatasetImportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(
        min_length=1,
        max_length=2048,
        description="An https URL of a CSV, JSONL or Parquet file; its name gives the format.",
    )
    name: str | None = Field(default=None, max_length=255)


class DatasetList(BaseModel):
    datasets: list[DatasetOut]


class VersionOut(Out):
    model_name: str
    version: int
    job_id: str | None
    metrics: dict[str, Any]
    dataset_hash: str
    parent_version: int | None
    created_at: datetime

    @classmethod
    def of(cls, version: ModelVersion) -> VersionOut:
        return cls.model_validate(version)


class ModelOut(Out):
    name: str
    production_version: int | None
    created_at: datetime
    versions: list[VersionOut] = []

    @classmethod
    def of(cls, model: Model, versions: list[ModelVersion] | None = None) -> ModelOut:
        out = cls.model_validate(model)
        out.versions = [VersionOut.of(v) for v in versions or []]
        return out


class ModelList(BaseModel):
    models: list[ModelOut]


# The largest integer every supported database stores in an integer column (PostgreSQL's).
MAX_SQL_INT = 2**31 - 1


class PromoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, le=MAX_SQL_INT)


class PredictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[str] = Field(
        min_length=1,
        max_length=256,
        description="Texts to classify; for an image model, images in base64, plain or as "
        "data URLs (data:image/png;base64,...).",
    )


class PredictionOut(BaseModel):
    id: str = Field(description="Quote it to send the true label as feedback.")
    label: str
    probabilities: dict[str, float]


class PredictOut(BaseModel):
    model: str
    version: int
    predictions: list[PredictionOut]


class FeedbackLabel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prediction_id: str = Field(max_length=32)
    label: str = Field(min_length=1, max_length=255)


class FeedbackRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=100_000)
    label: str = Field(min_length=1, max_length=255)


class FeedbackIn(BaseModel):
    """True labels for logged predictions, or new labelled rows."""

    model_config = ConfigDict(extra="forbid")
    labels: list[FeedbackLabel] = Field(default=[], max_length=10_000)
    rows: list[FeedbackRow] = Field(default=[], max_length=10_000)


class FeedbackOut(BaseModel):
    model: str
    accepted: int


class DriftReportOut(Out):
    id: str
    model_name: str
    version: int
    drift_detected: bool
    checks: dict[str, Any]
    reference_size: int
    current_size: int
    decision: str | None
    retrain_job_id: str | None
    at: datetime


class DriftReportList(BaseModel):
    reports: list[DriftReportOut]


class Health(BaseModel):
    status: str
    database: str


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, description="Who or what will use it.")
    scope: Scope = Field(description="read < submit < admin; each grants the ones below it.")
    expires_in_days: int | None = Field(
        default=None, ge=1, le=3650, description="Days until it stops working; never if unset."
    )


class TokenOut(Out):
    id: str
    name: str
    scope: str
    created_by: str | None
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenOut):
    token: str = Field(description="The token itself, shown this once; only its digest is kept.")


class TokenList(BaseModel):
    tokens: list[TokenOut]
