"""Sentence embeddings for drift checks: one encoder, loaded once, reused for every window."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from jobs.errors import ModelUnavailable

logger = logging.getLogger(__name__)

MAX_LENGTH = 128


class TextEncoder:
    """Turns sentences into L2-normalised mean-pooled vectors from a Hugging Face encoder.

    The model is read from a local folder, from safetensors only and without remote code, so a
    drift check never reaches the network or runs code shipped with the weights.
    """

    def __init__(self, model_dir: Path | str, *, max_length: int = MAX_LENGTH) -> None:
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ModelUnavailable(
                f"no Hugging Face model in {str(path)!r}: expected a folder holding config.json",
                field="model_dir",
            )
        self.model_dir = path
        self.max_length = max_length
        self._tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self._model = AutoModel.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
        self._model.eval()
        logger.info("encoder %s: loaded, %d dimensions", path.name, self.dimension)

    @property
    def dimension(self) -> int:
        return int(self._model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Return one float32 row per text, shape (len(texts), dimension)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        batches = [
            self._encode_batch(texts[start : start + batch_size])
            for start in range(0, len(texts), batch_size)
        ]
        return np.concatenate(batches).astype(np.float32, copy=False)

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        tokens = self._tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        with torch.inference_mode():
            hidden = self._model(**tokens).last_hidden_state
            pooled = _mean_pool(hidden, tokens["attention_mask"])
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.numpy()


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Padding positions must not pull the average, so they are weighted by zero.
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
