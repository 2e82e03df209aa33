"""The training loop each Ray Train worker runs, and the metrics it reports.

One loop serves every strategy and both tasks. Feature extraction computes the frozen encoder's
outputs once, caches them on disk input by input (jobs/features.py), and trains the head on
them; the other strategies run the encoder in every step with the frozen part excluded from
the optimizer. Texts become token ids and attention masks, images pixel values; a worker
decodes its images once and, with augmentation, prepares them anew in every epoch.
Rank 0 writes each epoch's metrics and a log line to the store, and a checkpoint that a
restarted worker group resumes from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerBase

from jobs.errors import MemoryLimitExceeded
from jobs.features import FeatureCache
from jobs.images import ImageAugmenter, image_digest, load_image
from jobs.model import (
    ClassifierModel,
    Processor,
    apply_strategy,
    build_classifier,
    load_processor,
    load_state,
    parameter_groups,
    save_state,
)
from jobs.spec import (
    EarlyStopping,
    ImageAugmentation,
    JobKind,
    JobSpec,
    StrategyKind,
    Task,
    WordDropout,
)
from jobs.store import Store, make_engine

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
EVAL_FILE = "eval.json"
ENCODE_BATCH = 64
# Workers look for a cancel request this often, and always between epochs. Stopping at a step
# that every rank agrees on lets the trainer shut down cleanly and release its resources.
CANCEL_CHECK_STEPS = 20
# Rank 0 stamps the job's heartbeat at most this often during an epoch, and at every epoch's
# end: the runner's evidence that training progresses (see Limits.no_progress_seconds).
HEARTBEAT_SECONDS = 5.0


@dataclass(frozen=True)
class TrainingInput:
    """Everything a worker needs, passed through Ray Train's config as plain data."""

    job_id: str
    spec: dict[str, Any]
    base_dir: str
    database_url: str
    label_names: list[str]
    train_inputs: list[str]  # texts, or absolute image paths
    train_labels: list[int]
    val_inputs: list[str]
    val_labels: list[int]
    feature_cache: str | None = None
    placement_record: str | None = None

    @property
    def job_spec(self) -> JobSpec:
        return JobSpec.model_validate(self.spec)


@dataclass
class Progress:
    epoch: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    def improved(self, score: float, stopping: EarlyStopping | None) -> bool:
        mode = stopping.mode if stopping else "max"
        delta = stopping.min_delta if stopping else 0.0
        if self.best_score is None:
            return True
        return score < self.best_score - delta if mode == "min" else score > self.best_score + delta


def selection_metric(spec: JobSpec) -> tuple[str, str]:
    stopping = spec.hyperparameters.early_stopping
    return (stopping.metric, stopping.mode) if stopping else ("val_f1", "max")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def word_dropout(text: str, augmentation: WordDropout, rng: random.Random) -> str:
    """Drop each word with the configured probability, keeping at least one word."""
    words = text.split()
    kept = [word for word in words if rng.random() >= augmentation.probability]
    return " ".join(kept or words[:1])


def tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return encoded["input_ids"], encoded["attention_mask"]


def trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the columns that are padding in every row of a batch.

    Texts are tokenized once, padded to ``max_length``; short texts would otherwise pay for
    attention over padding in every step. Padding sits at one end, so the rest is one slice.
    """
    used = mask.any(0).nonzero()
    if len(used) == 0:
        return ids, mask
    columns = slice(int(used[0]), int(used[-1]) + 1)
    return ids[:, columns], mask[:, columns]


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on a GPU, where it roughly doubles matmul throughput; nothing on a CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16)


@torch.inference_mode()
def in_length_order(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    device: torch.device,
) -> torch.Tensor:
    """``forward`` over batches of texts of similar length, so that little of a batch is
    padding; the rows come back in their original order, in float32 on the CPU."""
    order = mask.sum(1).argsort()
    chunks = []
    for start in range(0, len(order), ENCODE_BATCH):
        rows = order[start : start + ENCODE_BATCH]
        batch = trim_padding(ids[rows], mask[rows])
        with autocast(device):
            chunks.append(forward(*(t.to(device) for t in batch)).float().cpu())
    ordered = torch.cat(chunks)
    result = torch.empty_like(ordered)
    result[order] = ordered
    return result


@torch.inference_mode()
def in_batches(
    forward: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """``forward`` over batches of images, in float32 on the CPU."""
    chunks = []
    for start in range(0, len(pixels), ENCODE_BATCH):
        with autocast(device):
            chunks.append(forward(pixels[start : start + ENCODE_BATCH].to(device)).float().cpu())
    return torch.cat(chunks)


def run_forward(
    forward: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], device: torch.device
) -> torch.Tensor:
    """``forward`` over prepared inputs in batches: token ids and mask, or pixel values."""
    if len(inputs) == 1:
        return in_batches(forward, inputs[0], device)
    ids, mask = inputs
    return in_length_order(forward, ids, mask, device)


def encode_features(
    model: ClassifierModel, inputs: tuple[torch.Tensor, ...], device: torch.device
) -> torch.Tensor:
    """The frozen encoder's pooled outputs, ready for the cache."""
    model.eval()
    return run_forward(model.features, inputs, device)


