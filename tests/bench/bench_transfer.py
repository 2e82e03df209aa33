"""Benchmark: transfer learning on images, pre-trained with tuneloop on data this machine has.

scikit-learn ships the UCI handwritten digits (1797 images, 8x8, 16 grey levels), here scaled
to 16x16. Every model below is trained by tuneloop jobs through the REST API of a fresh local
stack, with the same ViT configuration (4 layers, 64 wide, 4x4 patches):

1. a pretraining job builds the ViT from its configuration and trains it on digits 0-4;
2. for each seed, 10 labelled images of each of the digits 5-9 (50 in all, drawn by the seed)
   train three models for the same epochs:
   - ``fine-tuned``: the pre-trained version as base (``model:digits-base``), every layer trained,
     the encoder at a lower learning rate than the new head;
   - ``head only``: the pre-trained encoder frozen (``feature_extraction``);
   - ``from scratch``: a pretraining job on the 50 images, the same configuration, no weights.

Each job picks its best epoch on 200 other images of 5-9 (its validation set); the figure is
the accuracy of the registered version on the remaining images of 5-9, which no job saw.

Run from the repository root: ``python -m tests.bench.bench_transfer`` (or the file itself).
Prints a markdown table and writes bench-results/transfer_images.json.
"""

# ruff: noqa: E402  (the repository root must be on sys.path before tuneloop imports)

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse
import json
import logging
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

from PIL import Image

from jobs.inference import Classifier
from tests.bench.bench_drift import machine
from tests.bench.bench_speed import Bench, running_stack, submit_and_wait
from tests.factories import build_tiny_vit, digit_images, write_image_folder

logger = logging.getLogger("bench_transfer")

RESULTS = ROOT / "bench-results" / "transfer_images.json"
SOURCE_DIGITS = [0, 1, 2, 3, 4]
TARGET_DIGITS = [5, 6, 7, 8, 9]
SHOTS = 10
VALIDATION_IMAGES = 200
PRETRAIN_HP = {"epochs": 30, "batch_size": 32, "encoder_lr": 1e-3, "head_lr": 1e-3, "seed": 0}
TARGET_HP = {"epochs": 40, "batch_size": 10, "encoder_lr": 3e-4, "head_lr": 3e-3}
SCRATCH_HP = {"epochs": 40, "batch_size": 10, "encoder_lr": 3e-3, "head_lr": 3e-3}
NO_MONITORING = {"enabled": False}


def image_spec(name: str, base: str, data: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "model_name": name,
        "task": "image_classification",
        "base_model": base,
        "data": data,
        "monitoring": NO_MONITORING,
        "serving": {"promote": "always"},
        **fields,
    }


def held_out_accuracy(
    bench: Bench, name: str, version: int, test: list[tuple[Image.Image, int]]
) -> float:
    row = bench.store.get_version(name, version)
    classifier = Classifier(bench.settings.models_dir() / row.path)
    return classifier.accuracy(
        [image.convert("RGB") for image, _ in test], [str(label) for _, label in test]
    )


def run(seeds: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    # The configuration every model here starts from, and its image processor; no weights.
    config = build_tiny_vit(home / "vit-config", weights=False, hidden_size=64, layers=4, heads=4)
    started = time.perf_counter()
    with running_stack(home / "stack") as bench:
        root = bench.settings.resolved_data_root()
        source = digit_images(SOURCE_DIGITS)
        write_image_folder(source, root / "source")
        logger.info("pre-training on %d images of digits 0-4", len(source))
        pretrain_started = time.perf_counter()
        base_job = submit_and_wait(
            bench,
            image_spec(
                "digits-base",
                str(config),
                {"path": "source", "validation_split": 0.1},
                kind="pretraining",
                strategy={"kind": "full"},
                hyperparameters=PRETRAIN_HP,
            ),
        )
        pretrain_seconds = time.perf_counter() - pretrain_started
        base_version = base_job.model_version
        base_accuracy = base_job.result["metrics"]["val_accuracy"]

        target = digit_images(TARGET_DIGITS)
        rounds = []
        for seed in range(seeds):
            order = list(range(len(target)))
            random.Random(seed).shuffle(order)
            shots: list[int] = []
            for digit in TARGET_DIGITS:
                shots += [i for i in order if target[i][1] == digit][:SHOTS]
            rest = [i for i in order if i not in set(shots)]
            validation, test = (
                rest[:VALIDATION_IMAGES],
                [target[i] for i in rest[VALIDATION_IMAGES:]],
            )
            write_image_folder([target[i] for i in shots], root / f"shots-{seed}")
            write_image_folder([target[i] for i in validation], root / f"validation-{seed}")
            data = {"path": f"shots-{seed}", "validation_path": f"validation-{seed}"}
            arms = {
                "fine-tuned": image_spec(
                    f"digits-fine-{seed}",
                    f"model:digits-base@{base_version}",
                    data,
                    strategy={"kind": "full"},
                    hyperparameters={**TARGET_HP, "seed": seed},
                ),
                "head only": image_spec(
                    f"digits-head-{seed}",
                    f"model:digits-base@{base_version}",
                    data,
                    strategy={"kind": "feature_extraction"},
                    hyperparameters={**TARGET_HP, "seed": seed},
                ),
                "from scratch": image_spec(
                    f"digits-scratch-{seed}",
                    str(config),
                    data,
                    kind="pretraining",
                    strategy={"kind": "full"},
                    hyperparameters={**SCRATCH_HP, "seed": seed},
                ),
            }
            results = {}
            for arm, spec in arms.items():
                job_started = time.perf_counter()
                job = submit_and_wait(bench, spec)
                results[arm] = {
                    "job": job.id,
                    "test_accuracy": held_out_accuracy(
                        bench, spec["model_name"], job.model_version, test
                    ),
                    "validation_accuracy": job.result["metrics"]["val_accuracy"],
                    "seconds": time.perf_counter() - job_started,
                }
                logger.info("seed %d %s: %s", seed, arm, results[arm])
            rounds.append({"seed": seed, "test_images": len(test), "arms": results})
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "source_images": len(source),
        "pretrain": {
            "validation_accuracy": base_accuracy,
            "seconds": pretrain_seconds,
            "hyperparameters": PRETRAIN_HP,
        },
        "shots_per_class": SHOTS,
        "hyperparameters": {
            "fine-tuned": TARGET_HP,
            "head only": TARGET_HP,
            "from scratch": SCRATCH_HP,
        },
        "rounds": rounds,
        "wall_seconds": time.perf_counter() - started,
    }


def table(results: dict[str, Any]) -> str:
    arms = list(results["rounds"][0]["arms"])
    lines = [
        "| model for digits 5-9 (50 labelled images) | held-out accuracy, mean [min-max] "
        f"of {len(results['rounds'])} draws | seconds per job |",
        "| --- | --- | --- |",
    ]
    for arm in arms:
        scores = [r["arms"][arm]["test_accuracy"] for r in results["rounds"]]
        seconds = [r["arms"][arm]["seconds"] for r in results["rounds"]]
        lines.append(
            f"| {arm} | {statistics.mean(scores):.3f} [{min(scores):.3f}-{max(scores):.3f}] "
            f"| {statistics.mean(seconds):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="draws of the 50 labelled images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = run(args.seeds)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(
        f"pre-trained on {results['source_images']} images of digits 0-4 in "
        f"{results['pretrain']['seconds']:.0f} s (validation accuracy "
        f"{results['pretrain']['validation_accuracy']:.3f})"
    )
    print(table(results))
    print(f"wrote {RESULTS.relative_to(ROOT)}; {results['wall_seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
