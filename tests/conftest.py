"""Shared fixtures: settings in a temporary home, the databases, a tiny base model, and one
real local Ray cluster with the tuneloop application on it for the whole test session."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy

from jobs.settings import Settings
from jobs.store import Store
from server.auth import Scope, issue_token
from server.client import Client
from tests.factories import build_tiny_bert, write_sentiment_csv

POSTGRES_URL = os.environ.get(
    "TUNELOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def postgres_reachable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        engine = sqlalchemy.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("select 1"))
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL at {POSTGRES_URL} is not reachable: {type(exc).__name__}"
    return None


def fresh_postgres_url() -> str:
    """A PostgreSQL URL on an empty schema of its own, so tests never see each other's rows."""
    engine = sqlalchemy.create_engine(POSTGRES_URL)
    schema = f"t_{os.getpid()}_{os.urandom(4).hex()}"
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text(f"create schema {schema}"))
    engine.dispose()
    return f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tuneloop.db'}"
    reason = postgres_reachable()
    if reason:
        pytest.skip(reason)
    return fresh_postgres_url()


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    opened = Store.open(database_url)
    yield opened
    opened.engine.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    made = Settings(home=tmp_path / "home")
    made.ensure_dirs()
    return made


@pytest.fixture
def local_store(settings: Settings) -> Iterator[Store]:
    opened = Store.open(settings.resolved_database_url())
    yield opened
    opened.engine.dispose()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture
def amazon_csv(settings: Settings) -> Path:
    return write_sentiment_csv("amazon", settings.resolved_data_root() / "amazon.csv")


@dataclass
class Stack:
    """The tuneloop application running on the session's Ray cluster."""

    settings: Settings
    client: Client
    store: Store
    url: str
    token: str = field(repr=False)

    @property
    def auth(self) -> dict[str, str]:
        """Headers for a raw HTTP call made with the stack's admin token."""
        return {"Authorization": f"Bearer {self.token}"}

    def data_file(self, name: str, frame: pd.DataFrame) -> str:
        """Write ``frame`` as a CSV under the data root and return its spec path."""
        frame.to_csv(self.settings.resolved_data_root() / name, index=False)
        return name

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


RAY_METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One real local Ray cluster for the session. Four logical CPUs on two cores, so that the
    predictor and two small jobs fit at once; Ray's metrics on a known port for Prometheus."""
    import ray
    from ray import serve

    ray.init(
        address="local",  # always a new cluster, never one that happens to run here already
        num_cpus=4,
        namespace="tuneloop",
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        _metrics_export_port=RAY_METRICS_PORT,
    )
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def stack(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from ray import serve

    from server.app import APP_NAME, build_app
    from server.local import wait_healthy

    settings = Settings(
        home=tmp_path_factory.mktemp("stack-home"),
        api_port=free_port(),
        runner_poll_seconds=0.2,
        max_running_jobs=2,
        predictor_cpus=0.5,
    )
    settings.ensure_dirs()
    serve.start(http_options={"host": "127.0.0.1", "port": settings.api_port})
    serve.run(
        build_app(settings.model_dump(mode="json")), name=APP_NAME, route_prefix="/", blocking=False
    )
    url = f"http://127.0.0.1:{settings.api_port}"
    wait_healthy(url, timeout=180)
    store = Store.open(settings.resolved_database_url())
    _, token = issue_token(store, name="tests", scope=Scope.ADMIN)
    with Client(url, token=token) as client:
        yield Stack(settings, client, store, url, token)
    store.engine.dispose()


def tiny_spec(tiny_model_dir: Path, path: str, **overrides: Any) -> dict[str, Any]:
    """A spec for the tiny model that trains in seconds."""
    spec: dict[str, Any] = {
        "model_name": "tiny",
        "base_model": str(tiny_model_dir),
        "data": {"path": path, "validation_split": 0.25},
        "strategy": {"kind": "partial", "frozen_layers": 1},
        "hyperparameters": {
            "epochs": 2,
            "batch_size": 32,
            "max_length": 32,
            "encoder_lr": 5e-4,
            "head_lr": 5e-3,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec
