"""Loading a registered model folder and scoring texts or images with it, outside of training.

LoRA versions of one base share that base in memory: a process holds one copy of each base
model (by fingerprint) as long as a loaded version uses it, with every loaded version's
adapters attached to it, and switches to a version's adapters for each forward pass. Switching
costs nothing and an unmerged adapter adds two rank-r matrix products per adapted layer, where
merging would need a copy of the base per version.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from jobs.errors import ModelUnavailable
from jobs.images import load_image
from jobs.lora import ADAPTER_WEIGHTS, quiet_peft
from jobs.model import (
    ADAPTER_DIR,
    ENCODER_DIR,
    HEAD_FILE,
    folder_task,
    is_lora_folder,
    load_classifier,
    load_encoder,
    load_labels,
    load_processor,
    lora_base,
    wrap_encoder,
)
from jobs.spec import Task

if TYPE_CHECKING:
    from peft import PeftModel

INFERENCE_BATCH = 64


class SharedBase:
    """One base encoder in memory with the adapters of every loaded LoRA version attached."""

    def __init__(self, folder: Path) -> None:
        self.encoder = load_encoder(folder).eval()
        self.processor = load_processor(folder)
        self.task = folder_task(folder)
        self.peft: PeftModel | None = None
        self.lock = threading.Lock()
        self.retired: list[str] = []
        self._names = itertools.count()

    def attach(self, adapter_dir: Path) -> str:
        """Load a version's adapters next to the others; returns the name to activate them by."""
        from peft import PeftModel  # seconds to import; only processes serving LoRA pay it

        if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
            # peft would fall back to a pickled adapter_model.bin; weights load from safetensors.
            raise ModelUnavailable(
                f"adapter folder {str(adapter_dir)!r} has no {ADAPTER_WEIGHTS}; adapters load "
                "from safetensors only",
                field="base_model",
            )
        with self.lock, quiet_peft():
            self._drop_retired()
            name = f"v{next(self._names)}"
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.encoder, adapter_dir, adapter_name=name)
            else:
                self.peft.load_adapter(adapter_dir, adapter_name=name)
            self.peft.eval()
            return name

    @contextmanager
    def active(self, name: str) -> Iterator[None]:
        """Hold the base with ``name``'s adapters switched on, for one forward pass."""
        assert self.peft is not None, "attach comes first"
        with self.lock:
            self._drop_retired()
            self.peft.set_adapter(name, inference_mode=True)
            yield

    def retire(self, name: str) -> None:
        """Mark a version's adapters for removal. Called when the version is garbage collected,
        which may happen in the middle of a forward pass, so they go at the next safe point."""
        self.retired.append(name)

    def _drop_retired(self) -> None:
        retired = set(self.retired)
        if self.peft is None or not retired:
            return
        live = [name for name in self.peft.peft_config if name not in retired]
        if not live:
            return  # a PeftModel keeps at least one adapter; the last goes with the base itself
        self.peft.set_adapter(live[0], inference_mode=True)  # deleting the active one would warn
        for name in retired:
            self.peft.delete_adapter(name)
            self.retired.remove(name)


class BasePool:
    """Base encoders of LoRA versions, one per fingerprint, kept while some version uses them."""

    def __init__(self) -> None:
        self._bases: weakref.WeakValueDictionary[str, SharedBase] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, folder: Path, fingerprint: str) -> SharedBase:
        with self._lock:
            base = self._bases.get(fingerprint)
            if base is None:
                base = SharedBase(folder)
                self._bases[fingerprint] = base
            return base


SHARED_BASES = BasePool()


Input = str | Image.Image


class Classifier:
    """A trained model folder, loaded once, answering batches of texts or of RGB images."""

    def __init__(self, folder: Path, max_length: int = 128, bases: BasePool | None = None) -> None:
        self.max_length = max_length
        self.active: Callable[[], AbstractContextManager[None]] = nullcontext
        if is_lora_folder(folder):
            self._load_lora(folder, bases or SHARED_BASES)
        else:
            self.model, self.processor, self.label_names = load_classifier(folder)
            self.task = folder_task(folder / ENCODER_DIR)

    @property
    def is_image_model(self) -> bool:
        return self.task is Task.IMAGE_CLASSIFICATION

    def _load_lora(self, folder: Path, bases: BasePool) -> None:
        base = bases.get(*lora_base(folder))
        name = base.attach(folder / ADAPTER_DIR)
        weakref.finalize(self, base.retire, name)
        self.label_names = load_labels(folder)
        encoder: nn.Module = base.peft  # type: ignore[assignment]
        self.model = wrap_encoder(encoder, base.task, len(self.label_names))
        self.model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        self.model.eval()
        self.processor = base.processor
        self.task = base.task
        self.active = lambda: base.active(name)

    def model_inputs(self, batch: list[Any]) -> tuple[torch.Tensor, ...]:
        """Tokens and attention mask of texts, or pixel values of images."""
        if self.is_image_model:
            images = [load_image(item) if isinstance(item, str | Path) else item for item in batch]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            return (pixels,)
        tokenizer = cast(PreTrainedTokenizerBase, self.processor)
        encoded = tokenizer(
            batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return encoded["input_ids"], encoded["attention_mask"]

    @torch.inference_mode()
    def forward(self, inputs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities (columns in ``label_names`` order) and the pooled features the
        head reads, one row per input. Images may be given as RGB images or file paths."""
        probabilities, features = [], []
        for start in range(0, len(inputs), INFERENCE_BATCH):
            model_inputs = self.model_inputs(list(inputs[start : start + INFERENCE_BATCH]))
            with self.active():
                pooled = self.model.features(*model_inputs)
                logits = self.model.head(pooled)
            probabilities.append(torch.softmax(logits.float(), dim=-1).numpy())
            features.append(pooled.float().numpy())
        if not probabilities:
            width = self.model.hidden
            empty = np.zeros((0, len(self.label_names)), dtype=np.float32)
            return empty, np.zeros((0, width), dtype=np.float32)
        return np.concatenate(probabilities), np.concatenate(features)

    def probabilities(self, inputs: list[Any]) -> np.ndarray:
        """Class probabilities, one row per input, columns in ``label_names`` order."""
        return self.forward(inputs)[0]

    def embeddings(self, inputs: list[Any]) -> np.ndarray:
        """The model's own pooled features of its inputs: what image drift is measured on."""
        return self.forward(inputs)[1]

    def accuracy(self, inputs: list[Any], labels: list[str]) -> float:
        if not inputs:
            raise ValueError("accuracy needs at least one labelled row")
        predicted = self.probabilities(inputs).argmax(-1)
        names = np.asarray(self.label_names)[predicted]
        return float(np.mean(names == np.asarray(labels)))
