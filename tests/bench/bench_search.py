"""Benchmark: a search with ASHA against the same search with every trial run to its end.

Both runs are tuneloop search jobs on a local Ray cluster, submitted and run by the runner as
any job is: the 1000 Amazon phone reviews (a fifth held out for validation), the builtin MiniLM
in feature-extraction mode (its encoder outputs are computed once and cached, so an epoch
trains only the head), and a random search over head_lr, batch_size, weight_decay and
warmup_ratio. The same seed draws the same trials in both runs; only the scheduler differs.

Measured side by side, in one run: trial-epochs spent, the best validation accuracy found, and
wall time. Target: ASHA within 1 accuracy point of the full run's best with at most a third of
its trial-epochs.

Run from the repository root: ``python -m tests.bench.bench_search`` (or the file itself).
Prints a markdown table and writes bench-results/search.json.
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
import tempfile
import time
from typing import Any

import ray

from jobs.runner import NAMESPACE, Runner
from jobs.settings import Settings
from jobs.spec import JobSpec, parse_spec
from jobs.store import JobStatus, Store
from jobs.submission import submit_job
from server.demo import read_sentiment_file

logger = logging.getLogger("bench_search")

AMAZON = ROOT / "tests" / "data" / "sentiment" / "amazon_cells_labelled.txt"
RESULTS = ROOT / "bench-results" / "search.json"
TRIALS = 10
EPOCHS = 10
CONCURRENT = 2
SEED = 7
TARGET_GAP_POINTS = 1.0
TARGET_SHARE = 1 / 3
SPACE = {
    "hyperparameters.head_lr": {"loguniform": [1e-4, 1e-1]},
    "hyperparameters.batch_size": {"choice": [16, 32, 64]},
    "hyperparameters.weight_decay": {"uniform": [0.0, 0.1]},
    "hyperparameters.warmup_ratio": {"uniform": [0.0, 0.3]},
}


def spec(scheduler: str) -> JobSpec:
    return parse_spec(
        {
            "model_name": f"bench-{scheduler}",
            "data": {"path": "amazon.csv", "validation_split": 0.2},
            "strategy": {"kind": "feature_extraction"},
            "hyperparameters": {"epochs": EPOCHS, "max_length": 64, "seed": SEED},
            "search": {
                "space": SPACE,
                "trials": TRIALS,
                "max_concurrent": CONCURRENT,
                "scheduler": scheduler,
                "grace_epochs": 1,
                "reduction_factor": 3,
                "metric": "val_accuracy",
            },
        }
    )


def run_job(runner: Runner, store: Store, settings: Settings, scheduler: str) -> dict[str, Any]:
    """Submit one search job and let the runner run it to its end; return what it spent."""
    job = submit_job(store=store, settings=settings, spec=spec(scheduler))
    logger.info("running %s search %s", scheduler, job.id)
    started = time.perf_counter()
    while not JobStatus(store.get_job(job.id).status).finished:
        runner.tick()
        time.sleep(settings.runner_poll_seconds)
    wall = time.perf_counter() - started
    done = store.get_job(job.id)
    if done.status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"{scheduler} search {job.id} ended {done.status}: {done.error}")

    trials = store.list_trials(job.id)
    return {
        "job_id": job.id,
        "wall_seconds": round(wall, 1),
        "trial_epochs": sum(len(trial.curve) for trial in trials),
        "best_val_accuracy": max(trial.best_metric or 0.0 for trial in trials),
        "best_trial": done.result["search"]["best_trial"] if done.result else None,
        "stopped_early": sum(trial.state == "STOPPED" for trial in trials),
        "trials": [
            {
                "config": trial.config,
                "state": trial.state,
                "epochs": len(trial.curve),
                "best_val_accuracy": trial.best_metric,
                "best_epoch": trial.best_epoch,
                "curve": [row["val_accuracy"] for row in trial.curve],
            }
            for trial in trials
        ],
    }


def verdict(asha: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    gap = (full["best_val_accuracy"] - asha["best_val_accuracy"]) * 100
    share = asha["trial_epochs"] / full["trial_epochs"]
    same = sorted(json.dumps(t["config"], sort_keys=True) for t in asha["trials"]) == sorted(
        json.dumps(t["config"], sort_keys=True) for t in full["trials"]
    )
    return {
        "gap_points": round(gap, 2),
        "trial_epoch_share": round(share, 3),
        "same_trials_drawn": same,
        "gap_met": gap <= TARGET_GAP_POINTS,
        "share_met": share <= TARGET_SHARE,
    }


def missed_winner(asha: dict[str, Any], full: dict[str, Any]) -> str | None:
    """Why ASHA missed the full run's best, when it did: where it stopped that trial."""
    winner = max(full["trials"], key=lambda t: t["best_val_accuracy"] or 0.0)
    for trial in asha["trials"]:
        if trial["config"] == winner["config"] and trial["state"] == "STOPPED":
            return (
                f"the full run's best trial ({winner['best_val_accuracy']:.3f} at epoch "
                f"{winner['best_epoch']}) was stopped by ASHA after {trial['epochs']} epoch(s) "
                f"at {trial['curve'][-1]:.3f}"
            )
    return None


