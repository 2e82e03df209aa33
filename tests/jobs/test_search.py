from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

from jobs.errors import SpecInvalid
from jobs.search import (
    check_search,
    corners,
    end_failed_trial,
    search_metric,
    trial_spec,
    tune_space,
)
from jobs.settings import Settings
from jobs.spec import ImageAugmentation, JobSpec, WordDropout, parse_spec
from jobs.store import Job, JobStatus, Store, TrialState, new_id

MINIMAL = {"model_name": "reviews", "data": {"path": "amazon.csv"}}
SEARCH = {"space": {"hyperparameters.head_lr": {"loguniform": [1e-4, 1e-2]}}, "trials": 4}


def with_search(search: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {**MINIMAL, **spec, "search": {**SEARCH, **search}}


def refusal(document: dict[str, Any]) -> SpecInvalid:
    with pytest.raises(SpecInvalid) as caught:
        parse_spec(document)
    return caught.value


def test_a_search_block_takes_its_defaults() -> None:
    search = parse_spec(with_search({})).search
    assert search is not None
    assert (search.searcher, search.scheduler, search.max_concurrent) == ("random", "asha", 1)
    assert search.time_limit_seconds is None and search.metric is None


@pytest.mark.parametrize(
    ("search", "field", "quoted"),
    [
        ({"trials": None}, "search.trials", "trials"),
        ({"trials": 0}, "search.trials", "greater than or equal to 1"),
        ({"space": {}}, "search.space", "at least 1 item"),
        ({"space": {"data.path": {"choice": ["a.csv"]}}}, "search.space", "'data.path'"),
        (
            {"space": {"hyperparameters.head_lr": {"uniform": [0.1, 0.01]}}},
            "search.space.hyperparameters.head_lr",
            "[0.1, 0.01]",
        ),
        (
            {"space": {"hyperparameters.head_lr": {"loguniform": [0, 0.01]}}},
            "search.space.hyperparameters.head_lr",
            "above 0",
        ),
        (
            {"space": {"hyperparameters.batch_size": {"choice": [8], "randint": [8, 64]}}},
            "search.space.hyperparameters.batch_size",
            "exactly one of",
        ),
        (
            {"space": {"hyperparameters.epochs": {"normal": [3, 1]}}},
            "search.space.hyperparameters.epochs.normal",
            "unknown field",
        ),
        (
            {"space": {"strategy.kind": {"grid": ["partial", "full"]}}, "searcher": "optuna"},
            "search.searcher",
            "strategy.kind",
        ),
        (
            {"space": {"strategy.kind": {"grid": ["partial", "full"]}}, "trials": 3},
            "search.trials",
            "multiple of 2",
        ),
        ({"scheduler": "hyperband"}, "search.scheduler", "'asha'"),
        ({"max_concurrent": 0}, "search.max_concurrent", "greater than or equal to 1"),
        ({"time_limit_seconds": -5}, "search.time_limit_seconds", "greater than 0"),
    ],
)
def test_an_invalid_search_is_refused_with_the_field_named(
    search: dict[str, Any], field: str, quoted: str
) -> None:
    document = with_search(search)
    document["search"] = {k: v for k, v in document["search"].items() if v is not None}
    error = refusal(document)
    assert error.field == field
    assert quoted in error.message and field in error.message


@pytest.fixture
def limits() -> Settings:
    return Settings(max_trials=8, max_concurrent_trials=2)


@pytest.mark.parametrize(
    ("search", "field", "quoted"),
    [
        ({"trials": 9}, "search.trials", "give 1 to 8"),
        ({"max_concurrent": 3}, "search.max_concurrent", "at most 2 trials"),
        (
            {
                "space": {
                    "hyperparameters.batch_size": {"grid": [8, 16, 32]},
                    "hyperparameters.epochs": {"grid": [1, 2, 3]},
                },
                "trials": 9,
            },
            "search.space",
            "grid has 9 points",
        ),
    ],
)
def test_a_search_over_the_configured_limits_is_refused(
    limits: Settings,
    tiny_model_dir: Path,
    search: dict[str, Any],
    field: str,
    quoted: str,
) -> None:
    spec = parse_spec(with_search(search))
    with pytest.raises(SpecInvalid) as caught:
        check_search(spec, limits, tiny_model_dir)
    assert caught.value.field == field
    assert quoted in caught.value.message


def test_a_space_that_lets_the_encoder_outrun_the_head_is_refused(
    limits: Settings, tiny_model_dir: Path
) -> None:
    spec = parse_spec(
        with_search(
            {
                "space": {
                    "hyperparameters.encoder_lr": {"loguniform": [1e-5, 1e-3]},
                    "hyperparameters.head_lr": {"loguniform": [1e-4, 1e-2]},
                }
            }
        )
    )
    with pytest.raises(SpecInvalid) as caught:
        check_search(spec, limits, tiny_model_dir)
    assert caught.value.field == "search.space.hyperparameters.encoder_lr"
    assert "hyperparameters.encoder_lr=0.001 and hyperparameters.head_lr=0.0001" in (
        caught.value.message
    )


def test_freezing_more_layers_than_the_model_has_is_refused(
    limits: Settings, tiny_model_dir: Path
) -> None:
    spec = parse_spec(with_search({"space": {"strategy.frozen_layers": {"randint": [0, 3]}}}))
    with pytest.raises(SpecInvalid) as caught:
        check_search(spec, limits, tiny_model_dir)
    assert caught.value.field == "search.space.strategy.frozen_layers"
    assert "strategy.frozen_layers=3" in caught.value.message
    assert "2 layers" in caught.value.message


def test_a_grace_longer_than_any_trial_is_refused(limits: Settings, tiny_model_dir: Path) -> None:
    spec = parse_spec(
        with_search({"space": {"hyperparameters.epochs": {"choice": [2, 4]}}, "grace_epochs": 5})
    )
    with pytest.raises(SpecInvalid) as caught:
        check_search(spec, limits, tiny_model_dir)
    assert caught.value.field == "search.grace_epochs"
    assert "at most 4 epochs" in caught.value.message


def test_corners_cover_each_bound_and_every_pair() -> None:
    spec = parse_spec(
        with_search(
            {
                "space": {
                    "hyperparameters.head_lr": {"uniform": [0.001, 0.01]},
                    "strategy.kind": {"choice": ["partial", "full", "feature_extraction"]},
                    "hyperparameters.batch_size": {"choice": [64, 8, 16]},
                }
            }
        )
    )
    assert spec.search is not None
    found = list(corners(spec.search.space))
    assert {"hyperparameters.batch_size": 8} in found
    assert {"hyperparameters.batch_size": 16} not in found
    assert {"hyperparameters.head_lr": 0.01, "strategy.kind": "full"} in found
    assert len(found) == (2 + 2 + 3) + (2 * 2 + 2 * 3 + 2 * 3)


def test_space_becomes_tune_distributions_with_the_same_bounds() -> None:
    spec = parse_spec(
        with_search(
            {
                "space": {
                    "hyperparameters.head_lr": {"loguniform": [1e-4, 1e-2]},
                    "hyperparameters.warmup_ratio": {"uniform": [0.0, 0.3]},
                    "strategy.frozen_layers": {"randint": [0, 2]},
                    "hyperparameters.augmentation": {"choice": [True, False]},
                    "strategy.kind": {"grid": ["partial", "full"]},
                },
                "trials": 4,
            }
        )
    )
    assert spec.search is not None
    space = tune_space(spec.search)

    head_lr = space["hyperparameters.head_lr"]
    assert isinstance(head_lr, Float) and isinstance(head_lr.get_sampler(), LogUniform)
    assert (head_lr.lower, head_lr.upper) == (1e-4, 1e-2)
    warmup = space["hyperparameters.warmup_ratio"]
    assert isinstance(warmup, Float) and (warmup.lower, warmup.upper) == (0.0, 0.3)
    assert isinstance(space["hyperparameters.augmentation"], Categorical)
    assert space["strategy.kind"] == {"grid_search": ["partial", "full"]}

    frozen = space["strategy.frozen_layers"]
    assert isinstance(frozen, Integer)
    assert set(frozen.sample(size=200, random_state=0)) == {0, 1, 2}  # both bounds included


def test_a_trial_spec_carries_the_trial_values_and_no_search() -> None:
    spec = parse_spec(
        with_search({"space": {"hyperparameters.augmentation": {"choice": [True, False]}}})
    )
    values = {"hyperparameters.head_lr": 0.005, "hyperparameters.augmentation": True}
    trial = trial_spec(spec, {**values, "strategy.frozen_layers": 1})
    assert trial.search is None
    assert trial.hyperparameters.head_lr == 0.005
    assert trial.hyperparameters.augmentation == WordDropout()
    assert trial.strategy.frozen_layers == 1
    off = trial_spec(spec, {"hyperparameters.augmentation": False})
    assert off.hyperparameters.augmentation is None


def test_augmentation_searched_for_images_turns_on_image_augmentation() -> None:
    spec = parse_spec(
        with_search(
            {"space": {"hyperparameters.augmentation": {"choice": [True, False]}}},
            task="image_classification",
            data={"path": "photos"},
        )
    )
    assert trial_spec(
        spec, {"hyperparameters.augmentation": True}
    ).hyperparameters.augmentation == (ImageAugmentation())


def test_a_pretraining_search_may_not_change_the_strategy() -> None:
    document = with_search(
        {"space": {"strategy.kind": {"choice": ["full", "partial"]}}},
        kind="pretraining",
        strategy={"kind": "full"},
    )
    assert refusal(document).field == "search"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, ("val_accuracy", "max")),
        ({"hyperparameters": {"early_stopping": {"metric": "val_loss"}}}, ("val_loss", "min")),
        ({"search_metric": "val_f1"}, ("val_f1", "max")),
    ],
)
def test_trials_are_compared_on_the_search_or_stopping_metric(
    spec: dict[str, Any], expected: tuple[str, str]
) -> None:
    metric = spec.pop("search_metric", None)
    document = with_search({"metric": metric} if metric else {}, **spec)
    assert search_metric(parse_spec(document)) == expected