def pixel_values(processor: Processor, images: list[Any]) -> torch.Tensor:
    """Images resized and normalised as the model was trained to see them."""
    return processor(images=images, return_tensors="pt")["pixel_values"]


def peak_resident_mib() -> float:
    """The most resident memory this process has held, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record_placement_group(record: Path) -> None:
    """Write the id of this worker group's placement group, for the runner to remove should it
    have to kill the job's process (see jobs.runner.remove_placement_groups)."""
    group = ray.util.get_current_placement_group()
    if group is None:
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(f".{record.name}.{os.getpid()}")
    partial.write_text(group.id.hex())
    os.replace(partial, record)


def linear_warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's rate rises linearly from 0 over ``warmup_steps``, then falls linearly to 0
    at ``total_steps``: the schedule of ``transformers.get_linear_schedule_with_warmup``,
    written here because importing that one imports transformers' Trainer utilities and, with
    them, peft, seconds before a worker's first step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def classification_metrics(
    labels: list[int], predictions: list[int], num_labels: int
) -> dict[str, Any]:
    """Accuracy, macro precision, recall and F1 (0 for a class never predicted or never seen),
    and the confusion matrix, rows true labels and columns predictions.

    Computed from the confusion matrix with numpy rather than scikit-learn, whose import costs
    every training worker and job process a second before its first step.
    """
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(
        matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1
    )
    hits = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = predicted + actual
    f1 = np.divide(2 * hits, both, out=np.zeros_like(hits), where=both > 0)
    return {
        "val_accuracy": float(hits.sum() / max(matrix.sum(), 1)),
        "val_precision": float(precision.mean()),
        "val_recall": float(recall.mean()),
        "val_f1": float(f1.mean()),
        "confusion_matrix": matrix.tolist(),
    }


