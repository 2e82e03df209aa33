from __future__ import annotations

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


@pytest.mark.parametrize("reference", ["hub:org/model", "org/model", "relative/dir", "hub:x@y"])
def test_base_model_reference_forms_are_checked(reference: str) -> None:
    with pytest.raises(SpecInvalid) as caught:
        parse_spec({**MINIMAL, "base_model": reference})
    assert caught.value.field == "base_model"


def test_hub_reference_with_pinned_revision_is_accepted() -> None:
    spec = parse_spec({**MINIMAL, "base_model": "hub:sentence-transformers/all-MiniLM-L6-v2@main"})
    assert spec.base_model.startswith("hub:")


def test_yaml_is_read_safely() -> None:
    with pytest.raises(SpecInvalid, match="not valid JSON or YAML"):
        load_spec_text("model_name: !!python/object/apply:os.system ['true']\n")


def test_spec_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(SpecInvalid, match="mapping"):
        load_spec_text("- a\n- b\n")
