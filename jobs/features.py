"""The frozen encoder's outputs, cached on disk text by text.

A feature-extraction job trains only the head, so almost all of its cost is running the encoder
over its texts once. Those outputs depend on the encoder's files, the tokenizer settings and the
text alone, so they are stored in one folder per encoder and settings, keyed by each text's
digest: a search trial or a rerun finds its whole set at once, and a retraining job, whose data
is the production data plus new labelled rows, encodes only the new rows.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# Part of every folder's key: a change to how features are computed must not read old ones.
FEATURE_RECIPE = "tokenizer:truncation,max_length;pooling:mean;dtype:float32"


def cache_folder(root: Path, base_dir: Path, max_length: int) -> Path:
    """The folder for one encoder's files, max length and recipe."""
    digest = hashlib.sha256(f"{FEATURE_RECIPE};max_length={max_length}".encode())
    for path in sorted(p for p in base_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        name = path.relative_to(base_dir).as_posix()
        digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return root / digest.hexdigest()[:32]


def text_digests(texts: list[str]) -> np.ndarray:
    """One 16-byte digest per text, as a (len(texts), 16) uint8 array."""
    rows = [hashlib.blake2b(text.encode(), digest_size=16).digest() for text in texts]
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(texts), 16)


class FeatureCache:
    """Files of (text digests, features) in one folder; each file is one job's full text set."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def features(
        self, texts: list[str], encode: Callable[[list[str]], torch.Tensor], *, write: bool
    ) -> tuple[torch.Tensor, int]:
        """Features of ``texts`` in order, and how many texts ``encode`` had to compute.

        ``write`` is false on all but one of a job's workers, which all compute the same set.
        """
        digests = text_digests(texts)
        whole_set = (
            self.folder / f"{hashlib.sha256(digests.tobytes()).hexdigest()[:32]}.safetensors"
        )
        if whole_set.is_file():
            return load_file(str(whole_set))["features"], 0

        known = self._known()
        missing = [i for i, row in enumerate(digests) if row.tobytes() not in known]
        computed = (
            dict(zip(missing, encode([texts[i] for i in missing]), strict=True)) if missing else {}
        )
        features = torch.stack(
            [
                computed[i] if i in computed else known[row.tobytes()]
                for i, row in enumerate(digests)
            ]
        )
        if write:
            self._write(whole_set, digests, features)
        return features, len(missing)

    def _known(self) -> dict[bytes, torch.Tensor]:
        # Reads every file of the folder; an index file would bound this once folders hold many
        # datasets' worth of features.
        known: dict[bytes, torch.Tensor] = {}
        if not self.folder.is_dir():
            return known
        for path in self.folder.glob("*.safetensors"):
            stored = load_file(str(path))
            for digest, row in zip(stored["digests"].numpy(), stored["features"], strict=True):
                known[digest.tobytes()] = row
        return known

    def _write(self, target: Path, digests: np.ndarray, features: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".partial-{os.getpid()}")
        save_file(
            {"digests": torch.from_numpy(digests.copy()), "features": features.contiguous()},
            str(partial),
        )
        os.replace(partial, target)