class Worker:
    """One Ray Train worker's share of a job."""

    def __init__(self, job: TrainingInput) -> None:
        self.job = job
        self.spec = job.job_spec
        self.hp = self.spec.hyperparameters
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.store = Store(make_engine(job.database_url))
        self.device = ray.train.torch.get_device()
        self.cancelled = False
        self.frozen_encoder = self.spec.strategy.kind is StrategyKind.FEATURE_EXTRACTION
        self.images = self.spec.task is Task.IMAGE_CLASSIFICATION
        self.loss_fn = nn.CrossEntropyLoss()
        self.memory_limit = self.spec.limits.memory_mb
        self.last_heartbeat = -math.inf

    def heartbeat(self, *, now: bool = False) -> None:
        """Tell the runner the job progresses; rank 0 speaks for the group, as a rank that
        hangs holds the others at their next collective step."""
        clock = time.monotonic()
        if self.rank == 0 and (now or clock - self.last_heartbeat >= HEARTBEAT_SECONDS):
            self.store.heartbeat(self.job.job_id)
            self.last_heartbeat = clock

    def check_memory(self) -> None:
        """Fail the worker once its peak resident memory passes ``limits.memory_mb``.

        The peak counts spikes inside a step too. A step that allocates far past the node's
        memory is ended by the kernel or Ray's memory monitor first; jobs/failures.py names
        that reason.
        """
        if self.memory_limit is None:
            return
        peak = peak_resident_mib()
        if peak > self.memory_limit:
            raise MemoryLimitExceeded(
                f"resident memory reached {peak:.0f} MiB, over its limits.memory_mb of "
                f"{self.memory_limit}",
                field="limits.memory_mb",
            )

    def log(self, message: str) -> None:
        if self.rank == 0:
            self.store.append_log(self.job.job_id, "INFO", message)

    def cancel_requested(self) -> bool:
        """Whether the job was cancelled, agreed by every rank so that all stop at one step."""
        if not self.cancelled:
            flag = torch.tensor([float(self.store.get_job(self.job.job_id).cancel_requested)])
            if self.world_size > 1:
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.cancelled = bool(flag.item())
            if self.cancelled:
                self.log("cancel requested: stopping training")
        return self.cancelled

    def run(self) -> None:
        self.heartbeat(now=True)  # tells the runner this job's workers are up
        if self.rank == 0 and self.job.placement_record is not None:
            record_placement_group(Path(self.job.placement_record))
        threads = max(1, int(self.spec.resources.cpus_per_worker))
        torch.set_num_threads(threads)
        seed_everything(self.hp.seed)
        base_dir = Path(self.job.base_dir)
        self.processor = load_processor(base_dir)
        self.model = build_classifier(
            base_dir,
            len(self.job.label_names),
            self.hp.dropout,
            pretrained=self.spec.kind is JobKind.FINE_TUNING,
        )
        apply_strategy(self.model, self.spec.strategy)
        self.model.to(self.device)
        # Images are decoded once; texts are their own raw form.
        self.train_items: list[Any] = self.raw_inputs(self.job.train_inputs)
        self.val_items: list[Any] = self.raw_inputs(self.job.val_inputs)

        train_x: Any  # features of a frozen encoder, or the model's inputs
        val_x: Any
        if self.frozen_encoder:
            train_x, val_x = self.cached_features()
            trained: nn.Module = self.model.head
        else:
            train_x = self.model_inputs(self.train_items)
            val_x = self.model_inputs(self.val_items)
            trained = self.model
        self.val_x: Any = val_x
        self.check_memory()
        self.trained = ray.train.torch.prepare_model(trained)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, self.hp))
        steps_per_epoch = math.ceil(
            len(self.job.train_labels) / self.world_size / self.hp.batch_size
        )
        total_steps = steps_per_epoch * self.hp.epochs
        self.scheduler = linear_warmup_schedule(
            self.optimizer, int(total_steps * self.hp.warmup_ratio), total_steps
        )
        progress = self.restore()
        self.train_epochs(train_x, progress)

    def raw_inputs(self, inputs: list[str]) -> list[Any]:
        # Every image of the job is held decoded in each worker; sets larger than memory want
        # a dataset that reads and decodes images per batch instead.
        return [load_image(path) for path in inputs] if self.images else inputs

    def model_inputs(self, items: list[Any]) -> tuple[torch.Tensor, ...]:
        """Token ids and attention masks of texts, or pixel values of images."""
        if self.images:
            return (pixel_values(self.processor, items),)
        return tokenize(cast(PreTrainedTokenizerBase, self.processor), items, self.hp.max_length)

    def cached_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen encoder's outputs for the training and validation inputs, computed only
        for inputs no earlier job with this encoder and its settings has computed. Texts are
        their own keys; images are keyed by their files' contents."""
        items = self.train_items + self.val_items
        encode: Callable[[list[Any]], torch.Tensor]
        if self.images:
            keys = [image_digest(path) for path in self.job.train_inputs + self.job.val_inputs]
            by_key = dict(zip(keys, items, strict=True))

            def encode(missing: list[Any]) -> torch.Tensor:
                return self.encode([by_key[key] for key in missing])
        else:
            keys, encode = items, self.encode
        noun = "images" if self.images else "texts"
        started = time.perf_counter()
        if self.job.feature_cache is None:
            features, computed = encode(keys), len(keys)
        else:
            cache = FeatureCache(Path(self.job.feature_cache))
            features, computed = cache.features(keys, encode, write=self.rank == 0)
        if computed:
            self.log(
                f"encoder outputs computed for {computed} of {len(keys)} {noun} in "
                f"{time.perf_counter() - started:.1f}s; the rest read from the cache"
            )
        else:
            self.log(f"encoder outputs of all {len(keys)} {noun} read from the cache")
        split = len(self.train_items)
        return features[:split], features[split:]

    def encode(self, items: list[Any]) -> torch.Tensor:
        return encode_features(self.model, self.model_inputs(items), self.device)

    def restore(self) -> Progress:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return Progress()
        with checkpoint.as_directory() as folder:
            path = Path(folder)
            load_state(self.unwrapped, path / WEIGHTS_FILE)
            saved = torch.load(path / OPTIMIZER_FILE, weights_only=True)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            progress = Progress(**json.loads((path / STATE_FILE).read_text()))
        self.log(f"resumed from the checkpoint of epoch {progress.epoch}")
        return progress

    @property
    def unwrapped(self) -> nn.Module:
        trained = self.trained
        return trained.module if hasattr(trained, "module") else trained

    def loader(self, train_x: Any) -> DataLoader:
        labels = torch.tensor(self.job.train_labels)
        tensors = (train_x, labels) if self.frozen_encoder else (*train_x, labels)
        generator = torch.Generator().manual_seed(self.hp.seed)
        loader = DataLoader(
            TensorDataset(*tensors),
            batch_size=self.hp.batch_size,
            shuffle=True,
            generator=generator,
        )
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def train_epochs(self, train_x: Any, progress: Progress) -> None:
        stopping = self.hp.early_stopping
        metric, _ = selection_metric(self.spec)
        # Its time stamp tells an operator (and the speed benchmark) when the first step ran.
        self.log(
            f"training from epoch {progress.epoch + 1}: {len(self.job.train_labels)} rows, "
            f"batch size {self.hp.batch_size}, {self.world_size} worker(s)"
        )
        for epoch in range(progress.epoch + 1, self.hp.epochs + 1):
            # Each epoch draws its own random numbers (dropout, augmentation), so a run resumed
            # from a checkpoint trains exactly as one never interrupted.
            seed_everything(self.hp.seed + epoch)
            self.rng = random.Random(f"{self.hp.seed}:{self.rank}:{epoch}")
            if self.hp.augmentation is not None and not self.frozen_encoder:
                train_x = self.augmented_inputs()
            loader = self.loader(train_x)
            if hasattr(loader.sampler, "set_epoch"):
                loader.sampler.set_epoch(epoch)
            started = time.perf_counter()
            train_loss, samples = self.train_one_epoch(loader)
            elapsed = time.perf_counter() - started
            if self.cancel_requested():
                return
            evaluation = self.evaluate()

            score = evaluation[metric]
            if progress.improved(score, stopping):
                progress.best_score, progress.best_epoch, progress.bad_epochs = score, epoch, 0
            else:
                progress.bad_epochs += 1
            progress.epoch = epoch
            metrics = {
                "epoch": epoch,
                "train_loss": train_loss,
                "train_samples_per_second": samples * self.world_size / max(elapsed, 1e-9),
                **{k: v for k, v in evaluation.items() if k != "confusion_matrix"},
            }
            stop = stopping is not None and progress.bad_epochs >= stopping.patience
            self.report(metrics, evaluation, progress, stop)
            if stop:
                self.log(
                    f"early stopping: {metric} has not improved for "
                    f"{progress.bad_epochs} epochs; best was epoch {progress.best_epoch}"
                )
                break

    def augmented_inputs(self) -> tuple[torch.Tensor, ...]:
        augmentation = self.hp.augmentation
        if isinstance(augmentation, ImageAugmentation):
            augment = ImageAugmenter(augmentation)
            return self.model_inputs([augment(image, self.rng) for image in self.train_items])
        assert isinstance(augmentation, WordDropout)
        texts = [word_dropout(text, augmentation, self.rng) for text in self.train_items]
        return self.model_inputs(texts)

    def train_one_epoch(self, loader: DataLoader) -> tuple[float, int]:
        self.trained.train()
        total_loss, samples = 0.0, 0
        for step, batch in enumerate(loader, start=1):
            if step % CANCEL_CHECK_STEPS == 0 and self.cancel_requested():
                break
            *inputs, labels = (tensor.to(self.device) for tensor in batch)
            if len(inputs) == 2:  # token ids and attention mask
                inputs = list(trim_padding(*inputs))
            with autocast(self.device):
                logits = self.trained(*inputs)
            loss = self.loss_fn(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.heartbeat()
            self.check_memory()
            total_loss += float(loss.detach()) * len(labels)
            samples += len(labels)
        return total_loss / max(samples, 1), samples

    @torch.inference_mode()
    def evaluate(self) -> dict[str, Any]:
        """Every worker scores the whole validation set, so all ranks agree on early stopping."""
        model = self.unwrapped
        model.eval()
        labels = torch.tensor(self.job.val_labels)
        if self.frozen_encoder:
            with autocast(self.device):
                logits = model(self.val_x.to(self.device)).float().cpu()
        else:
            logits = run_forward(model, self.val_x, self.device)
        loss = float(self.loss_fn(logits, labels))
        predictions = logits.argmax(-1).tolist()
        metrics = classification_metrics(
            self.job.val_labels, predictions, len(self.job.label_names)
        )
        return {"val_loss": loss, **metrics}

    def report(
        self, metrics: dict[str, Any], evaluation: dict[str, Any], progress: Progress, stop: bool
    ) -> None:
        epoch = metrics["epoch"]
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        self.store.record_epoch(self.job.job_id, epoch, metrics)
        self.heartbeat(now=True)
        shown = " ".join(
            f"{key}={metrics[key]:.4f}"
            for key in ("train_loss", "val_loss", "val_accuracy", "val_f1")
        )
        self.log(f"epoch {epoch}/{self.hp.epochs} {shown}")
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder)
            save_state(self.unwrapped, path / WEIGHTS_FILE)
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                path / OPTIMIZER_FILE,
            )
            (path / STATE_FILE).write_text(json.dumps(progress.__dict__))
            (path / EVAL_FILE).write_text(json.dumps({**metrics, **evaluation, "stopped": stop}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    Worker(TrainingInput(**config)).run()
