"""Benchmark: tuneloop against the limit of the same machine, every figure a side-by-side ratio.

Each figure runs tuneloop and a reference that does the same work with nothing around it, in
one run, on the same model, data and torch threads:

1. training: samples per second in the training phase of a job ÷ a plain PyTorch loop over the
   same model, batches, optimizer parameter groups and schedule;
2. frozen encoder: wall time of a five-epoch ``feature_extraction`` job whose encoder outputs
   are cached (as a search trial or a retraining finds them) against the same job computing the
   frozen encoder in every step (strategy ``partial`` with every layer frozen);
3. job overhead: a tiny job from submission to SUCCEEDED through the API and the runner ÷ the
   plain loop of figure 1 in a bare Ray ``TorchTrainer``, and the time from submission to the
   first training step of each;
4. serving: predictions per second with 16 concurrent HTTP clients ÷ a plain forward pass of the
   same model over batches of 16 texts; latency at one client minus a plain one-text pass;
5. drift: one check of 1000 against 1000 embeddings ÷ its MMD permutation test alone;
6. API: job-status reads per second over HTTP ÷ the same reads straight from the store, both at
   8 concurrent readers.

Everything runs at one torch thread: a job's worker gets ``cpus_per_worker`` threads (1 by
default) and a predictor replica ``predictor_threads``. The references run in Ray worker
processes too (the plain loop in a bare ``TorchTrainer``, the plain forward pass and the store
reads in Ray tasks), since Ray lowers its workers' priority and a busy machine would otherwise
favour the reference. The tiny BERT of the tests serves the
training and overhead figures, the builtin MiniLM the frozen-encoder and serving ones; the data
is the 1000 Amazon sentences. Side by side, the ratios cancel most of the load other processes
put on the machine, not all of it: the JSON records the load average before and after.

Run from the repository root: ``make bench`` (or ``python -m tests.bench.bench_speed``).
Prints a markdown table and writes bench-results/speed.json.
"""

# ruff: noqa: E402  (the repository root must be on sys.path before tuneloop imports)

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asyncio
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import ray
import torch
import transformers
from ray import serve
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jobs.data import DataCatalog, PreparedData
from jobs.inference import Classifier
from jobs.model import apply_strategy, build_classifier, load_tokenizer, parameter_groups
from jobs.registry import Registry
from jobs.runner import job_processes
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.store import Job, JobStatus, Store
from jobs.train import trim_padding
from monitoring.drift import DriftConfig, check_drift, mmd_permutation_test
from server.app import APP_NAME, build_app
from server.auth import Scope, issue_token
from server.client import Client
from server.local import wait_healthy
from tests.bench.bench_drift import load_traffic, machine, median_seconds
from tests.factories import build_tiny_bert, read_sentiment, write_sentiment_csv

logger = logging.getLogger("bench_speed")

RESULTS = ROOT / "bench-results" / "speed.json"
THREADS = 1
ROUNDS = 2  # tuneloop and reference alternate, best of each, so a burst of load hits both
CLIENTS = 16
SERVE_REQUESTS = 480
SINGLE_REQUESTS = 60
READERS = 8
READS = 1200
DRIFT_REPEATS = 3

TINY_HP = {"epochs": 3, "batch_size": 32, "max_length": 32, "encoder_lr": 5e-4, "head_lr": 5e-3}
MINILM_HP = {"epochs": 5, "batch_size": 16, "max_length": 32, "head_lr": 3e-3}


@dataclass
class Bench:
    """A fresh tuneloop stack on a local Ray cluster, and the data and models the figures use."""

    settings: Settings
    store: Store
    client: Client
    url: str
    headers: dict[str, str]  # the bench's admin token, for raw HTTP calls
    tiny_dir: Path
    texts: list[str]
    labels: list[int]


