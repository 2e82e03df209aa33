"""Images end to end, over HTTP, on the session's real local Ray cluster: a zip upload, a model
pre-trained from a configuration, fine-tuned from its registered version, served to base64 and
multipart requests, and watched for drift through its own embeddings."""

from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from jobs.inference import Classifier
from jobs.spec import JobSpec
from monitoring.monitor import Monitor
from server.client import ApiError
from tests.conftest import Stack
from tests.factories import build_tiny_vit, digit_images, write_image_folder

pytestmark = pytest.mark.integration

HYPERPARAMETERS = {"epochs": 3, "batch_size": 32, "encoder_lr": 1e-3, "head_lr": 3e-3}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def digits_zip(target: Path, digits: list[int], per_class: int) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for index, (image, label) in enumerate(digit_images(digits, per_class)):
            archive.writestr(f"digits/{label}/{index:04d}.png", png(image))
    return target


def test_images_are_checked_by_file_before_a_job_queues(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    vit = build_tiny_vit(tmp_path_factory.mktemp("vit-checked"))
    folder = write_image_folder(
        digit_images([0, 1], per_class=5), stack.settings.resolved_data_root() / "bad-digits"
    )
    (folder / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.new("CMYK", (16, 16)).save(folder / "1" / "print.jpg")
    spec = {
        "model_name": "checked",
        "task": "image_classification",
        "base_model": str(vit),
        "data": {"path": "bad-digits"},
        "strategy": {"kind": "feature_extraction"},
    }
    with pytest.raises(ApiError) as caught:
        stack.client.submit(spec)
    message = caught.value.message
    assert caught.value.code == "dataset_invalid", message
    assert message.startswith("2 of 12 images")
    assert "0/broken.png" in message and "1/print.jpg" in message and "CMYK" in message
    assert not [j for j in stack.client.jobs() if j["model_name"] == "checked"]

    with pytest.raises(ApiError) as caught:
        stack.client.submit({**spec, "task": "text_classification"})
    assert caught.value.field == "base_model" and "image model" in caught.value.message


def test_pretrain_then_fine_tune_then_serve_and_watch_images(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("images")
    config_only = build_tiny_vit(work / "vit-config", weights=False)
    assert not list(config_only.glob("*.safetensors"))

    # Pre-training: digits 0-4 from an uploaded zip, weights from the configuration alone.
    upload = stack.client.upload(digits_zip(work / "source.zip", [0, 1, 2, 3, 4], 40))
    assert (upload["format"], upload["rows"]) == ("folder", 200)
    pretraining = {
        "model_name": "digits-base",
        "kind": "pretraining",
        "task": "image_classification",
        "base_model": str(config_only),
        "data": {"dataset": upload["id"], "validation_split": 0.2},
        "strategy": {"kind": "full"},
        "hyperparameters": HYPERPARAMETERS,
        "monitoring": {"enabled": False},
    }
    base_job = stack.client.wait(stack.client.submit(pretraining)["id"], timeout=300, interval=0.5)
    assert base_job["status"] == "SUCCEEDED", base_job["error"]

    # Fine-tuning: digits 5-9 named in a CSV beside their folders, from the registered base.
    root = stack.settings.resolved_data_root() / "target-digits"
    write_image_folder(digit_images([5, 6, 7, 8, 9], per_class=30), root / "images")
    rows = [
        {"file": p.relative_to(root).as_posix(), "digit": p.parent.name}
        for p in sorted((root / "images").rglob("*.png"))
    ]
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    fine_tuning = {
        "model_name": "digits",
        "task": "image_classification",
        "base_model": "model:digits-base",
        "data": {
            "path": "target-digits/labels.csv",
            "image_column": "file",
            "label_column": "digit",
            "validation_split": 0.2,
        },
        "strategy": {"kind": "partial", "frozen_layers": 1},
        "hyperparameters": {**HYPERPARAMETERS, "augmentation": {"kind": "image"}},
        "monitoring": {
            "enabled": False,
            "window_size": 60,
            "retrain": {"enabled": False, "min_window": 30},
        },
    }
    job = stack.client.wait(stack.client.submit(fine_tuning)["id"], timeout=300, interval=0.5)
    assert job["status"] == "SUCCEEDED", job["error"]
    assert job["spec"]["base_model"] == "model:digits-base@1", "the base is pinned at submission"
    assert len(stack.client.epochs(job["id"])) == 3

    # Serving: base64 in JSON and a multipart upload give the same answers as the model folder.
    asked = digit_images([5, 6, 7, 8, 9], per_class=8)
    images = [image.convert("RGB") for image, _ in asked]
    encoded = [base64.b64encode(png(image)).decode() for image in images]
    answer = stack.client.predict("digits", encoded)
    assert answer["version"] == job["model_version"]
    files = []
    for index, image in enumerate(images[:4]):
        files.append(work / f"ask-{index}.png")
        image.save(files[-1])
    uploaded = stack.client.predict_files("digits", files)
    assert [p["label"] for p in uploaded["predictions"]] == [
        p["label"] for p in answer["predictions"][:4]
    ]
    version = stack.store.get_version("digits", job["model_version"])
    local = Classifier(stack.settings.models_dir() / version.path).probabilities(images)
    served = np.array(
        [
            [p["probabilities"][label] for label in sorted(p["probabilities"])]
            for p in answer["predictions"]
        ]
    )
    np.testing.assert_allclose(served, local, atol=1e-5)

    with pytest.raises(ApiError) as caught:
        stack.client.predict("digits", [encoded[0], "not base64 at all!"])
    assert caught.value.status in (400, 422) and caught.value.field == "inputs[1]"

    # The prediction log keeps each image's embedding and the image itself.
    stack.wait_for(
        lambda: len(stack.store.recent_predictions("digits", version.version, limit=100)) >= 44,
        timeout=30,
        what="the image predictions to be logged",
    )
    logged = stack.store.recent_predictions("digits", version.version, limit=100)
    assert all(p.embedding is not None and len(p.embedding) == 32 * 4 for p in logged)
    kept = stack.settings.resolved_data_root() / logged[0].text.removeprefix("image:")
    with Image.open(kept) as image:
        assert image.size == (16, 16)

    # Drift: the same digits are not drift; the same digits inverted are, by their embeddings.
    monitor = Monitor(stack.settings, stack.store)
    spec = JobSpec.model_validate(version.spec)
    quiet = monitor.check(version, spec)
    assert quiet is not None and not quiet.result.drift_detected
    checked = {c.name for c in quiet.result.checks if not c.skipped}
    assert checked == {"embedding", "predicted_label"}
    inverted = [ImageOps.invert(image) for image, _ in digit_images([5, 6, 7, 8, 9], 12)]
    stack.client.predict("digits", [base64.b64encode(png(i)).decode() for i in inverted])
    stack.wait_for(
        lambda: len(stack.store.recent_predictions("digits", version.version, limit=200)) >= 104,
        timeout=30,
        what="the inverted images to be logged",
    )
    drifted = monitor.check(version, spec)
    assert drifted is not None and drifted.result.drift_detected
    assert "embedding" in drifted.result.detected_checks

    # Retraining: labelled image predictions join the training rows, read from the kept images.
    labels = [
        {"prediction_id": p["id"], "label": str(label)}
        for p, (_, label) in zip(answer["predictions"], asked, strict=True)
    ]
    stack.client.feedback("digits", labels=labels)
    feedback = stack.store.labelled_feedback("digits")
    assert len(feedback) == 40 and all(text.startswith("image:") for text, _, _ in feedback)
    retrain_id = monitor.start_retrain(version, spec, feedback, drifted.report.id)
    retrain = stack.client.wait(retrain_id, timeout=300, interval=0.5)
    assert retrain["status"] == "SUCCEEDED", retrain["error"]
    lines = [line["message"] for line in stack.client.log(retrain_id)]
    assert any("20 labelled rows added, 20 held out" in line for line in lines), lines
