"""Loading a registered model folder and scoring texts with it, outside of training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jobs.model import load_classifier

INFERENCE_BATCH = 64


class Classifier:
    """A trained model folder, loaded once, answering batches of texts."""

    def __init__(self, folder: Path, max_length: int = 128) -> None:
        self.model, self.tokenizer, self.label_names = load_classifier(folder)
        self.max_length = max_length

    @torch.inference_mode()
    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Class probabilities, one row per text, columns in ``label_names`` order."""
        rows = []
        for start in range(0, len(texts), INFERENCE_BATCH):
            encoded = self.tokenizer(
                texts[start : start + INFERENCE_BATCH],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            logits = self.model(encoded["input_ids"], encoded["attention_mask"])
            rows.append(torch.softmax(logits.float(), dim=-1).numpy())
        if not rows:
            return np.zeros((0, len(self.label_names)), dtype=np.float32)
        return np.concatenate(rows)

    def accuracy(self, texts: list[str], labels: list[str]) -> float:
        if not texts:
            raise ValueError("accuracy needs at least one labelled row")
        predicted = self.probabilities(texts).argmax(-1)
        names = np.asarray(self.label_names)[predicted]
        return float(np.mean(names == np.asarray(labels)))
