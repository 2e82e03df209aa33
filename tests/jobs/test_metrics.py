"""The validation metrics and the learning-rate schedule of a job, against scikit-learn's and
transformers' definitions of the same."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from jobs.train import classification_metrics, linear_warmup_schedule


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_scikit_learn_macro_averages(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_labels = int(rng.integers(2, 6))
    labels = rng.integers(0, num_labels, size=200).tolist()
    # Mostly right, and some classes predicted rarely or never, as after an epoch or two.
    predictions = [
        label if rng.random() < 0.6 else int(rng.integers(0, max(1, num_labels - 1)))
        for label in labels
    ]
    got = classification_metrics(labels, predictions, num_labels)

    classes = list(range(num_labels))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, average="macro", zero_division=0, labels=classes
    )
    assert got["val_accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert got["val_precision"] == pytest.approx(precision)
    assert got["val_recall"] == pytest.approx(recall)
    assert got["val_f1"] == pytest.approx(f1)
    assert got["confusion_matrix"] == confusion_matrix(labels, predictions, labels=classes).tolist()


def test_a_class_absent_from_labels_and_predictions_scores_zero() -> None:
    got = classification_metrics([0, 0, 1], [0, 0, 1], num_labels=3)
    assert got["val_accuracy"] == 1.0
    assert got["val_f1"] == pytest.approx(2 / 3)  # classes 0 and 1 perfect, class 2 zero
    assert got["confusion_matrix"] == [[2, 0, 0], [0, 1, 0], [0, 0, 0]]


@pytest.mark.parametrize(("warmup", "total"), [(0, 10), (3, 10), (10, 10), (4, 37)])
def test_the_learning_rate_schedule_is_transformers_linear_warmup(warmup: int, total: int) -> None:
    def rates(make_schedule: Callable[..., Any]) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        schedule = make_schedule(optimizer, warmup, total)
        seen = []
        for _ in range(total + 2):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return seen

    assert rates(linear_warmup_schedule) == pytest.approx(
        rates(transformers.get_linear_schedule_with_warmup)
    )
