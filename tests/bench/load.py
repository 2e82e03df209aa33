"""Load test: job submissions, status reads and predictions at once, for a fixed time.

A fresh tuneloop stack on a local Ray cluster (the same one ``make bench`` starts) first trains
a tiny model so that there is something to predict with. Then, for ``--seconds`` (60 by
default), over loopback HTTP with the stack's token:

- one submitter posts a small training job every ``--submit-every`` seconds, each with an
  ``Idempotency-Key`` of its own;
- ``--readers`` clients read the status of a random submitted job, back to back;
- ``--predictors`` clients ask the served model for one prediction each, back to back.

When the window closes, the submitted jobs are followed until every one has finished. The run
fails (exit status 1) on any error answer, any job that did not succeed, or any job the API does
not list: the load must cost latency, never work. It prints a table of throughput and latency
per kind of request and writes bench-results/load.json.

Run from the repository root: ``make load`` (or ``python -m tests.bench.load``).
"""

# ruff: noqa: E402  (the repository root must be on sys.path before tuneloop imports)

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
import asyncio
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import ray
import transformers

from jobs.store import JobStatus
from tests.bench.bench_drift import machine
from tests.bench.bench_speed import Bench, running_stack, submit_and_wait, tiny_job

logger = logging.getLogger("load")

RESULTS = ROOT / "bench-results" / "load.json"
# One epoch on a few hundred rows: each job is real work for the runner, but short.
LOAD_JOB_HP = {"epochs": 1, "batch_size": 32, "max_length": 32, "encoder_lr": 5e-4, "head_lr": 5e-3}
SETTLE_TIMEOUT_S = 900


@dataclass
class Kind:
    """The answers one kind of request got during the window."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def record(self, started: float, response: httpx.Response) -> None:
        self.latencies.append(time.perf_counter() - started)
        if response.status_code >= 400:
            self.errors.append(f"{response.status_code} {response.text[:200]}")

    def summary(self, seconds: float) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float:
            return 1000 * ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0

        return {
            "requests": len(ordered),
            "per_second": len(ordered) / seconds,
            "p50_ms": quantile(0.50),
            "p99_ms": quantile(0.99),
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
        }


@dataclass
class Load:
    url: str
    headers: dict[str, str]
    model: str
    texts: list[str]
    job_spec: dict[str, Any]
    seconds: float
    submit_every: float
    readers: int
    predictors: int
    submitted: list[str] = field(default_factory=list)
    kinds: dict[str, Kind] = field(
        default_factory=lambda: {"submit": Kind(), "status": Kind(), "predict": Kind()}
    )

    async def run(self) -> float:
        limits = httpx.Limits(max_connections=self.readers + self.predictors + 2)
        async with httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=120, limits=limits
        ) as http:
            started = time.perf_counter()
            deadline = started + self.seconds
            await asyncio.gather(
                self.submitter(http, deadline),
                *(self.reader(http, deadline) for _ in range(self.readers)),
                *(self.predictor(http, deadline) for _ in range(self.predictors)),
            )
            return time.perf_counter() - started

    async def submitter(self, http: httpx.AsyncClient, deadline: float) -> None:
        kind = self.kinds["submit"]
        while time.perf_counter() < deadline:
            key = f"load-{len(self.submitted)}-{os.urandom(4).hex()}"
            started = time.perf_counter()
            response = await http.post(
                "/v1/jobs", json=self.job_spec, headers={"Idempotency-Key": key}
            )
            kind.record(started, response)
            if response.status_code == 201:
                self.submitted.append(response.json()["id"])
            await asyncio.sleep(max(0.0, started + self.submit_every - time.perf_counter()))

    async def reader(self, http: httpx.AsyncClient, deadline: float) -> None:
        kind = self.kinds["status"]
        while time.perf_counter() < deadline:
            if not self.submitted:
                await asyncio.sleep(0.05)
                continue
            started = time.perf_counter()
            kind.record(started, await http.get(f"/v1/jobs/{random.choice(self.submitted)}"))

    async def predictor(self, http: httpx.AsyncClient, deadline: float) -> None:
        kind = self.kinds["predict"]
        while time.perf_counter() < deadline:
            body = {"inputs": [random.choice(self.texts)]}
            started = time.perf_counter()
            kind.record(started, await http.post(f"/v1/models/{self.model}/predict", json=body))


def settle(bench: Bench, ids: list[str]) -> dict[str, Any]:
    """Follow every submitted job to its end; what the store and the API say of each."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    remaining = set(ids)
    while remaining and time.monotonic() < deadline:
        finished = {i for i in remaining if JobStatus(bench.store.get_job(i).status).finished}
        if finished:
            remaining -= finished
            logger.info("%d of %d submitted jobs finished", len(ids) - len(remaining), len(ids))
        time.sleep(1)
    jobs = [bench.store.get_job(i) for i in ids]
    listed = {job["id"] for job in bench.client.jobs(model_name="load-jobs", limit=1000)}
    return {
        "submitted": len(ids),
        "succeeded": sum(job.status == JobStatus.SUCCEEDED for job in jobs),
        "not_succeeded": {
            job.id: f"{job.status}: {job.error}"
            for job in jobs
            if job.status != JobStatus.SUCCEEDED
        },
        "not_listed": sorted(set(ids) - listed),
        "attempts_over_one": sorted(job.id for job in jobs if job.attempts > 1),
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| request | requests | per second | p50 | p99 | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in results["requests"].items():
        lines.append(
            f"| {name} | {row['requests']} | {row['per_second']:.1f} | {row['p50_ms']:.0f} ms "
            f"| {row['p99_ms']:.0f} ms | {row['errors']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--submit-every", type=float, default=5)
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--predictors", type=int, default=8)
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    random.seed(0)
    results: dict[str, Any] = {"settings": vars(args)}
    with (
        tempfile.TemporaryDirectory(prefix="load-") as home,
        running_stack(Path(home)) as bench,
    ):
        logger.info("training the model the predictions go to")
        served = submit_and_wait(bench, tiny_job(bench))
        spec = {**tiny_job(bench), "model_name": "load-jobs", "hyperparameters": LOAD_JOB_HP}
        load = Load(
            bench.url,
            bench.headers,
            served.spec["model_name"],
            bench.texts,
            spec,
            args.seconds,
            args.submit_every,
            args.readers,
            args.predictors,
        )
        logger.info("mixed load for %.0f s", args.seconds)
        window = asyncio.run(load.run())
        results["window_seconds"] = window
        results["requests"] = {name: kind.summary(window) for name, kind in load.kinds.items()}
        logger.info("window closed; following %d submitted jobs", len(load.submitted))
        results["jobs"] = settle(bench, load.submitted)
    results["machine"] = {**machine(), "ray": ray.__version__}
    results["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")

    print(table(results))
    jobs = results["jobs"]
    print(
        f"\njobs: {jobs['submitted']} submitted, {jobs['succeeded']} succeeded, "
        f"{len(jobs['not_listed'])} missing from the API's list, "
        f"{len(jobs['attempts_over_one'])} needed more than one attempt"
    )
    host = results["machine"]
    print(f"{host['cpu_model']}, {host['cores']} cores; {results['date']}; written to {RESULTS}")
    errors = sum(row["errors"] for row in results["requests"].values())
    if errors or jobs["not_succeeded"] or jobs["not_listed"] or not jobs["submitted"]:
        print(f"FAILED: {errors} error answers; jobs not succeeded: {jobs['not_succeeded']}")
        sys.exit(1)


if __name__ == "__main__":
    main()
