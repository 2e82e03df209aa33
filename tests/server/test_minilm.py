"""The real builtin MiniLM, fine-tuned in feature-extraction mode on the cluster."""

from __future__ import annotations

import pytest

from tests.conftest import Stack
from tests.factories import read_sentiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_builtin_minilm_feature_extraction_learns_sentiment(stack: Stack) -> None:
    data = stack.data_file("minilm.csv", read_sentiment("amazon").iloc[:400])
    spec = {
        "model_name": "minilm",
        "data": {"path": data, "validation_split": 0.25},
        "strategy": {"kind": "feature_extraction"},
        "hyperparameters": {"epochs": 6, "batch_size": 32, "head_lr": 3e-3},
    }
    job = stack.client.wait(stack.client.submit(spec)["id"], timeout=300)
    assert job["status"] == "SUCCEEDED", job["error"]
    assert job["result"]["metrics"]["val_accuracy"] >= 0.8
    lines = [line["message"] for line in stack.client.log(job["id"])]
    assert any("encoder outputs computed" in line for line in lines)
    assert stack.client.predict("minilm", ["Terrible, it broke."])["predictions"][0]["label"] == "0"
