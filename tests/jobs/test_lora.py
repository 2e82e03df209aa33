"""LoRA on the tiny BERT: what trains, what a checkpoint and a version keep, how versions load."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from jobs.errors import ModelUnavailable, SpecInvalid
from jobs.inference import BasePool, Classifier
from jobs.lora import ADAPTER_WEIGHTS
from jobs.model import (
    ADAPTER_DIR,
    TransferClassifier,
    apply_strategy,
    build_classifier,
    check_strategy,
    load_state,
    parameter_groups,
    save_lora_classifier,
    save_state,
)
from jobs.registry import Registry
from jobs.search import check_search
from jobs.settings import Settings
from jobs.spec import JobSpec, StrategyKind, parse_spec
from jobs.store import Store

# The tiny BERT: 2 layers 32 wide; query and value are 32 x 32, the head 32 x 2.
ADAPTERS_PER_LAYER = 2 * (8 * 32 + 32 * 8)
HEAD = 32 * 2 + 2
TEXTS = ["great phone", "it broke after a day", "the battery is fine", "awful sound"]


def lora_spec(**strategy: Any) -> JobSpec:
    return parse_spec(
        {
            "model_name": "tiny",
            "data": {"path": "reviews.csv"},
            "strategy": {"kind": "lora", **strategy},
            "hyperparameters": {"encoder_lr": 5e-4, "head_lr": 5e-3},
        }
    )


def lora_model(base_dir: Path, seed: int = 0, **strategy: Any) -> TransferClassifier:
    """A LoRA classifier whose adapters do something: peft starts them at zero."""
    torch.manual_seed(seed)
    model = build_classifier(base_dir, num_labels=2, dropout=0.0)
    apply_strategy(model, lora_spec(**strategy).strategy)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return model.eval()


@torch.inference_mode()
def probabilities(model: TransferClassifier, classifier: Classifier) -> torch.Tensor:
    encoded = classifier.processor(TEXTS, padding=True, truncation=True, return_tensors="pt")
    return torch.softmax(model(encoded["input_ids"], encoded["attention_mask"]), dim=-1)


def save_version(model: TransferClassifier, base_dir: Path, target: Path) -> Path:
    save_lora_classifier(model, base_dir, str(base_dir), ["0", "1"], target)
    return target


def test_lora_spec_defaults_suit_bert_like_encoders() -> None:
    strategy = lora_spec().strategy
    assert strategy.kind is StrategyKind.LORA
    assert (strategy.rank, strategy.alpha, strategy.dropout) == (8, 16, 0.05)
    assert strategy.target_modules == ["query", "value"]


@pytest.mark.parametrize(
    ("strategy", "field"),
    [
        ({"rank": 0}, "strategy.rank"),
        ({"rank": 1024}, "strategy.rank"),
        ({"alpha": 0}, "strategy.alpha"),
        ({"dropout": 1.0}, "strategy.dropout"),
        ({"target_modules": []}, "strategy.target_modules"),
        ({"target_modules": ["query", "v; rm -rf"]}, "strategy.target_modules.1"),
    ],
)
def test_lora_fields_out_of_range_are_refused_by_name(strategy: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecInvalid) as caught:
        lora_spec(**strategy)
    assert caught.value.field == field


def test_target_modules_the_base_lacks_are_refused_with_the_names_it_has(
    tiny_model_dir: Path,
) -> None:
    with pytest.raises(SpecInvalid) as caught:
        check_strategy(lora_spec(target_modules=["query", "q_proj"]).strategy, tiny_model_dir)
    assert caught.value.field == "strategy.target_modules"
    assert "'q_proj'" in caught.value.message
    assert "dense, key, query, value" in caught.value.message


def test_a_rank_above_the_targeted_layers_width_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(SpecInvalid) as caught:
        check_strategy(lora_spec(rank=64).strategy, tiny_model_dir)
    assert caught.value.field == "strategy.rank"
    assert "give 1 to 32" in caught.value.message


def test_dotted_target_endings_are_accepted(tiny_model_dir: Path) -> None:
    check_strategy(lora_spec(target_modules=["attention.output.dense"]).strategy, tiny_model_dir)


def test_a_search_over_ranks_the_base_cannot_hold_is_refused(
    settings: Settings, tiny_model_dir: Path
) -> None:
    document = lora_spec().to_document()
    document["search"] = {"space": {"strategy.rank": {"choice": [4, 64]}}, "trials": 2}
    with pytest.raises(SpecInvalid) as caught:
        check_search(parse_spec(document), settings, tiny_model_dir)
    assert caught.value.field == "search.space.strategy.rank"
    assert "strategy.rank=64" in caught.value.message


def test_only_the_adapters_and_the_head_train(tiny_model_dir: Path) -> None:
    model = lora_model(tiny_model_dir)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == (
        2 * ADAPTERS_PER_LAYER + HEAD
    )
    assert all("lora_" in name or name.startswith("head.") for name in trainable)
    assert not any("pooler" in name or ".key." in name for name in trainable)


def test_adapters_learn_at_encoder_lr_and_the_head_at_head_lr(tiny_model_dir: Path) -> None:
    model = lora_model(tiny_model_dir)
    hp = lora_spec().hyperparameters
    by_lr: dict[float, set[int]] = {}
    for group in parameter_groups(model, hp):
        by_lr.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    adapters = {id(p) for name, p in model.named_parameters() if "lora_" in name}
    assert by_lr == {hp.encoder_lr: adapters, hp.head_lr: {id(p) for p in model.head.parameters()}}


def test_a_checkpoint_keeps_the_adapters_and_head_and_restores_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    trained = lora_model(tiny_model_dir, seed=1)
    save_state(trained, tmp_path / "model.safetensors")
    restored = lora_model(tiny_model_dir, seed=2)
    load_state(restored, tmp_path / "model.safetensors")

    ids = torch.randint(0, 1000, (3, 12))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        assert torch.equal(trained(ids, mask), restored(ids, mask))
    assert (tmp_path / "model.safetensors").stat().st_size < 100_000  # no frozen base inside


def test_a_checkpoint_of_other_adapters_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    save_state(lora_model(tiny_model_dir, target_modules=["key"]), tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="does not fit this LoRA model"):
        load_state(lora_model(tiny_model_dir), tmp_path / "model.safetensors")


def test_a_lora_version_holds_adapters_and_head_and_loads_to_identical_logits(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = lora_model(tiny_model_dir)
    folder = save_version(model, tiny_model_dir, tmp_path / "v1")
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "head.safetensors",
        "labels.json",
        "base.json",
    }
    classifier = Classifier(folder, bases=BasePool())
    expected = probabilities(model, classifier)
    assert torch.equal(torch.from_numpy(classifier.probabilities(TEXTS)), expected)


def test_the_registry_stores_a_lora_version_and_reports_its_footprint(
    tiny_model_dir: Path, settings: Settings, local_store: Store, tmp_path: Path
) -> None:
    model = lora_model(tiny_model_dir)
    save_state(model, tmp_path / "model.safetensors")
    registry = Registry(settings, local_store)
    version = registry.register(
        job_id="job-lora",
        spec=lora_spec().model_copy(update={"base_model": str(tiny_model_dir)}),
        base_dir=tiny_model_dir,
        weights=tmp_path / "model.safetensors",
        label_names=["0", "1"],
        metrics={"val_accuracy": 0.5},
        dataset_hash="0" * 64,
    )
    folder = registry.folder(version)
    footprint = registry.footprint(version)
    assert footprint["trainable_parameters"] == 2 * ADAPTERS_PER_LAYER + HEAD
    assert footprint["adapter_bytes"] == sum(
        p.stat().st_size for p in (folder / "adapter").iterdir()
    )
    assert not (folder / "encoder").exists()
    classifier = Classifier(folder, bases=BasePool())
    assert torch.equal(
        torch.from_numpy(classifier.probabilities(TEXTS)), probabilities(model, classifier)
    )


def test_two_lora_versions_of_one_base_share_its_weights(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    first, second = lora_model(tiny_model_dir, seed=1), lora_model(tiny_model_dir, seed=2)
    pool = BasePool()
    a = Classifier(save_version(first, tiny_model_dir, tmp_path / "a"), bases=pool)
    b = Classifier(save_version(second, tiny_model_dir, tmp_path / "b"), bases=pool)

    def embedding_storage(classifier: Classifier) -> int:
        parameters = dict(classifier.model.named_parameters())
        key = next(name for name in parameters if name.endswith("word_embeddings.weight"))
        return parameters[key].data_ptr()

    assert embedding_storage(a) == embedding_storage(b)
    # Interleaved calls: each answers with its own adapters, whichever ran last.
    for classifier, model in ((a, first), (b, second), (a, first)):
        expected = probabilities(model, classifier)
        assert torch.allclose(torch.from_numpy(classifier.probabilities(TEXTS)), expected)
    assert not torch.allclose(probabilities(first, a), probabilities(second, b))


def test_a_dropped_version_takes_its_adapters_off_the_shared_base(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = lora_model(tiny_model_dir)
    pool = BasePool()
    kept = Classifier(save_version(model, tiny_model_dir, tmp_path / "kept"), bases=pool)
    dropped = Classifier(save_version(model, tiny_model_dir, tmp_path / "dropped"), bases=pool)
    peft = kept.model.encoder
    assert len(peft.peft_config) == 2
    del dropped
    gc.collect()
    kept.probabilities(TEXTS)
    assert len(peft.peft_config) == 1


def test_a_version_whose_base_changed_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = Path(shutil.copytree(tiny_model_dir, tmp_path / "base"))
    folder = save_version(lora_model(base), base, tmp_path / "v1")
    config = (base / "config.json").read_text()
    (base / "config.json").write_text(
        config.replace('"hidden_act": "gelu"', '"hidden_act": "relu"')
    )
    with pytest.raises(ModelUnavailable) as caught:
        Classifier(folder, bases=BasePool())
    assert caught.value.field == "base_model"
    assert "fingerprint" in caught.value.message and str(base) in caught.value.message


def test_adapters_saved_as_pickles_are_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = save_version(lora_model(tiny_model_dir), tiny_model_dir, tmp_path / "v1")
    adapter = folder / ADAPTER_DIR
    weights = load_file(str(adapter / ADAPTER_WEIGHTS))
    (adapter / ADAPTER_WEIGHTS).unlink()
    torch.save(weights, adapter / "adapter_model.bin")  # what peft would otherwise unpickle
    with pytest.raises(ModelUnavailable) as caught:
        Classifier(folder, bases=BasePool())
    assert caught.value.field == "base_model"
    assert "adapter_model.safetensors" in caught.value.message
    assert "safetensors only" in caught.value.message
