"""The frozen encoder's feature cache, with the tiny model's real encoder behind it."""

from __future__ import annotations

from pathlib import Path

import torch

from jobs.builtins import builtin_model_dir
from jobs.features import FeatureCache, cache_folder
from jobs.model import build_classifier, load_tokenizer
from jobs.train import encode_features, tokenize
from tests.factories import read_sentiment

TEXTS = read_sentiment("amazon")["text"].tolist()[:40]


class CountingEncoder:
    """The tiny model's real encoder, counting the texts it is asked to encode."""

    def __init__(self, model_dir: Path) -> None:
        self.model = build_classifier(model_dir, 2, dropout=0.0)
        self.tokenizer = load_tokenizer(model_dir)
        self.encoded = 0

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.encoded += len(texts)
        ids, mask = tokenize(self.tokenizer, texts, 32)
        return encode_features(self.model, (ids, mask), torch.device("cpu"))


def test_a_second_job_with_the_same_texts_encodes_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    encoder = CountingEncoder(tiny_model_dir)
    cache = FeatureCache(tmp_path / "features")
    first, computed_first = cache.features(TEXTS, encoder, write=True)
    again, computed_again = cache.features(TEXTS, encoder, write=True)
    assert (computed_first, computed_again, encoder.encoded) == (40, 0, 40)
    assert torch.equal(first, again)


def test_a_retraining_set_encodes_only_its_new_texts(tiny_model_dir: Path, tmp_path: Path) -> None:
    encoder = CountingEncoder(tiny_model_dir)
    cache = FeatureCache(tmp_path / "features")
    cache.features(TEXTS[:30], encoder, write=True)
    retraining = TEXTS[10:40]  # twenty texts seen before, ten new ones

    features, computed = cache.features(retraining, encoder, write=True)
    assert computed == 10
    assert torch.allclose(features, encoder(retraining), atol=1e-5)


def test_only_the_writing_worker_stores_features(tiny_model_dir: Path, tmp_path: Path) -> None:
    encoder = CountingEncoder(tiny_model_dir)
    cache = FeatureCache(tmp_path / "features")
    cache.features(TEXTS, encoder, write=False)
    assert cache.features(TEXTS, encoder, write=True)[1] == len(TEXTS)


def test_the_folder_changes_with_the_model_and_the_max_length(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    minilm = builtin_model_dir("minilm")
    assert cache_folder(tmp_path, tiny_model_dir, 32) == cache_folder(tmp_path, tiny_model_dir, 32)
    assert cache_folder(tmp_path, tiny_model_dir, 32) != cache_folder(tmp_path, tiny_model_dir, 64)
    assert cache_folder(tmp_path, tiny_model_dir, 32) != cache_folder(tmp_path, minilm, 32)


def test_trimmed_padding_gives_the_features_of_full_padding(tiny_model_dir: Path) -> None:
    encoder = CountingEncoder(tiny_model_dir)
    ids, mask = tokenize(encoder.tokenizer, TEXTS, 64)
    with torch.inference_mode():
        full = encoder.model.features(ids, mask)
    trimmed = encode_features(encoder.model, (ids, mask), torch.device("cpu"))
    assert mask[:, -1].sum() == 0, "the texts must be shorter than max_length for this test"
    assert torch.allclose(trimmed, full, atol=1e-5)
