from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from jobs.errors import Conflict, NotFound
from jobs.store import Base, Job, JobStatus, ModelVersion, Store, new_id


def make_job(store: Store, **fields: object) -> Job:
    job = Job(
        id=new_id("job"),
        model_name="reviews",
        spec={"model_name": "reviews"},
        trigger="user",
        attempts=0,
        cancel_requested=False,
        **fields,
    )
    return store.create_job(job)


def test_migrations_build_exactly_the_models(store: Store) -> None:
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_job_moves_through_its_states_with_times(store: Store) -> None:
    job = make_job(store)
    assert store.transition(job.id, JobStatus.RUNNING)
    running = store.get_job(job.id)
    assert running.started_at is not None and running.attempts == 1
    assert store.transition(job.id, JobStatus.SUCCEEDED, result={"ok": 1}, model_version=1)
    done = store.get_job(job.id)
    assert done.status == JobStatus.SUCCEEDED and done.finished_at is not None
    assert done.result == {"ok": 1} and done.model_version == 1
    messages = [line.message for line in store.read_log(job.id)]
    assert "status PENDING -> RUNNING" in messages and "status RUNNING -> SUCCEEDED" in messages


def test_finished_job_cannot_change_state(store: Store) -> None:
    job = make_job(store)
    store.transition(job.id, JobStatus.CANCELLED)
    assert not store.transition(job.id, JobStatus.RUNNING)
    assert store.get_job(job.id).status == JobStatus.CANCELLED


def test_only_one_of_many_racing_claims_wins(store: Store) -> None:
    job = make_job(store)
    wins: list[bool] = []

    def claim() -> None:
        wins.append(store.transition(job.id, JobStatus.RUNNING))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins.count(True) == 1
    assert store.get_job(job.id).attempts == 1


def test_status_is_written_only_by_transition(store: Store) -> None:
    job = make_job(store)
    with pytest.raises(ValueError, match=r"Store\.transition"):
        store.set_job_fields(job.id, status=JobStatus.SUCCEEDED)


def test_cancel_of_a_queued_job_is_immediate(store: Store) -> None:
    job = make_job(store)
    assert store.request_cancel(job.id).status == JobStatus.CANCELLED


def test_cancel_of_a_running_job_is_flagged_for_the_runner(store: Store) -> None:
    job = make_job(store)
    store.transition(job.id, JobStatus.RUNNING)
    flagged = store.request_cancel(job.id)
    assert flagged.status == JobStatus.RUNNING and flagged.cancel_requested


def test_cancel_of_a_finished_job_is_a_conflict(store: Store) -> None:
    job = make_job(store)
    store.transition(job.id, JobStatus.FAILED, error="boom")
    with pytest.raises(Conflict, match="already FAILED"):
        store.request_cancel(job.id)


def test_unknown_job_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="job-nope"):
        store.get_job("job-nope")


def test_repeated_epoch_overwrites_instead_of_duplicating(store: Store) -> None:
    job = make_job(store)
    store.record_epoch(job.id, 1, {"val_accuracy": 0.5})
    store.record_epoch(job.id, 1, {"val_accuracy": 0.7})
    epochs = store.epoch_metrics(job.id)
    assert [(e.epoch, e.metrics["val_accuracy"]) for e in epochs] == [(1, 0.7)]


def test_versions_registered_at_once_each_get_a_number(database_url: str) -> None:
    # Jobs of one model finishing together, each in a process with its own connections.
    stores = [Store.open(database_url) for _ in range(6)]
    start = threading.Barrier(len(stores))

    def register(store: Store) -> int:
        start.wait()
        added = store.add_model_version(
            ModelVersion(
                model_name="raced", version=0, path="p", metrics={}, spec={}, dataset_hash="h"
            )
        )
        return added.version

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            numbers = list(pool.map(register, stores))
    finally:
        for store in stores:
            store.engine.dispose()
    assert sorted(numbers) == [1, 2, 3, 4, 5, 6]


def test_versions_number_from_one_and_production_is_set(store: Store) -> None:
    def version() -> ModelVersion:
        return store.add_model_version(
            ModelVersion(
                model_name="reviews", version=0, path="p", metrics={}, spec={}, dataset_hash="h"
            )
        )

    assert [version().version, version().version] == [1, 2]
    store.set_production("reviews", 2)
    assert store.get_model("reviews").production_version == 2
    with pytest.raises(NotFound, match="no version 9"):
        store.set_production("reviews", 9)
