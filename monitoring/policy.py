"""The retrain policy: whether a drift check's outcome starts a retraining job."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from jobs.spec import RetrainPolicy


@dataclass(frozen=True)
class RetrainDecision:
    retrain: bool
    reason: str


def decide_retrain(
    *,
    policy: RetrainPolicy,
    drift_detected: bool,
    accuracy_dropped: bool,
    window_size: int,
    labelled_rows: int,
    in_flight: bool,
    last_retrain_at: datetime | None,
    now: datetime,
    min_labelled: int,
) -> RetrainDecision:
    """Apply the policy's conditions in order; the first that fails says why not.

    The drift verdict arrives already corrected for the number of checks (Holm), so one
    verdict is one trigger however many checks fired.
    """
    if not policy.enabled:
        return RetrainDecision(False, "retraining is disabled for this model")
    if not (drift_detected or accuracy_dropped):
        return RetrainDecision(False, "no drift and no accuracy drop")
    if window_size < policy.min_window:
        return RetrainDecision(
            False,
            f"window of {window_size} predictions is under the minimum of {policy.min_window}",
        )
    if in_flight:
        return RetrainDecision(
            False, "a retraining job for this model is already queued or running"
        )
    if last_retrain_at is not None:
        waited = (now - last_retrain_at).total_seconds()
        if waited < policy.cooldown_seconds:
            return RetrainDecision(
                False,
                f"cooling down: last retrain {waited:.0f}s ago, "
                f"cooldown {policy.cooldown_seconds:.0f}s",
            )
    if labelled_rows < min_labelled:
        return RetrainDecision(
            False,
            f"{labelled_rows} labelled rows since the production "
            f"version; retraining needs {min_labelled}",
        )
    trigger = "drift detected" if drift_detected else "labelled accuracy dropped"
    return RetrainDecision(True, f"{trigger}; retraining with {labelled_rows} labelled rows")