@contextmanager
def running_stack(home: Path) -> Iterator[Bench]:
    settings = Settings(home=home, api_port=free_port())
    settings.ensure_dirs()
    write_sentiment_csv("amazon", settings.resolved_data_root() / "amazon.csv")
    tiny_dir = build_tiny_bert(home / "tiny-bert")
    frame = read_sentiment("amazon")
    ray.init(
        address="local",
        num_cpus=4,
        namespace="tuneloop",
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": settings.api_port})
        serve.run(
            build_app(settings.model_dump(mode="json")),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
        url = f"http://127.0.0.1:{settings.api_port}"
        wait_healthy(url, timeout=300)
        store = Store.open(settings.resolved_database_url())
        _, token = issue_token(store, name="bench", scope=Scope.ADMIN)
        with Client(url, token=token, timeout=600) as client:
            yield Bench(
                settings,
                store,
                client,
                url,
                {"Authorization": f"Bearer {token}"},
                tiny_dir,
                frame["text"].tolist(),
                frame["label"].tolist(),
            )
    finally:
        serve.shutdown()
        ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- jobs through the API ------------------------------------------------------------------------


def submit_and_wait(bench: Bench, spec: dict[str, Any]) -> Job:
    """Run a job as on a server that has been up a while: its process was started ahead. The
    next job's process is started once this one has ended; it is waited for, so that its
    imports take no CPU from whatever is measured next."""
    wait_for_standby(bench)
    job_id = bench.client.submit(spec)["id"]
    while True:
        job = bench.store.get_job(job_id)
        if JobStatus(job.status).finished:
            break
        time.sleep(0.05)
    if job.status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job_id} ended {job.status}: {job.error}")
    wait_for_standby(bench)
    return job


def wait_for_standby(bench: Bench, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not job_processes(bench.settings)[1]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the runner started no job process ahead in {timeout:.0f}s")
        time.sleep(0.2)


def prepared(bench: Bench, spec: dict[str, Any]) -> PreparedData:
    """The training and validation rows a job with this spec gets."""
    parsed = JobSpec.model_validate(spec)
    return DataCatalog(bench.settings, bench.store).load(
        parsed.data, seed=parsed.hyperparameters.seed
    )


def train_seconds(bench: Bench, job: Job) -> tuple[int, float]:
    """Samples trained and seconds spent in the training phase, summed over the epochs."""
    rows = len(prepared(bench, job.spec).train)
    samples, seconds = 0, 0.0
    for row in bench.store.epoch_metrics(job.id):
        samples += rows
        seconds += rows / row.metrics["train_samples_per_second"]
    return samples, seconds


def first_step_seconds(bench: Bench, job: Job) -> float:
    """From submission to the worker's 'training from epoch' log line, just before step one."""
    for line in bench.store.read_log(job.id):
        if line.message.startswith("training from epoch"):
            return (line.at - job.created_at).total_seconds()
    raise RuntimeError(f"job {job.id} logged no start of training")


def job_spec(bench: Bench, name: str, base_model: str, **parts: Any) -> dict[str, Any]:
    return {
        "model_name": name,
        "base_model": base_model,
        "data": {"path": "amazon.csv", "validation_split": 0.2},
        **parts,
    }


def tiny_job(bench: Bench) -> dict[str, Any]:
    return job_spec(
        bench,
        "bench-tiny",
        str(bench.tiny_dir),
        strategy={"kind": "full"},
        hyperparameters=TINY_HP,
    )


# -- the plain PyTorch reference -----------------------------------------------------------------


def plain_training(
    base_dir: str, texts: list[str], labels: list[int], spec_document: dict[str, Any]
) -> dict[str, float]:
    """The same model, batches, parameter groups and schedule as a job, and nothing else.

    Its batches lose their all-padding columns as a job's do, so the ratio measures what a job
    adds around the same arithmetic.
    """
    spec = JobSpec.model_validate(spec_document)
    hp = spec.hyperparameters
    torch.set_num_threads(THREADS)
    torch.manual_seed(hp.seed)
    tokenizer = load_tokenizer(Path(base_dir))
    model = build_classifier(Path(base_dir), 2, hp.dropout)
    apply_strategy(model, spec.strategy)
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=hp.max_length, return_tensors="pt"
    )
    loader = DataLoader(
        TensorDataset(encoded["input_ids"], encoded["attention_mask"], torch.tensor(labels)),
        batch_size=hp.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(hp.seed),
    )
    optimizer = torch.optim.AdamW(parameter_groups(model, hp))
    total = len(loader) * hp.epochs
    scheduler = transformers.get_linear_schedule_with_warmup(
        optimizer, int(total * hp.warmup_ratio), total
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    first_step = None
    samples, started = 0, time.perf_counter()
    for _ in range(hp.epochs):
        for ids, mask, batch_labels in loader:
            first_step = first_step or time.time()
            loss = loss_fn(model(*trim_padding(ids, mask)), batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            samples += len(batch_labels)
    return {
        "samples": samples,
        "seconds": time.perf_counter() - started,
        "first_step_at": first_step or time.time(),
    }


def plain_training_in_ray(config: dict[str, Any]) -> None:
    # Ray Train v2 keeps no metrics reported without a checkpoint, so they go to a file.
    outcome = plain_training(**{k: v for k, v in config.items() if k != "out"})
    Path(config["out"]).write_text(json.dumps(outcome))


def bare_trainer(bench: Bench, spec: dict[str, Any], data: PreparedData) -> dict[str, float]:
    """The plain loop in a bare TorchTrainer: one worker of one CPU, like the job's."""
    out = bench.settings.home / "bare-trainer.json"
    submitted = time.time()
    trainer = TorchTrainer(
        plain_training_in_ray,
        train_loop_config={
            "base_dir": spec["base_model"],
            "texts": data.train.texts,
            "labels": data.label_ids(data.train),
            "spec_document": spec,
            "out": str(out),
        },
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(bench.settings.home / "bare-trainer")),
    )
    result = trainer.fit()
    finished = time.time()
    if result.error is not None:
        raise result.error
    outcome = json.loads(out.read_text())
    return {
        "end_to_end_s": finished - submitted,
        "first_step_s": outcome["first_step_at"] - submitted,
        "samples_per_second": outcome["samples"] / outcome["seconds"],
    }


def in_ray(function: Callable[..., dict[str, float]], *args: Any) -> dict[str, float]:
    """Run a reference in a Ray worker process, as tuneloop's own parts run.

    Ray lowers its workers' scheduling priority (niceness 15); a reference run in this process
    would get more of a busy machine than the tuneloop side it is compared with.
    """
    return dict(ray.get(ray.remote(num_cpus=0)(function).remote(*args)))


# -- figures -------------------------------------------------------------------------------------


def figure(
    name: str,
    tuneloop: float,
    reference: float,
    unit: str,
    target: str,
    met: bool,
    **details: Any,
) -> dict[str, Any]:
    ratio = tuneloop / reference
    logger.info(
        "%s: tuneloop %.4g, reference %.4g %s, ratio %.3f", name, tuneloop, reference, unit, ratio
    )
    return {
        "figure": name,
        "tuneloop": tuneloop,
        "reference": reference,
        "unit": unit,
        "ratio": ratio,
        "target": target,
        "met": met,
        **details,
    }


def training_and_overhead(bench: Bench) -> list[dict[str, Any]]:
    """Figures 1 and 3, from the same tiny jobs, alternating with their references."""
    spec = tiny_job(bench)
    data = prepared(bench, spec)
    job_rates, plain_rates, driver_rates = [], [], []
    job_walls, bare_walls, job_firsts, bare_firsts = [], [], [], []
    for round_ in range(ROUNDS):
        logger.info("training and overhead, round %d of %d", round_ + 1, ROUNDS)
        job = submit_and_wait(bench, spec)
        samples, seconds = train_seconds(bench, job)
        job_rates.append(samples / seconds)
        assert job.finished_at is not None
        job_walls.append((job.finished_at - job.created_at).total_seconds())
        job_firsts.append(first_step_seconds(bench, job))

        bare = bare_trainer(bench, spec, data)
        plain_rates.append(bare["samples_per_second"])
        bare_walls.append(bare["end_to_end_s"])
        bare_firsts.append(bare["first_step_s"])

        here = plain_training(
            spec["base_model"], data.train.texts, data.label_ids(data.train), spec
        )
        driver_rates.append(here["samples"] / here["seconds"])

    training = figure(
        "training samples/s, tiny BERT (job ÷ plain PyTorch loop in a Ray worker)",
        max(job_rates),
        max(plain_rates),
        "samples/s",
        "≥ 0.95",
        max(job_rates) / max(plain_rates) >= 0.95,
        rounds={"job": job_rates, "plain": plain_rates},
        plain_outside_ray=driver_rates,
    )
    overhead = figure(
        "tiny job end to end (submit → SUCCEEDED ÷ bare TorchTrainer)",
        min(job_walls),
        min(bare_walls),
        "s",
        "≤ 1.1",
        min(job_walls) / min(bare_walls) <= 1.1,
        rounds={"job": job_walls, "bare": bare_walls},
        first_step={"job_s": min(job_firsts), "bare_s": min(bare_firsts)},
    )
    return [training, overhead]


def frozen_encoder(bench: Bench) -> tuple[dict[str, Any], str]:
    """Figure 2; returns the served model's name for figure 4 too."""
    minilm = "builtin:minilm"
    # Promotion without scoring, so that the cached job pays for no champion the other lacks.
    always = {"promote": "always"}
    cached = job_spec(
        bench,
        "bench-minilm",
        minilm,
        strategy={"kind": "feature_extraction"},
        hyperparameters=MINILM_HP,
        serving=always,
    )
    every_step = job_spec(
        bench,
        "bench-minilm-every-step",
        minilm,
        strategy={"kind": "partial", "frozen_layers": 6},
        hyperparameters=MINILM_HP,
        serving=always,
    )
    logger.info("frozen encoder: first job (computes and caches the encoder outputs)")
    cold = submit_and_wait(bench, cached)
    logger.info("frozen encoder: second job (reads the cache, as a trial or a retraining would)")
    warm = submit_and_wait(bench, {**cached, "hyperparameters": {**MINILM_HP, "head_lr": 1e-3}})
    logger.info("frozen encoder: the encoder in every step")
    slow = submit_and_wait(bench, every_step)
    walls = {
        name: run_seconds(job)
        for name, job in (("cold", cold), ("warm", warm), ("every_step", slow))
    }
    phases = {
        name: train_seconds(bench, job)[1]
        for name, job in (("cold", cold), ("warm", warm), ("every_step", slow))
    }
    speedup = walls["every_step"] / walls["warm"]
    result = figure(
        "frozen encoder, 5 epochs MiniLM (cached job wall ÷ encoder every step)",
        walls["warm"],
        walls["every_step"],
        "s",
        "≥ 10x faster",
        speedup >= 10,
        speedup=speedup,
        speedup_first_job=walls["every_step"] / walls["cold"],
        job_seconds=walls,
        training_phase_seconds=phases,
        warm_job_log=[
            line.message
            for line in bench.store.read_log(warm.id)
            if line.message.startswith("encoder outputs")
        ],
    )
    return result, cached["model_name"]


def run_seconds(job: Job) -> float:
    assert job.started_at is not None and job.finished_at is not None
    return (job.finished_at - job.started_at).total_seconds()


def serving(bench: Bench, model_name: str) -> list[dict[str, Any]]:
    """Figure 4: the real Serve app over HTTP against a plain forward pass of the same model."""
    registry = Registry(bench.settings, bench.store)
    version = registry.production(model_name)
    assert version is not None
    texts = bench.texts
    folder = str(registry.folder(version))
    threads = bench.settings.predictor_threads
    asyncio.run(
        http_predictions(bench.url, bench.headers, model_name, texts[: CLIENTS * 2], CLIENTS)
    )  # loaded
    through_http = []
    plain = []
    for _ in range(ROUNDS):
        through_http.append(
            asyncio.run(
                http_predictions(
                    bench.url, bench.headers, model_name, texts[:SERVE_REQUESTS], CLIENTS
                )
            )
        )
        plain.append(in_ray(plain_predictions, folder, threads, texts[:SERVE_REQUESTS], CLIENTS))
    served = max(r["per_second"] for r in through_http)
    reference = max(r["per_second"] for r in plain)
    throughput = figure(
        f"serving predictions/s, MiniLM, {CLIENTS} clients (HTTP ÷ plain batched forward)",
        served,
        reference,
        "predictions/s",
        "≥ 0.8",
        served / reference >= 0.8,
        rounds={"http": through_http, "plain": plain},
    )

    single_http = asyncio.run(
        http_predictions(bench.url, bench.headers, model_name, texts[:SINGLE_REQUESTS], 1)
    )
    single_plain = in_ray(plain_predictions, folder, threads, texts[:SINGLE_REQUESTS], 1)
    latency = {
        "figure": "serving latency at 1 client, minus a plain one-text forward pass",
        "p50_ms": 1000 * (single_http["p50_s"] - single_plain["p50_s"]),
        "p99_ms": 1000 * (single_http["p99_s"] - single_plain["p99_s"]),
        "http": single_http,
        "plain": single_plain,
    }
    return [throughput, latency]


async def http_predictions(
    url: str, headers: dict[str, str], model: str, texts: list[str], clients: int
) -> dict[str, float]:
    """``clients`` callers, each sending one text a request until the texts run out."""
    queue = list(reversed(texts))
    latencies: list[float] = []

    async def caller(http: httpx.AsyncClient) -> None:
        while queue:
            text = queue.pop()
            started = time.perf_counter()
            response = await http.post(f"/v1/models/{model}/predict", json={"inputs": [text]})
            response.raise_for_status()
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(caller(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return summary(len(texts), elapsed, latencies)


def plain_predictions(folder: str, threads: int, texts: list[str], batch: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    classifier = Classifier(Path(folder))
    classifier.probabilities(texts[:batch])  # the first pass pays for one-off set-up
    latencies = []
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        began = time.perf_counter()
        classifier.probabilities(texts[start : start + batch])
        latencies.append(time.perf_counter() - began)
    return summary(len(texts), time.perf_counter() - started, latencies)


def summary(count: int, elapsed: float, latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "count": count,
        "seconds": elapsed,
        "per_second": count / elapsed,
        "p50_s": statistics.median(ordered),
        "p99_s": ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)],
    }


def drift() -> dict[str, Any]:
    """Figure 5: one check against its own statistical core."""
    traffic = load_traffic()
    config = DriftConfig()
    reference, current = traffic.amazon_all, traffic.yelp
    check = median_seconds(lambda: check_drift(reference, current, config), DRIFT_REPEATS)
    core = median_seconds(
        lambda: mmd_permutation_test(
            reference.embeddings, current.embeddings, permutations=config.permutations
        ),
        DRIFT_REPEATS,
    )
    return figure(
        "drift check, 1000 vs 1000 embeddings (check ÷ its MMD test alone)",
        check,
        core,
        "s",
        "none",
        True,
    )


def api_reads(bench: Bench, job_id: str) -> dict[str, Any]:
    """Figure 6: GET /v1/jobs/{id} against Store.get_job, both with 8 readers at once."""
    asyncio.run(http_reads(bench.url, bench.headers, job_id, READERS * 4))
    http_runs, store_runs = [], []
    for _ in range(ROUNDS):
        http_runs.append(asyncio.run(http_reads(bench.url, bench.headers, job_id, READS)))
        store_runs.append(
            in_ray(store_reads, bench.settings.resolved_database_url(), job_id, READS)
        )
    http = max(http_runs, key=lambda r: r["per_second"])
    direct = max(store_runs, key=lambda r: r["per_second"])
    return figure(
        f"API job-status reads/s, {READERS} readers (HTTP ÷ the store read alone)",
        http["per_second"],
        direct["per_second"],
        "reads/s",
        "none",
        True,
        p99_ms={"http": 1000 * http["p99_s"], "store": 1000 * direct["p99_s"]},
        rounds={"http": http_runs, "store": store_runs},
    )


async def http_reads(
    url: str, headers: dict[str, str], job_id: str, count: int
) -> dict[str, float]:
    remaining = [count]
    latencies: list[float] = []

    async def reader(http: httpx.AsyncClient) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            started = time.perf_counter()
            (await http.get(f"/v1/jobs/{job_id}")).raise_for_status()
            latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        started = time.perf_counter()
        await asyncio.gather(*(reader(http) for _ in range(READERS)))
        elapsed = time.perf_counter() - started
    return summary(count, elapsed, latencies)


def store_reads(database_url: str, job_id: str, count: int) -> dict[str, float]:
    store = Store.open(database_url, upgrade=False)
    latencies: list[float] = []
    lock = threading.Lock()
    remaining = [count]

    def reader() -> None:
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            started = time.perf_counter()
            store.get_job(job_id)
            latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=reader) for _ in range(READERS)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summary(count, time.perf_counter() - started, latencies)


# -- report --------------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    lines = [
        "| figure | tuneloop | reference | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["figures"]:
        if "ratio" not in row:
            continue
        ratio = f"{row['speedup']:.1f}x faster" if "speedup" in row else f"{row['ratio']:.2f}"
        met = "—" if row["target"] == "none" else ("yes" if row["met"] else "no")
        lines.append(
            f"| {row['figure']} | {row['tuneloop']:.4g} {row['unit']} "
            f"| {row['reference']:.4g} {row['unit']} | {ratio} | {row['target']} | {met} |"
        )
    return "\n".join(lines)


def notes(results: dict[str, Any]) -> str:
    overhead = next(r for r in results["figures"] if "first_step" in r)
    latency = next(r for r in results["figures"] if "p50_ms" in r)
    api = next(r for r in results["figures"] if r["figure"].startswith("API"))
    frozen = next(r for r in results["figures"] if "speedup" in r)
    host = results["machine"]
    return "\n".join(
        [
            f"Submission to first training step: job {overhead['first_step']['job_s']:.1f} s, "
            f"bare TorchTrainer {overhead['first_step']['bare_s']:.1f} s.",
            f"Serving latency at one client over a plain one-text pass: p50 "
            f"+{latency['p50_ms']:.1f} ms, p99 +{latency['p99_ms']:.1f} ms "
            f"(HTTP p50 {1000 * latency['http']['p50_s']:.1f} ms).",
            f"API p99: {api['p99_ms']['http']:.1f} ms over HTTP, "
            f"{api['p99_ms']['store']:.1f} ms from the store.",
            f"Frozen encoder, job seconds: {frozen['job_seconds']}; the first job (which computes "
            f"the cache) is {frozen['speedup_first_job']:.1f}x faster than encoding every step.",
            f"Machine: {host['cpu_model']}, {host['cores']} cores, torch threads {THREADS}, "
            f"{host['platform']}, Python {host['python']}, torch {host['torch']}, "
            f"Ray {host['ray']}, transformers {host['transformers']}; {results['date']}; "
            f"load average {results['load_before']} before, {results['load_after']} after.",
            f"Total run time {results['seconds']:.0f} s.",
        ]
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    load_before = os.getloadavg()
    results: dict[str, Any] = {"figures": []}
    with (
        tempfile.TemporaryDirectory(prefix="bench-speed-") as home,
        running_stack(Path(home)) as bench,
    ):
        training, overhead = training_and_overhead(bench)
        frozen, model_name = frozen_encoder(bench)
        results["figures"] += [training, frozen, overhead]
        results["figures"] += serving(bench, model_name)
        results["figures"].append(drift())
        results["figures"].append(api_reads(bench, bench.store.list_jobs(limit=1)[0].id))
    results["machine"] = {
        **machine(),
        "torch_threads": THREADS,
        "ray": ray.__version__,
        "transformers": transformers.__version__,
    }
    results["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    results["load_before"] = [round(x, 1) for x in load_before]
    results["load_after"] = [round(x, 1) for x in os.getloadavg()]
    results["seconds"] = time.perf_counter() - started

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(results))
    print()
    print(notes(results))
    print(f"\nJSON: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
