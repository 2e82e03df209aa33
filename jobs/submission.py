"""Accepting a job: everything that can be checked is checked before it queues."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from sqlalchemy.exc import IntegrityError

from jobs.data import DataCatalog
from jobs.errors import Conflict
from jobs.model import check_strategy, check_task
from jobs.registry import pin_base, resolve_base
from jobs.search import check_search
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.store import Job, Store, new_id

log = logging.getLogger(__name__)


def request_hash(spec: JobSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_document(), sort_keys=True).encode()).hexdigest()


def submit_job(
    *,
    store: Store,
    settings: Settings,
    spec: JobSpec,
    trigger: str = "user",
    parent_version: int | None = None,
    idempotency_key: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Job:
    """Check a spec's model and data in full, then queue it; the same key returns the same job."""
    digest = request_hash(spec)
    if idempotency_key is not None:
        existing = _same_request(store, idempotency_key, digest)
        if existing is not None:
            return existing

    spec = pin_base(spec, settings, store)
    base_dir = resolve_base(spec, settings, store)
    check_task(spec.task, base_dir)
    check_strategy(spec.strategy, base_dir)
    check_search(spec, settings, base_dir)
    prepared = DataCatalog(settings, store).load(
        spec.data, seed=spec.hyperparameters.seed, task=spec.task
    )

    job = Job(
        id=new_id("job"),
        model_name=spec.model_name,
        spec=spec.to_document(),
        trigger=trigger,
        parent_version=parent_version,
        dataset_hash=prepared.sha256,
        idempotency_key=idempotency_key,
        request_hash=digest,
        attempts=0,
        cancel_requested=False,
        result=extra,
    )
    try:
        store.create_job(job)
    except IntegrityError:
        # Another request with the same key won the insert between our check and our write.
        existing = _same_request(store, idempotency_key or "", digest)
        if existing is None:
            raise
        return existing
    log.info(
        "job %s: queued, model %s, %d training rows, %d validation rows, trigger %s",
        job.id,
        spec.model_name,
        len(prepared.train),
        len(prepared.validation),
        trigger,
    )
    return job


def _same_request(store: Store, key: str, digest: str) -> Job | None:
    existing = store.find_job_by_idempotency_key(key)
    if existing is not None and existing.request_hash != digest:
        raise Conflict(
            f"Idempotency-Key {key!r} was used for job {existing.id} with a different spec",
            field="Idempotency-Key",
        )
    return existing