def make_job(store: Store) -> Job:
    spec = JobSpec.model_validate(with_search({}))
    return store.create_job(
        Job(
            id=new_id("job"),
            model_name="reviews",
            spec=spec.to_document(),
            trigger="user",
            attempts=0,
            cancel_requested=False,
        )
    )


def epoch(number: int, accuracy: float) -> dict[str, float]:
    return {"epoch": float(number), "val_accuracy": accuracy}


def test_trials_keep_their_curves_and_exactly_one_leads(store: Store) -> None:
    job = make_job(store)
    for trial_id in ("t0", "t1"):
        store.start_trial(job.id, trial_id, {"hyperparameters.head_lr": 0.001})

    def record(trial_id: str, number: int, accuracy: float) -> None:
        store.record_trial_epoch(
            job.id,
            trial_id,
            epoch(number, accuracy),
            metric="val_accuracy",
            mode="max",
            checkpoint=f"/ckpt/{trial_id}/{number}",
        )

    record("t0", 1, 0.6)
    record("t1", 1, 0.7)
    record("t0", 2, 0.65)
    record("t1", 2, 0.7)  # the later of tied epochs is the checkpoint Train keeps
    record("t0", 3, 0.8)

    t0, t1 = store.list_trials(job.id)
    assert [row["epoch"] for row in t0.curve] == [1, 2, 3]
    assert (t0.best_metric, t0.best_epoch, t0.checkpoint) == (0.8, 3, "/ckpt/t0/3")
    assert (t1.best_metric, t1.best_epoch, t1.checkpoint) == (0.7, 2, "/ckpt/t1/2")
    assert (t0.is_best, t1.is_best) == (True, False)
    best = store.best_trial(job.id)
    assert best is not None and best.trial_id == "t0"


