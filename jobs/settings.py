"""tuneloop's configuration: environment variables with the TUNELOOP_ prefix, read here only.

Paths are derived by methods rather than stored, so a test can move the whole home folder by
setting one variable.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELOOP_", extra="ignore")

    home: Path = Field(
        default=Path.home() / ".tuneloop",
        description="Folder holding the SQLite database, artifacts and uploads by default.",
    )
    database_url: str | None = Field(
        default=None, description="Any SQLAlchemy URL; SQLite under home when unset."
    )
    artifact_root: Path | None = Field(
        default=None, description="Checkpoints and model versions; home/artifacts when unset."
    )
    data_root: Path | None = Field(
        default=None,
        description="The only folder job specs may read datasets from; home/data when unset.",
    )
    ray_address: str | None = Field(default=None, description="Ray cluster to join.")
    ray_port: int = Field(default=6390, description="GCS port of the local Ray head.")
    ray_metrics_port: int = Field(default=8080, description="Where Ray exports its metrics.")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    max_running_jobs: int = Field(default=2, ge=1, description="Jobs the runner runs at once.")
    standby_job_process: bool = Field(
        default=True,
        description="While no job runs, keep one job process started ahead, with torch and "
        "transformers imported, so that a job starts without waiting for them (it holds about "
        "600 MiB while idle).",
    )
    max_trials: int = Field(default=64, ge=1, description="Most trials one search may ask for.")
    max_concurrent_trials: int = Field(
        default=4, ge=1, description="Most trials one search may run at once."
    )
    max_worker_failures: int = Field(
        default=2, ge=0, description="Worker-group restarts from a checkpoint before a job fails."
    )
    max_job_attempts: int = Field(
        default=3, ge=1, description="Starts of a job whose process dies before it fails."
    )
    job_startup_seconds: float = Field(
        default=300,
        gt=0,
        description="Time a started job's workers get to report before it counts as stalled.",
    )
    cancel_grace_seconds: float = Field(
        default=60, ge=0, description="Time a cancelled job's workers get to stop cleanly."
    )
    monitor_poll_seconds: float = Field(default=5.0, gt=0, description="Monitor round period.")
    train_poll_seconds: float = Field(
        default=0.2, gt=0, description="How often a trainer's controller collects reports."
    )
    runner_poll_seconds: float = Field(default=1.0, gt=0)
    max_upload_bytes: int = Field(default=100 * 1024 * 1024, ge=1)
    max_json_bytes: int = Field(
        default=1024 * 1024, ge=1, description="Largest request body that is not an upload."
    )
    remote_data_allow_http: bool = Field(
        default=False, description="Whether datasets may be imported over plain http."
    )
    remote_data_allowed_hosts: list[str] = Field(
        default=[],
        description="HOST:PORT pairs datasets may be imported from even though they resolve to "
        "private or loopback addresses, such as an internal mirror.",
    )
    predictor_cpus: float = Field(
        default=0.5, ge=0, description="CPUs reserved for each predictor replica."
    )
    predictor_threads: int = Field(
        default=1, ge=1, description="Torch threads each predictor replica computes with."
    )
    predict_max_batch_size: int = Field(default=32, ge=1)
    predict_batch_wait_seconds: float = Field(default=0.005, ge=0)
    predict_max_queued_requests: int = Field(
        default=64,
        ge=1,
        description="Predictions waiting for a predictor replica before more are refused with 503.",
    )
    log_format: str = Field(default="text", pattern="^(text|json)$")
    log_level: str = "INFO"
    # Excluded from dumps, so a token never travels in the Serve config, where anyone who can
    # read the config would find it; each API replica reads them from its own environment.
    admin_token: SecretStr | None = Field(
        default=None,
        exclude=True,
        description="An admin token (tl_<id>_<secret>) the API accepts from its start; only its "
        "digest is stored. For clusters, from a Secret.",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        exclude=True,
        description="A read token for Prometheus, bootstrapped like admin_token.",
    )

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'tuneloop.db'}"

    def resolved_artifact_root(self) -> Path:
        return self.artifact_root or self.home / "artifacts"

    def resolved_data_root(self) -> Path:
        return self.data_root or self.home / "data"

    def admin_token_file(self) -> Path:
        """Where the local stack keeps the admin token it made, readable by its owner only."""
        return self.home / "admin-token"

    def uploads_dir(self) -> Path:
        return self.resolved_data_root() / "uploads"

    def checkpoints_dir(self) -> Path:
        return self.resolved_artifact_root() / "checkpoints"

    def models_dir(self) -> Path:
        return self.resolved_artifact_root() / "models"

    def cache_dir(self) -> Path:
        return self.resolved_artifact_root() / "cache"

    def ensure_dirs(self) -> None:
        for path in (self.home, self.uploads_dir(), self.checkpoints_dir(), self.models_dir()):
            path.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
