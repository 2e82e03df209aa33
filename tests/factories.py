"""Small things the tests build: a tiny BERT-shaped base model and labelled data files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

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


def read_sentiment(name: str) -> pd.DataFrame:
    return read_sentiment_file(SENTIMENT_FILES[name])


def write_sentiment_csv(name: str, target: Path, rows: slice = slice(None)) -> Path:
    frame = read_sentiment(name).iloc[rows]
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(target, index=False)
    return target
