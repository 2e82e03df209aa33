"""A LoRA job end to end, over HTTP, on the session's real local Ray cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jobs.inference import BasePool, Classifier
from server.client import ApiError
from tests.conftest import Stack, tiny_spec
from tests.factories import read_sentiment

pytestmark = pytest.mark.integration

# The tiny BERT's query and value adapters at rank 8 in its 2 layers, and its 32 x 2 head.
TRAINABLE = 2 * 2 * (8 * 32 + 32 * 8) + 32 * 2 + 2


def test_lora_job_is_checked_trained_registered_as_adapters_and_served(
    stack: Stack, tiny_model_dir: Path
) -> None:
    path = stack.data_file("lora-reviews.csv", read_sentiment("amazon").iloc[:240])
    lora = {"kind": "lora", "rank": 8, "alpha": 16, "target_modules": ["query", "value"]}
    with pytest.raises(ApiError) as caught:
        stack.client.submit(
            tiny_spec(tiny_model_dir, path, strategy={**lora, "target_modules": ["q_proj"]})
        )
    assert (caught.value.status, caught.value.code) == (422, "spec_invalid")
    assert "'q_proj'" in caught.value.message and "query, value" in caught.value.message

    job = stack.client.submit(tiny_spec(tiny_model_dir, path, model_name="adapted", strategy=lora))
    job = stack.client.wait(job["id"], timeout=240, interval=0.5)
    assert job["status"] == "SUCCEEDED", job["error"]
    footprint = job["result"]["footprint"]
    assert footprint["trainable_parameters"] == TRAINABLE
    assert 0 < footprint["adapter_bytes"] < 50_000

    folder = stack.settings.models_dir() / "adapted" / job["id"]
    assert {p.name for p in folder.iterdir()} >= {"adapter", "head.safetensors", "base.json"}
    assert not (folder / "encoder").exists()

    texts = ["great phone", "it broke after a day", "the battery is fine"]
    answer = stack.client.predict("adapted", texts)
    assert answer["version"] == job["model_version"] == 1
    served = np.array(
        [[p["probabilities"][label] for label in ("0", "1")] for p in answer["predictions"]]
    )
    local = Classifier(folder, bases=BasePool()).probabilities(texts)
    np.testing.assert_allclose(served, local, atol=1e-5)
