"""The demo: the whole loop on real review sentences, through the REST API of a local stack.

Fine-tune on Amazon product reviews, serve, then send Yelp restaurant reviews as traffic with
their labels as feedback: the monitor sees the drift, retrains by itself, and the challenger
replaces the champion only if it is better on recent labelled rows.
"""

from __future__ import annotations

import csv
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from rich.console import Console

from jobs.settings import Settings
from server import local
from server.cli import watch_job
from server.client import Client

T = TypeVar("T")

HELD_OUT = 200
YELP_HELD_OUT = 300
PREDICT_CHUNK = 50
SEED = 7


def read_sentiment_file(path: Path) -> pd.DataFrame:
    """A sentiment file: one sentence, a tab, a 0/1 label; quotes in sentences are literal."""
    return pd.read_csv(
        path,
        sep="\t",
        header=None,
        names=["text", "label"],
        quoting=csv.QUOTE_NONE,
        dtype={"text": str, "label": int},
        encoding="utf-8",
    )


def split_held_out(frame: pd.DataFrame, count: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    order = list(range(len(frame)))
    random.Random(seed).shuffle(order)
    return frame.iloc[order[count:]], frame.iloc[order[:count]]


def demo_spec(dataset_id: str) -> dict[str, object]:
    return {
        "model_name": "reviews",
        "base_model": "builtin:minilm",
        "data": {"dataset": dataset_id, "validation_split": 0.2},
        "strategy": {"kind": "feature_extraction"},
        "hyperparameters": {
            "epochs": 15,
            "batch_size": 32,
            "head_lr": 3e-3,
            "seed": SEED,
            "early_stopping": {"metric": "val_loss", "patience": 3},
        },
        "monitoring": {
            "schedule_seconds": 10,
            "window_size": 300,
            "retrain": {"min_window": 100, "cooldown_seconds": 600},
        },
    }


def accuracy(c: Client, model: str, frame: pd.DataFrame) -> tuple[float, int]:
    """Accuracy of the production version on ``frame``, and the version that answered."""
    correct, version = 0, 0
    texts, labels = frame["text"].tolist(), frame["label"].astype(str).tolist()
    for start in range(0, len(texts), PREDICT_CHUNK):
        answer = c.predict(model, texts[start : start + PREDICT_CHUNK])
        version = answer["version"]
        predicted = [p["label"] for p in answer["predictions"]]
        correct += sum(
            p == y for p, y in zip(predicted, labels[start : start + PREDICT_CHUNK], strict=True)
        )
    return correct / len(texts), version


def send_traffic(c: Client, model: str, frame: pd.DataFrame) -> None:
    """Ask for predictions on ``frame`` and send its labels back as feedback."""
    texts, labels = frame["text"].tolist(), frame["label"].astype(str).tolist()
    for start in range(0, len(texts), PREDICT_CHUNK):
        answer = c.predict(model, texts[start : start + PREDICT_CHUNK])
        feedback = [
            {"prediction_id": p["id"], "label": label}
            for p, label in zip(
                answer["predictions"], labels[start : start + PREDICT_CHUNK], strict=True
            )
        ]
        c.feedback(model, labels=feedback)


def wait_for(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found is not None:
            return found
        time.sleep(2)
    raise TimeoutError(f"no {what} after {timeout:.0f}s")


def drift_loop(c: Client, data_dir: Path, console: Console) -> None:
    """Yelp traffic meets the Amazon model: the monitor notices, retrains and promotes."""
    yelp = read_sentiment_file(data_dir / "yelp_labelled.txt")
    traffic, yelp_held = split_held_out(yelp, YELP_HELD_OUT, SEED)
    before, version = accuracy(c, "reviews", yelp_held)
    console.print(
        f"\n[bold]Now the traffic changes[/bold]: restaurant reviews. Accuracy of "
        f"v{version} on {len(yelp_held)} held-out Yelp sentences: {before:.3f}"
    )
    send_traffic(c, "reviews", traffic)
    console.print(f"sent {len(traffic)} Yelp sentences as predictions, their labels as feedback")

    def drifted() -> dict[str, Any] | None:
        reports = c.drift_reports("reviews")
        return next((r for r in reports if r["drift_detected"]), None)

    with console.status("waiting for the monitor's next drift check"):
        report = wait_for(drifted, 300, "drift verdict")
    fired = [name for name, check in report["checks"].items() if check["detected"]]
    console.print(
        f"drift report {report['id']}: drift detected on v{report['version']} "
        f"({', '.join(fired)}); {report['decision']}"
    )
    if not report["retrain_job_id"]:
        raise SystemExit("the monitor did not start a retraining job")
    console.print(f"retraining job {report['retrain_job_id']} started by the monitor")
    job = watch_job(c, report["retrain_job_id"])
    if job["status"] != "SUCCEEDED":
        raise SystemExit(1)
    promotion = job["result"]["promotion"]
    console.print(f"champion/challenger: {promotion['reason']}")
    after, version = accuracy(c, "reviews", yelp_held)
    console.print(
        f"[bold]accuracy on {len(yelp_held)} held-out Yelp sentences: before "
        f"{before:.3f}, after {after:.3f}[/bold] (now served by reviews v{version})"
    )


def run_demo(settings: Settings, data_dir: Path, console: Console, *, keep_running: bool) -> None:
    amazon = read_sentiment_file(data_dir / "amazon_cells_labelled.txt")
    train, held_out = split_held_out(amazon, HELD_OUT, SEED)

    with console.status("starting the local stack (Ray, the API, the runner, the predictor)"):
        url = local.up(settings)
    console.print(f"tuneloop is up at {url}")
    c = Client(url, token=settings.admin_token_file().read_text().strip())
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "amazon-reviews.csv"
            train.to_csv(path, index=False)
            dataset = c.upload(path, name="Amazon product reviews")
        console.print(
            f"uploaded {dataset['rows']} Amazon review sentences as {dataset['id']}; "
            f"{len(held_out)} more are held out for the end"
        )

        job = c.submit(demo_spec(dataset["id"]))
        console.print(f"submitted job {job['id']}: fine-tune builtin MiniLM, encoder frozen")
        job = watch_job(c, job["id"])
        if job["status"] != "SUCCEEDED":
            raise SystemExit(1)

        sample = held_out["text"].head(3).tolist()
        answer = c.predict("reviews", sample)
        for text, prediction in zip(sample, answer["predictions"], strict=True):
            console.print(
                f"  v{answer['version']} says {prediction['label']}: {text}",
                markup=False,
                highlight=False,
            )
        score, version = accuracy(c, "reviews", held_out)
        console.print(
            f"[bold]validation accuracy on {len(held_out)} held-out Amazon sentences: "
            f"{score:.3f}[/bold] (reviews v{version})"
        )
        drift_loop(c, data_dir, console)
    finally:
        c.close()
        if not keep_running:
            local.down(settings)