def table(results: dict[str, Any]) -> str:
    asha, full, judged = results["asha"], results["none"], results["verdict"]
    lines = [
        "| scheduler | trials | trial-epochs | share of full | stopped early "
        "| best val_accuracy | gap to full (points) | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in (("asha", asha), ("none (every trial to the end)", full)):
        share = run["trial_epochs"] / full["trial_epochs"]
        gap = (full["best_val_accuracy"] - run["best_val_accuracy"]) * 100
        lines.append(
            f"| {name} | {len(run['trials'])} | {run['trial_epochs']} | {share:.2f} | "
            f"{run['stopped_early']} | {run['best_val_accuracy']:.4f} | {gap:.1f} | "
            f"{run['wall_seconds']:.0f} |"
        )
    met = judged["gap_met"] and judged["share_met"]
    lines.append("")
    lines.append(
        f"Target (gap <= {TARGET_GAP_POINTS:g} point, share <= 1/3): "
        f"{'met' if met else 'missed'}; same trials drawn in both runs: "
        f"{judged['same_trials_drawn']}."
    )
    if results.get("missed_winner"):
        lines.append(f"Gap: {results['missed_winner']}.")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch

    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    home = Path(tempfile.mkdtemp(prefix="bench-search-"))
    settings = Settings(home=home, max_concurrent_trials=CONCURRENT)
    settings.ensure_dirs()
    read_sentiment_file(AMAZON).to_csv(settings.resolved_data_root() / "amazon.csv", index=False)
    store = Store.open(settings.resolved_database_url())
    ray.init(
        address="local",
        num_cpus=4,
        namespace=NAMESPACE,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        runner = Runner(settings)
        asha = run_job(runner, store, settings, "asha")
        full = run_job(runner, store, settings, "none")
        runner.reap()
        runner.close()
    finally:
        ray.shutdown()

    results: dict[str, Any] = {
        "setup": {
            "data": "amazon_cells_labelled.txt, 1000 rows, validation_split 0.2",
            "base_model": "builtin:minilm, feature_extraction",
            "space": SPACE,
            "trials": TRIALS,
            "max_epochs": EPOCHS,
            "max_concurrent": CONCURRENT,
            "asha": {"grace_epochs": 1, "reduction_factor": 3, "time_attr": "epoch"},
            "seed": SEED,
        },
        "machine": machine(),
        "asha": asha,
        "none": full,
        "verdict": verdict(asha, full),
    }
    if results["verdict"]["gap_points"] > 0:
        results["missed_winner"] = missed_winner(asha, full)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nJSON: {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
