from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from jobs.errors import SpecInvalid
from jobs.spec import StrategyKind, load_spec_text, parse_spec

MINIMAL = {"model_name": "reviews", "data": {"path": "amazon.csv"}}


def test_minimal_spec_takes_the_defaults() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.base_model == "builtin:minilm"
    assert spec.strategy.kind is StrategyKind.PARTIAL
    assert spec.hyperparameters.encoder_lr < spec.hyperparameters.head_lr
    assert spec.hyperparameters.augmentation is None


def test_yaml_and_json_give_the_same_spec() -> None:
    yaml_text = "model_name: reviews\ndata:\n  path: amazon.csv\nstrategy:\n  kind: full\n"
    json_text = (
        '{"model_name": "reviews", "data": {"path": "amazon.csv"}, "strategy": {"kind": "full"}}'
    )
    assert load_spec_text(yaml_text) == load_spec_text(json_text)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hyperparameters": {"epochs": 0}}, "hyperparameters.epochs"),
        ({"strategy": {"kind": "lora-ish"}}, "strategy.kind"),
        ({"data": {"path": "a.csv", "colour": "red"}}, "data.colour"),
        ({"entrypoint": "python evil.py"}, "entrypoint"),
        ({"runtime_env": {"pip": ["evil"]}}, "runtime_env"),
        ({"model_name": "Not Valid!"}, "model_name"),
        ({"resources": {"workers": 0}}, "resources.workers"),
        ({"resources": {"gpus_per_worker": 2}}, "resources.gpus_per_worker"),
    ],
)
def test_invalid_field_is_named(change: dict[str, object], field: str) -> None:
    with pytest.raises(SpecInvalid) as caught:
        parse_spec({**MINIMAL, **change})
    assert caught.value.field == field
    assert field in caught.value.message


def test_encoder_learning_faster_than_head_is_refused() -> None:
    with pytest.raises(SpecInvalid, match="encoder_lr"):
        parse_spec({**MINIMAL, "hyperparameters": {"encoder_lr": 1e-2, "head_lr": 1e-3}})


def test_data_needs_exactly_one_source() -> None:
    with pytest.raises(SpecInvalid, match="exactly one"):
        parse_spec({**MINIMAL, "data": {"path": "a.csv", "dataset": "ds-1"}})
    with pytest.raises(SpecInvalid, match="exactly one"):
        parse_spec({**MINIMAL, "data": {}})


@pytest.mark.parametrize(
    "reference",
    ["hub:org/model", "org/model", "relative/dir", "hub:x@y", "model:Big", "model:base@0"],
)
def test_base_model_reference_forms_are_checked(reference: str) -> None:
    with pytest.raises(SpecInvalid) as caught:
        parse_spec({**MINIMAL, "base_model": reference})
    assert caught.value.field == "base_model"


def test_registered_versions_are_base_models() -> None:
    assert parse_spec({**MINIMAL, "base_model": "model:digits-base"}).base_model == (
        "model:digits-base"
    )
    assert parse_spec({**MINIMAL, "base_model": "model:digits-base@3"}).base_model.endswith("@3")


@pytest.mark.parametrize(
    ("task", "augmentation", "wanted"),
    [
        ("text_classification", {"kind": "image"}, "word_dropout"),
        ("image_classification", {"kind": "word_dropout"}, "image"),
        ("image_classification", {}, "image"),
    ],
)
def test_augmentation_must_suit_the_task(
    task: str, augmentation: dict[str, Any], wanted: str
) -> None:
    with pytest.raises(SpecInvalid) as caught:
        parse_spec({**MINIMAL, "task": task, "hyperparameters": {"augmentation": augmentation}})
    assert caught.value.field == "hyperparameters" and f"give kind {wanted!r}" in str(caught.value)


def test_image_augmentation_crop_scale_must_lie_within_the_image() -> None:
    with pytest.raises(SpecInvalid) as caught:
        parse_spec(
            {
                **MINIMAL,
                "task": "image_classification",
                "hyperparameters": {"augmentation": {"kind": "image", "crop_scale": [0.5, 1.5]}},
            }
        )
    assert "crop_scale" in (caught.value.field or "") and "0 < low <= high <= 1" in str(
        caught.value
    )


def test_hub_reference_with_pinned_revision_is_accepted() -> None:
    spec = parse_spec({**MINIMAL, "base_model": "hub:sentence-transformers/all-MiniLM-L6-v2@main"})
    assert spec.base_model.startswith("hub:")


def test_yaml_is_read_safely() -> None:
    with pytest.raises(SpecInvalid, match="not valid JSON or YAML"):
        load_spec_text("model_name: !!python/object/apply:os.system ['true']\n")


def test_spec_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(SpecInvalid, match="mapping"):
        load_spec_text("- a\n- b\n")


BILLION_LAUGHS = "\n".join(
    [
        "model_name: reviews",
        "data: {path: amazon.csv}",
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(
            f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]"
            for i in range(8)
        ),
    ]
)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (BILLION_LAUGHS, "aliases (*name) are not allowed"),
        ("model_name: reviews\ndata: &d {path: amazon.csv}\nx: *d\n", "aliases"),
        ("model_name: " + "[" * 20_000, "nested deeper than 16 levels"),
        ("- " * 1_000 + "x\n", "nested deeper than 16 levels"),
        ('{"model_name": ' + "[" * 60_000, "nested deeper than 16 levels"),
    ],
    ids=["billion-laughs", "one-alias", "flow-nesting", "block-nesting", "json-nesting"],
)
def test_yaml_bombs_are_refused_quickly(text: str, reason: str) -> None:
    started = time.perf_counter()
    with pytest.raises(SpecInvalid, match=re.escape(reason)):
        load_spec_text(text)
    assert time.perf_counter() - started < 10


def test_a_decoded_document_nested_too_deep_names_where(tmp_path: Path) -> None:
    deep: object = "x"
    for _ in range(40):
        deep = {"k": deep}
    with pytest.raises(SpecInvalid) as caught:
        parse_spec({**MINIMAL, "data": {"path": "a.csv", "format": deep}})
    assert caught.value.field == "data.format" + ".k" * 14
    assert "nested deeper than 16 levels" in caught.value.message


CODE_FIELDS = ["entrypoint", "runtime_env", "trust_remote_code", "pip", "working_dir"]


@pytest.mark.parametrize("name", CODE_FIELDS)
@pytest.mark.parametrize(
    "where", ["", "data", "strategy", "hyperparameters", "resources", "serving", "monitoring"]
)
def test_no_spec_field_can_name_code(where: str, name: str) -> None:
    document: dict[str, Any] = {**MINIMAL, "data": dict(MINIMAL["data"])}  # type: ignore[arg-type]
    (document.setdefault(where, {}) if where else document)[name] = {"pip": ["x"]}
    with pytest.raises(SpecInvalid) as caught:
        parse_spec(document)
    assert caught.value.field == f"{where}.{name}".lstrip(".")
    assert caught.value.message.endswith("unknown field; remove it or check its spelling")
