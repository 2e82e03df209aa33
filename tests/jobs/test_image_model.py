"""Image models on a tiny ViT: what each strategy trains, LoRA adapters on images, pretraining
from a configuration, and the classifier the predictor serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.errors import ModelUnavailable
from jobs.inference import BasePool, Classifier
from jobs.model import (
    ImageTransferClassifier,
    apply_strategy,
    build_classifier,
    check_strategy,
    check_task,
    load_processor,
    resolve_base_model,
    save_classifier,
    save_lora_classifier,
)
from jobs.spec import Strategy, Task, parse_spec
from tests.factories import build_tiny_vit, digit_images

IMAGES = [image.convert("RGB") for image, _ in digit_images([0, 1, 2], per_class=3)]


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vit(tmp_path_factory.mktemp("vit"))


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def pixels(vit_dir: Path, images: list[Image.Image]) -> torch.Tensor:
    return load_processor(vit_dir)(images=images, return_tensors="pt")["pixel_values"]


def test_an_image_base_is_refused_for_text_and_a_text_base_for_images(
    vit_dir: Path, tiny_model_dir: Path
) -> None:
    check_task(Task.IMAGE_CLASSIFICATION, vit_dir)
    with pytest.raises(ModelUnavailable, match="image model"):
        check_task(Task.TEXT_CLASSIFICATION, vit_dir)
    with pytest.raises(ModelUnavailable, match=r"preprocessor_config\.json"):
        check_task(Task.IMAGE_CLASSIFICATION, tiny_model_dir)


def test_partial_freezes_the_patch_embeddings_and_lowest_layers(vit_dir: Path) -> None:
    model = build_classifier(vit_dir, num_labels=3, dropout=0.0)
    assert isinstance(model, ImageTransferClassifier)
    apply_strategy(model, Strategy(kind="partial", frozen_layers=1))
    names = trainable(model)
    assert not any("embeddings" in n or "layers.0." in n or "pooler" in n for n in names)
    assert any("layers.1." in n for n in names) and "encoder.layernorm.weight" in names
    assert {"head.1.weight", "head.1.bias"} <= names
    with pytest.raises(Exception, match="2 layers"):
        check_strategy(Strategy(kind="partial", frozen_layers=3), vit_dir)


def test_full_trains_everything_but_the_unused_pooler(vit_dir: Path) -> None:
    model = build_classifier(vit_dir, num_labels=3, dropout=0.0)
    apply_strategy(model, Strategy(kind="full"))
    frozen = {n for n, _ in model.named_parameters()} - trainable(model)
    assert frozen == {"encoder.pooler.dense.weight", "encoder.pooler.dense.bias"}
    logits = model(pixels(vit_dir, IMAGES))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_pretraining_starts_from_the_configuration_not_the_weights(
    vit_dir: Path, tmp_path: Path
) -> None:
    config_only = build_tiny_vit(tmp_path / "config-only", weights=False)
    with pytest.raises(ModelUnavailable, match="safetensors"):
        resolve_base_model(str(config_only))
    assert resolve_base_model(str(config_only), weights=False) == config_only
    torch.manual_seed(1)
    fresh = build_classifier(config_only, num_labels=3, dropout=0.0, pretrained=False)
    loaded = build_classifier(vit_dir, num_labels=3, dropout=0.0)
    weight = "encoder.embeddings.patch_embeddings.projection.weight"
    assert not torch.equal(fresh.state_dict()[weight], loaded.state_dict()[weight])
    with pytest.raises(Exception, match=r"strategy\.kind must be 'full'"):
        parse_spec({"model_name": "base", "kind": "pretraining", "data": {"path": "digits"}})


def test_a_saved_image_model_serves_images_and_paths_alike(vit_dir: Path, tmp_path: Path) -> None:
    model = build_classifier(vit_dir, num_labels=3, dropout=0.0).eval()
    folder = tmp_path / "v1"
    save_classifier(model, vit_dir, ["0", "1", "2"], folder)
    assert (folder / "encoder" / "preprocessor_config.json").is_file()
    classifier = Classifier(folder)
    assert classifier.is_image_model
    with torch.inference_mode():
        expected = torch.softmax(model(pixels(vit_dir, IMAGES)), -1).numpy()
    np.testing.assert_allclose(classifier.probabilities(IMAGES), expected, atol=1e-6)
    paths = []
    for index, image in enumerate(IMAGES):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    np.testing.assert_allclose(classifier.probabilities(paths), expected, atol=1e-6)
    assert classifier.embeddings(IMAGES).shape == (len(IMAGES), 32)


def lora_strategy(**fields: Any) -> Strategy:
    return Strategy(kind="lora", rank=4, alpha=8, target_modules=["q_proj", "v_proj"], **fields)


def test_lora_on_a_vit_trains_adapters_and_head_and_loads_to_identical_logits(
    vit_dir: Path, tmp_path: Path
) -> None:
    check_strategy(lora_strategy(), vit_dir)
    torch.manual_seed(0)
    model = build_classifier(vit_dir, num_labels=3, dropout=0.0)
    apply_strategy(model, lora_strategy())
    names = trainable(model)
    assert names and all("lora_" in n or n.startswith("head.") for n in names)
    assert sum("lora_A" in n for n in names) == 2 * 2  # query and value in each of 2 layers
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    model.eval()
    folder = tmp_path / "adapted"
    save_lora_classifier(model, vit_dir, str(vit_dir), ["0", "1", "2"], folder)
    assert not (folder / "encoder").exists()
    classifier = Classifier(folder, bases=BasePool())
    assert classifier.is_image_model
    with torch.inference_mode():
        expected = torch.softmax(model(pixels(vit_dir, IMAGES)), -1).numpy()
    np.testing.assert_allclose(classifier.probabilities(IMAGES), expected, atol=1e-6)


def build_convolutional(kind: str, target: Path) -> Path:
    """A tiny ConvNeXt or ResNet in Hugging Face format, with a 16x16 image processor."""
    from transformers import ConvNextConfig, ConvNextModel, ResNetConfig, ResNetModel
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    sizes = {"hidden_sizes": [8, 16], "depths": [1, 1]}
    if kind == "convnext":
        encoder: torch.nn.Module = ConvNextModel(ConvNextConfig(num_stages=2, **sizes))
    else:
        encoder = ResNetModel(ResNetConfig(embedding_size=8, **sizes))
    encoder.save_pretrained(target, safe_serialization=True)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(target)
    return target


@pytest.mark.parametrize("kind", ["convnext", "resnet"])
def test_convolutional_encoders_pool_their_last_stage_and_freeze_by_stage(
    kind: str, tmp_path: Path
) -> None:
    base = build_convolutional(kind, tmp_path / kind)
    check_task(Task.IMAGE_CLASSIFICATION, base)
    check_strategy(Strategy(kind="partial", frozen_layers=1), base)
    with pytest.raises(Exception, match="2 layers"):
        check_strategy(Strategy(kind="partial", frozen_layers=3), base)
    model = build_classifier(base, num_labels=3, dropout=0.0)
    apply_strategy(model, Strategy(kind="partial", frozen_layers=1))
    names = trainable(model)
    assert any(".stages.1." in n for n in names)
    assert not any(".stages.0." in n or "embed" in n for n in names)
    features = model.features(pixels(base, IMAGES))
    assert features.shape == (len(IMAGES), 16)
    folder = tmp_path / "version"
    save_classifier(model.eval(), base, ["0", "1", "2"], folder)
    assert Classifier(folder).probabilities(IMAGES).shape == (len(IMAGES), 3)