def test_a_trial_ends_once_and_the_first_ending_wins(store: Store) -> None:
    job = make_job(store)
    store.start_trial(job.id, "t0", {})
    assert store.finish_trial(job.id, "t0", TrialState.SUCCEEDED)
    assert not store.finish_trial(job.id, "t0", TrialState.STOPPED)
    store.start_trial(job.id, "t1", {})
    assert store.stop_running_trials(job.id) == 1
    assert [t.state for t in store.list_trials(job.id)] == ["SUCCEEDED", "STOPPED"]


def test_a_trial_that_fails_under_a_cancelled_job_was_stopped(store: Store) -> None:
    job = make_job(store)
    assert store.transition(job.id, JobStatus.RUNNING)
    store.start_trial(job.id, "broken", {})
    assert end_failed_trial(store, job.id, "broken", "ValueError: nan loss") == "FAILED"
    store.start_trial(job.id, "halted", {})
    store.request_cancel(job.id)
    assert end_failed_trial(store, job.id, "halted", "its Tune actor failed") == "STOPPED"
    broken, halted = store.list_trials(job.id)
    assert (broken.state, broken.error) == ("FAILED", "ValueError: nan loss")
    assert (halted.state, halted.error) == ("STOPPED", None)


def test_a_restarted_trial_keeps_its_curve_and_overwrites_repeated_epochs(store: Store) -> None:
    job = make_job(store)
    store.start_trial(job.id, "t0", {})
    store.record_trial_epoch(
        job.id, "t0", epoch(1, 0.5), metric="val_accuracy", mode="max", checkpoint=None
    )
    store.start_trial(job.id, "t0", {})
    store.record_trial_epoch(
        job.id, "t0", epoch(1, 0.6), metric="val_accuracy", mode="max", checkpoint=None
    )
    (trial,) = store.list_trials(job.id)
    assert trial.state == TrialState.RUNNING
    assert trial.curve == [epoch(1, 0.6)]


def test_the_winning_curve_replaces_the_job_epochs(store: Store) -> None:
    job = make_job(store)
    store.record_epoch(job.id, 1, {"val_accuracy": 0.1})
    store.record_epoch(job.id, 4, {"val_accuracy": 0.2})
    store.replace_epochs(job.id, [epoch(1, 0.7), epoch(2, 0.8)])
    assert [(e.epoch, e.metrics["val_accuracy"]) for e in store.epoch_metrics(job.id)] == [
        (1, 0.7),
        (2, 0.8),
    ]
