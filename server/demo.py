"""The demo: the whole loop on real review sentences, through the REST API of a local stack."""

from __future__ import annotations

import csv
import random
import tempfile
from pathlib import Path

import pandas as pd
from rich.console import Console

from jobs.settings import Settings
from server import local
from server.cli import watch_job
from server.client import Client

HELD_OUT = 200
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


def run_demo(settings: Settings, data_dir: Path, console: Console, *, keep_running: bool) -> None:
    amazon = read_sentiment_file(data_dir / "amazon_cells_labelled.txt")
    train, held_out = split_held_out(amazon, HELD_OUT, SEED)

    with console.status("starting the local stack (Ray, the API, the runner, the predictor)"):
        url = local.up(settings)
    console.print(f"tuneloop is up at {url}")
    c = Client(url)
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
    finally:
        c.close()
        if not keep_running:
            local.down(settings)
