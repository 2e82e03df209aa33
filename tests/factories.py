"""Small things the tests build: tiny BERT- and ViT-shaped base models and labelled data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from jobs.builtins import builtin_model_dir
from server.demo import read_sentiment_file

SENTIMENT_DIR = Path(__file__).parent / "data" / "sentiment"
SENTIMENT_FILES = {
    "amazon": SENTIMENT_DIR / "amazon_cells_labelled.txt",
    "yelp": SENTIMENT_DIR / "yelp_labelled.txt",
}


def build_tiny_bert(target: Path) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved as safetensors: trains in seconds."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(builtin_model_dir("minilm")).save_pretrained(target)
    return target


def build_tiny_vit(
    target: Path,
    *,
    image_size: int = 16,
    weights: bool = True,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
) -> Path:
    """A small ViT (by default 2 layers, 32 wide) on 16x16 images in 4x4 patches, with its image
    processor.

    Without ``weights`` the folder holds the configuration alone: what a pretraining job starts
    from.
    """
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=3,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
    )
    if weights:
        ViTModel(config).save_pretrained(target, safe_serialization=True)
    else:
        config.save_pretrained(target)
    processor = ViTImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(target)
    return target


def digit_images(digits: list[int], per_class: int | None = None) -> list[tuple[Image.Image, int]]:
    """scikit-learn's UCI handwritten digits (8x8, 16 grey levels) as 16x16 greyscale images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    found: list[tuple[Image.Image, int]] = []
    taken = dict.fromkeys(digits, 0)
    for pixels, label in zip(data.images, data.target, strict=True):
        label = int(label)
        if label not in taken or (per_class is not None and taken[label] >= per_class):
            continue
        taken[label] += 1
        grey = Image.fromarray((pixels * 255 / 16).astype(np.uint8), mode="L")
        found.append((grey.resize((16, 16), Image.Resampling.NEAREST), label))
    return found


def write_image_folder(images: list[tuple[Image.Image, int]], target: Path) -> Path:
    """One subfolder of PNG files per class."""
    for index, (image, label) in enumerate(images):
        folder = target / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:05d}.png")
    return target


def read_sentiment(name: str) -> pd.DataFrame:
    return read_sentiment_file(SENTIMENT_FILES[name])


def write_sentiment_csv(name: str, target: Path, rows: slice = slice(None)) -> Path:
    frame = read_sentiment(name).iloc[rows]
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(target, index=False)
    return target
