from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from jobs.spec import RetrainPolicy
from monitoring.policy import decide_retrain

NOW = datetime(2026, 12, 1, 12, 0, 0)


def decide(**changes: Any) -> Any:
    arguments: dict[str, Any] = {
        "policy": RetrainPolicy(min_window=100, cooldown_seconds=600),
        "drift_detected": True,
        "accuracy_dropped": False,
        "window_size": 200,
        "labelled_rows": 100,
        "in_flight": False,
        "last_retrain_at": None,
        "now": NOW,
        "min_labelled": 30,
    }
    return decide_retrain(**{**arguments, **changes})


def test_drift_with_enough_traffic_and_labels_retrains() -> None:
    decision = decide()
    assert decision.retrain and "drift detected" in decision.reason


def test_accuracy_drop_alone_retrains() -> None:
    assert decide(drift_detected=False, accuracy_dropped=True).retrain


def test_no_trigger_no_retrain() -> None:
    assert not decide(drift_detected=False).retrain


def test_window_under_the_minimum_waits() -> None:
    decision = decide(window_size=99)
    assert not decision.retrain and "minimum of 100" in decision.reason


def test_cooldown_holds_back_a_second_retrain() -> None:
    recent = decide(last_retrain_at=NOW - timedelta(seconds=300))
    assert not recent.retrain and "cooling down" in recent.reason
    assert decide(last_retrain_at=NOW - timedelta(seconds=601)).retrain


def test_one_retrain_in_flight_per_model() -> None:
    decision = decide(in_flight=True)
    assert not decision.retrain and "already queued or running" in decision.reason


def test_retrain_needs_labelled_rows_to_learn_from() -> None:
    decision = decide(labelled_rows=10)
    assert not decision.retrain and "needs 30" in decision.reason


def test_disabled_policy_never_retrains() -> None:
    assert not decide(policy=RetrainPolicy(enabled=False)).retrain
