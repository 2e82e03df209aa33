"""Shared fixtures: settings in a temporary home, the databases, a tiny base model, and one
real local Ray cluster with the tuneloop application on it for the whole test session."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy

from jobs.settings import Settings
from jobs.store import Store
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
