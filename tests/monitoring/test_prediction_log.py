from __future__ import annotations

import time

from jobs.store import Store
from monitoring.prediction_log import PredictionLog


class CountingMetrics:
    """Stands in for the metrics recorder, which ships events to a Ray actor; here only the
    counts matter."""

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def inc(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        self.counts[name] = self.counts.get(name, 0) + value


def answers(count: int, prefix: str = "p") -> list[tuple[str, str, str, dict[str, float]]]:
    return [(f"{prefix}{i}", f"text {i}", "1", {"0": 0.2, "1": 0.8}) for i in range(count)]


def test_logged_predictions_reach_the_store(local_store: Store) -> None:
    log = PredictionLog(local_store, CountingMetrics(), flush_seconds=0.05)
    log.record("reviews", 1, answers(25), sample_rate=1.0)
    deadline = time.monotonic() + 10
    while (
        time.monotonic() < deadline
        and len(local_store.recent_predictions("reviews", 1, limit=100)) < 25
    ):
        time.sleep(0.05)
    rows = local_store.recent_predictions("reviews", 1, limit=100)
    assert len(rows) == 25 and rows[0].probabilities == {"0": 0.2, "1": 0.8}


def test_full_queue_drops_and_counts_instead_of_blocking(local_store: Store) -> None:
    metrics = CountingMetrics()
    log = PredictionLog(local_store, metrics, capacity=10, flush_seconds=60)
    started = time.perf_counter()
    log.record("reviews", 1, answers(1000), sample_rate=1.0)
    assert time.perf_counter() - started < 1.0
    assert metrics.counts["tuneloop_prediction_log_dropped_total"] >= 989


def test_sampling_keeps_about_the_configured_share(local_store: Store) -> None:
    log = PredictionLog(local_store, CountingMetrics(), capacity=100_000, flush_seconds=60)
    log.record("reviews", 1, answers(5000), sample_rate=0.1)
    assert 350 < log.rows.qsize() < 650
