"""Benchmark: LoRA against full fine-tuning of the builtin MiniLM on the Amazon sentences.

Both runs train with the job's own code: the spec is accepted by ``submit_job``, the data split
by ``DataCatalog``, and ``jobs.train.Worker`` trains in Ray Train's local mode (the worker loop
in this process, no cluster), then ``Registry.register`` writes the version as a job would. All
1000 Amazon sentences, a fifth held out for validation, cut at 32 tokens; the same epochs, batch
size, head learning rate and seed for both. Measured:

- validation accuracy, best epoch;
- trainable parameters and bytes on disk of a version (the adapters alone, for LoRA);
- peak resident memory of training (getrusage high-water mark; each run in a process of its
  own, so one run's peak never hides another's) and its rise above the memory before training;
- wall time and CPU time of training (model loading included); on a machine shared with other
  work, CPU time is the steadier figure;
- serving: in a fresh process, the memory two versions of the strategy take when loaded by
  ``jobs.inference.Classifier``, and the median time to score the validation sentences.

Run from the repository root: ``python -m tests.bench.bench_lora`` (or the file itself).
Prints a markdown table and writes bench-results/lora.json.
"""

# ruff: noqa: E402  (the repository root must be on sys.path before tuneloop imports)

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict
from typing import Any

logger = logging.getLogger("bench_lora")

AMAZON = ROOT / "tests" / "data" / "sentiment" / "amazon_cells_labelled.txt"
RESULTS = ROOT / "bench-results" / "lora.json"
EPOCHS = 3
# 962 of the 1000 sentences fit in 32 MiniLM tokens; 64 would double the compute for the rest.
SHARED = {"epochs": EPOCHS, "batch_size": 16, "max_length": 32, "head_lr": 2e-3, "seed": 0}
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {
        "strategy": {"kind": "full"},
        "hyperparameters": {**SHARED, "encoder_lr": 5e-5},
    },
    "lora": {
        "strategy": {"kind": "lora", "rank": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "hyperparameters": {**SHARED, "encoder_lr": 1e-3},
    },
}
WEIGHTS_KEY = "bench_weights"
PREDICT_REPEATS = 5


def resident_bytes() -> int:
    """Memory resident now, from /proc (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def cpu_seconds() -> float:
    """CPU time of this process, all threads: unlike wall time, barely moved by other load."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_and_keep_weights(config: dict[str, Any]) -> None:
    """The job's worker loop, then its last weights written where the benchmark finds them."""
    from jobs.model import save_state
    from jobs.train import TrainingInput, Worker

    weights = Path(config.pop(WEIGHTS_KEY))
    worker = Worker(TrainingInput(**config))
    worker.run()
    save_state(worker.unwrapped, weights)


