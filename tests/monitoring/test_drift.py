"""Drift checks on real traffic: Amazon phone reviews as the reference, Yelp reviews as drift."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict

from jobs.builtins import builtin_model_dir
from monitoring.drift import (
    DriftConfig,
    Window,
    check_drift,
    holm_adjust,
    mmd_permutation_test,
    oov_share,
)
from monitoring.embeddings import TextEncoder

SENTIMENT_DIR = Path(__file__).resolve().parents[1] / "data" / "sentiment"


@dataclass(frozen=True)
class Corpus:
    amazon: pd.DataFrame
    yelp: pd.DataFrame
    amazon_embeddings: np.ndarray
    yelp_embeddings: np.ndarray
    amazon_predictions: np.ndarray
    yelp_predictions: np.ndarray
    # The Amazon file is not in random order (its second quarter is told apart from the rest by
    # the embedding test), so "unchanged traffic" is drawn from a shuffled order.
    amazon_order: np.ndarray


def read_sentiment(name: str) -> pd.DataFrame:
    return pd.read_csv(
        SENTIMENT_DIR / name, sep="\t", header=None, names=["text", "label"], quoting=3
    )


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    amazon = read_sentiment("amazon_cells_labelled.txt")
    yelp = read_sentiment("yelp_labelled.txt")
    encoder = TextEncoder(builtin_model_dir("minilm"))
    amazon_embeddings = encoder.encode(amazon["text"].tolist())
    yelp_embeddings = encoder.encode(yelp["text"].tolist())

    # A sentiment head trained on Amazon, as the served model would be; Amazon predictions are
    # out-of-fold so that reference accuracy is not measured on the training rows.
    head = LogisticRegression(max_iter=1000)
    amazon_predictions = cross_val_predict(head, amazon_embeddings, amazon["label"], cv=5)
    yelp_predictions = head.fit(amazon_embeddings, amazon["label"]).predict(yelp_embeddings)
    return Corpus(
        amazon,
        yelp,
        amazon_embeddings,
        yelp_embeddings,
        amazon_predictions.astype(str),
        yelp_predictions.astype(str),
        np.random.default_rng(0).permutation(len(amazon)),
    )


def amazon_window(corpus: Corpus, rows: np.ndarray, *, labelled: bool = False) -> Window:
    return _window(
        corpus.amazon, corpus.amazon_embeddings, corpus.amazon_predictions, rows, labelled
    )


def yelp_window(corpus: Corpus, rows: np.ndarray, *, labelled: bool = False) -> Window:
    return _window(corpus.yelp, corpus.yelp_embeddings, corpus.yelp_predictions, rows, labelled)


def _window(
    frame: pd.DataFrame,
    embeddings: np.ndarray,
    predictions: np.ndarray,
    rows: np.ndarray,
    labelled: bool,
) -> Window:
    true_labels = frame["label"].iloc[rows].astype(str).tolist() if labelled else None
    return Window(
        texts=frame["text"].iloc[rows].tolist(),
        embeddings=embeddings[rows],
        predicted_labels=predictions[rows].tolist(),
        true_labels=true_labels,
    )


def reference(corpus: Corpus, *, labelled: bool = False) -> Window:
    return amazon_window(corpus, corpus.amazon_order[:500], labelled=labelled)


def held_out(corpus: Corpus, *, labelled: bool = False) -> Window:
    return amazon_window(corpus, corpus.amazon_order[500:], labelled=labelled)


def test_encoder_gives_unit_length_float32_rows_384_wide(corpus: Corpus) -> None:
    embeddings = corpus.amazon_embeddings
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (1000, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_embedding_drift_is_detected_from_amazon_to_yelp(corpus: Corpus) -> None:
    result = check_drift(reference(corpus), yelp_window(corpus, np.arange(200)))

    embedding = result.check("embedding")
    assert result.drift_detected
    assert embedding.detected
    assert embedding.score is not None and embedding.score <= 0.001
    assert (embedding.reference_size, embedding.current_size) == (500, 200)


def test_no_drift_on_two_halves_of_amazon(corpus: Corpus) -> None:
    result = check_drift(reference(corpus, labelled=True), held_out(corpus, labelled=True))

    assert not result.drift_detected
    assert result.detected_checks == []
    assert all(check.skipped is None for check in result.checks)


def test_holm_correction_matches_values_worked_by_hand() -> None:
    # Sorted: 0.01*4 = 0.04, 0.03*3 = 0.09, 0.04*2 = 0.08 -> lifted to 0.09, 0.5*1 = 0.5.
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.5])

    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_holm_correction_needs_one_strong_check_not_several_borderline_ones() -> None:
    borderline = holm_adjust([0.02, 0.03, 0.04, 0.9])
    one_strong = holm_adjust([0.001, 0.3, 0.6, 0.9])

    assert min(borderline) > 0.05
    assert one_strong[0] == pytest.approx(0.004)


def test_check_drift_reports_holm_adjusted_p_values_of_the_checks_that_ran(
    corpus: Corpus,
) -> None:
    result = check_drift(reference(corpus), yelp_window(corpus, np.arange(100)))

    ran = [check for check in result.checks if check.skipped is None]
    assert [check.name for check in ran] == [
        "embedding",
        "predicted_label",
        "text_length",
        "oov_share",
    ]
    expected = holm_adjust([check.score for check in ran if check.score is not None])
    assert [check.adjusted_p_value for check in ran] == pytest.approx(expected)
    assert all(check.detected == (check.adjusted_p_value <= 0.05) for check in ran)
    assert result.correction == "holm"


def test_predictions_collapsing_to_one_class_are_label_drift(corpus: Corpus) -> None:
    current = held_out(corpus)
    collapsed = Window(
        texts=current.texts,
        embeddings=current.embeddings,
        predicted_labels=["1"] * current.size,
    )

    result = check_drift(reference(corpus), collapsed, DriftConfig(checks=("predicted_label",)))

    assert result.check("predicted_label").detected


def test_unseen_words_from_yelp_raise_the_oov_check(corpus: Corpus) -> None:
    config = DriftConfig(checks=("oov_share",))

    result = check_drift(reference(corpus), yelp_window(corpus, np.arange(200)), config)

    assert result.check("oov_share").detected


def test_oov_share_counts_words_missing_from_the_vocabulary() -> None:
    shares = oov_share(["The screen's fine", "battery died", "!!!"], {"the", "screen's", "battery"})

    assert shares.tolist() == pytest.approx([1 / 3, 1 / 2, 0.0])


def test_accuracy_drop_is_detected_when_predictions_go_wrong(corpus: Corpus) -> None:
    current = held_out(corpus, labelled=True)
    rng = np.random.default_rng(1)
    # A broken model: 30% of answers replaced by coin flips, so about 15% more errors.
    predicted = [
        str(rng.integers(2)) if rng.random() < 0.3 else label for label in current.predicted_labels
    ]
    broken = Window(current.texts, current.embeddings, predicted, current.true_labels)

    result = check_drift(
        reference(corpus, labelled=True), broken, DriftConfig(checks=("accuracy",))
    )

    accuracy = result.check("accuracy")
    assert accuracy.detected
    assert accuracy.details["drop"] >= 0.05
    assert accuracy.details["reference_accuracy"] > accuracy.details["current_accuracy"]


def test_accuracy_check_is_skipped_without_true_labels(corpus: Corpus) -> None:
    result = check_drift(reference(corpus, labelled=True), held_out(corpus))

    accuracy = result.check("accuracy")
    assert accuracy.skipped is not None and "labelled rows" in accuracy.skipped
    assert accuracy.score is None and not accuracy.detected


def test_small_windows_skip_every_check_and_give_no_verdict(corpus: Corpus) -> None:
    result = check_drift(reference(corpus), yelp_window(corpus, np.arange(10)))

    assert not result.drift_detected
    assert all(check.skipped and "min_window_size=30" in check.skipped for check in result.checks)


def test_report_is_evidently_json_and_html_comes_only_on_request(corpus: Corpus) -> None:
    current = yelp_window(corpus, np.arange(100))

    plain = check_drift(reference(corpus), current)
    rendered = check_drift(reference(corpus), current, render_html=True)

    metric_types = [metric["config"]["type"] for metric in plain.report["metrics"]]
    assert metric_types == [
        "evidently:metric_v2:EmbeddingsMMDDrift",
        "evidently:metric_v2:ValueDrift",
        "evidently:metric_v2:ValueDrift",
        "evidently:metric_v2:ValueDrift",
    ]
    assert plain.report["metrics"][0]["value"] == plain.check("embedding").score
    assert plain.html is None
    assert rendered.html is not None and "<html" in rendered.html
    json.dumps(plain.to_dict())


def test_mmd_test_is_repeatable_and_its_p_value_is_floored_by_the_permutations(
    corpus: Corpus,
) -> None:
    amazon = corpus.amazon_embeddings[corpus.amazon_order[:300]]
    yelp = corpus.yelp_embeddings[:300]

    first = mmd_permutation_test(amazon, yelp, permutations=199, seed=3)
    again = mmd_permutation_test(amazon, yelp, permutations=199, seed=3)

    assert first == again
    assert first.p_value == pytest.approx(1 / 200)
    assert first.mmd2 > 0


def test_mmd_test_samples_windows_larger_than_max_rows(corpus: Corpus) -> None:
    result = mmd_permutation_test(
        corpus.amazon_embeddings, corpus.yelp_embeddings, permutations=99, max_rows=200
    )

    assert (result.reference_rows, result.current_rows) == (200, 200)


def test_window_rejects_columns_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="predicted_labels has 1 rows but texts has 2"):
        Window(["a", "b"], np.zeros((2, 4), dtype=np.float32), ["1"])


def test_check_drift_rejects_embeddings_of_different_widths() -> None:
    narrow = Window(["a"] * 40, np.zeros((40, 4), dtype=np.float32), ["1"] * 40)
    wide = Window(["a"] * 40, np.zeros((40, 8), dtype=np.float32), ["1"] * 40)

    with pytest.raises(ValueError, match="reference 4, current 8"):
        check_drift(narrow, wide)


def test_config_rejects_a_check_named_twice() -> None:
    with pytest.raises(ValidationError, match="at most once"):
        DriftConfig(checks=("embedding", "embedding"))