def train(name: str, home: Path) -> dict[str, Any]:
    """One strategy's training run and two registered versions of it, in this process."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.data import DataCatalog
    from jobs.model import resolve_base_model
    from jobs.registry import Registry
    from jobs.settings import Settings
    from jobs.spec import parse_spec
    from jobs.store import JobStatus, Store
    from jobs.submission import submit_job
    from jobs.train import TrainingInput
    from server.demo import read_sentiment_file

    settings = Settings(home=home)
    settings.ensure_dirs()
    read_sentiment_file(AMAZON).to_csv(settings.resolved_data_root() / "amazon.csv", index=False)
    store = Store.open(settings.resolved_database_url())
    spec = parse_spec(
        {
            "model_name": f"bench-{name}",
            "base_model": "builtin:minilm",
            "data": {"path": "amazon.csv", "validation_split": 0.2},
            "resources": {"cpus_per_worker": os.cpu_count() or 1},
            **VARIANTS[name],
        }
    )
    job = submit_job(store=store, settings=settings, spec=spec)
    store.transition(job.id, JobStatus.RUNNING)
    data = DataCatalog(settings, store).load(spec.data, seed=spec.hyperparameters.seed)
    base_dir = resolve_base_model(spec.base_model)
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
    )
    weights = home / "weights.safetensors"
    before = resident_bytes()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    TorchTrainer(
        train_and_keep_weights,
        train_loop_config={**asdict(training), WEIGHTS_KEY: str(weights)},
        scaling_config=ScalingConfig(num_workers=0),  # local mode: this process, no cluster
        run_config=RunConfig(name=job.id, storage_path=str(settings.checkpoints_dir())),
    ).fit()
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    peak = peak_resident_bytes()

    accuracies = [e.metrics["val_accuracy"] for e in store.epoch_metrics(job.id)]
    registry = Registry(settings, store)
    versions = [
        registry.register(
            job_id=f"{job.id}-{copy}",
            spec=spec,
            base_dir=base_dir,
            weights=weights,
            label_names=data.label_names,
            metrics={"val_accuracy": max(accuracies)},
            dataset_hash=data.sha256,
        )
        for copy in ("a", "b")
    ]
    return {
        "val_accuracy_per_epoch": accuracies,
        "val_accuracy_best": max(accuracies),
        "train_rows": len(data.train),
        "val_rows": len(data.validation),
        "footprint": registry.footprint(versions[0]),
        "train_wall_s": wall,
        "train_cpu_s": cpu,
        "train_peak_rss_bytes": peak,
        "rss_before_training_bytes": before,
        "version_folders": [str(registry.folder(v)) for v in versions],
        "val_texts": data.validation.texts,
    }


def serve(folders: list[str], texts: list[str]) -> dict[str, Any]:
    """Load two versions with the predictor's loader; the memory each adds, and scoring time."""
    from jobs.inference import Classifier

    start = resident_bytes()
    first = Classifier(Path(folders[0]))
    after_first = resident_bytes()
    second = Classifier(Path(folders[1]))
    after_second = resident_bytes()
    timings = []
    for _ in range(PREDICT_REPEATS):
        for classifier in (first, second):
            began = time.perf_counter()
            classifier.probabilities(texts)
            timings.append(time.perf_counter() - began)
    storages = {
        p.data_ptr(): p.numel() * p.element_size()
        for c in (first, second)
        for p in c.model.parameters()
    }
    return {
        "first_version_rss_bytes": after_first - start,
        "second_version_rss_bytes": after_second - after_first,
        "parameter_bytes_both_versions": sum(storages.values()),
        "predict_val_median_s": statistics.median(timings),
    }


def in_child(*args: str) -> dict[str, Any]:
    """Run one step in a fresh interpreter, so its memory figures are its own."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench_lora", *args],
        cwd=ROOT,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def machine() -> dict[str, Any]:
    import peft
    import torch

    model = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
    }


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| strategy | validation accuracy (best of "
        f"{EPOCHS} epochs) | trainable parameters | version on disk | training peak RSS "
        "(rise) | training wall (CPU) time | second version loaded for serving | scoring "
        f"{results['runs']['full']['val_rows']} sentences |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in results["runs"].items():
        footprint = run["footprint"]
        stored = mib(footprint["stored_bytes"])
        if "adapter_bytes" in footprint:
            stored += f" (adapters {mib(footprint['adapter_bytes'])})"
        serving = run["serving"]
        rise = run["train_peak_rss_bytes"] - run["rss_before_training_bytes"]
        lines.append(
            f"| {name} | {run['val_accuracy_best']:.3f} "
            f"| {footprint['trainable_parameters']:,} of {footprint['total_parameters']:,} "
            f"| {stored} | {mib(run['train_peak_rss_bytes'])} ({mib(rise)}) "
            f"| {run['train_wall_s']:.0f} s ({run['train_cpu_s']:.0f} s) "
            f"| +{mib(serving['second_version_rss_bytes'])} "
            f"| {serving['predict_val_median_s']:.2f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    runs: dict[str, Any] = {}
    try:
        for name in VARIANTS:
            logger.info("training %s", name)
            run = in_child("train", name, str(work / name))
            texts = run.pop("val_texts")
            logger.info("serving two %s versions", name)
            run["serving"] = in_child(
                "serve", json.dumps(run["version_folders"]), json.dumps(texts)
            )
            runs[name] = run
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {
        "runs": runs,
        "machine": machine(),
        "total_wall_s": time.perf_counter() - started,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\n{results['total_wall_s']:.0f} s in all; JSON: {RESULTS.relative_to(ROOT)}")


def child(step: str, *args: str) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if step == "train":
        outcome = train(args[0], Path(args[1]))
    else:
        outcome = serve(json.loads(args[0]), json.loads(args[1]))
    print(json.dumps(outcome))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(*sys.argv[1:])
    else:
        main()
