"""The prediction log: what served models were asked and answered, written off the hot path.

``record`` only puts rows on a bounded queue; a background thread writes them to the store in
batches. A full queue, or a database that refuses a batch, drops rows and counts them in
tuneloop_prediction_log_dropped_total: the log may lose rows, a prediction never waits or fails.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from typing import Any

from jobs.store import Prediction, Store, utcnow

log = logging.getLogger(__name__)

BATCH_ROWS = 500


class PredictionLog:
    def __init__(
        self, store: Store, metrics: Any, *, capacity: int = 10_000, flush_seconds: float = 0.5
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.flush_seconds = flush_seconds
        self.rows: queue.Queue[Prediction] = queue.Queue(maxsize=capacity)
        self._random = random.Random()
        self._models_seen: set[str] = set()
        self._thread = threading.Thread(target=self._write_forever, daemon=True)
        self._thread.start()

    def record(
        self,
        model: str,
        version: int,
        answers: list[tuple[str, str, str, dict[str, float]]],
        sample_rate: float,
    ) -> None:
        """Queue (prediction id, text, label, probabilities) rows, keeping ``sample_rate``."""
        if model not in self._models_seen:
            # The series exists at 0 from the first prediction, so increase() sees a first drop.
            self._models_seen.add(model)
            self.metrics.inc("tuneloop_prediction_log_dropped_total", {"model": model}, 0)
        now = utcnow()
        dropped = 0
        for prediction_id, text, label, probabilities in answers:
            if sample_rate < 1.0 and self._random.random() >= sample_rate:
                continue
            row = Prediction(
                id=prediction_id,
                model_name=model,
                version=version,
                text=text,
                label=label,
                probabilities=probabilities,
                at=now,
            )
            try:
                self.rows.put_nowait(row)
            except queue.Full:
                dropped += 1
        if dropped:
            self.metrics.inc("tuneloop_prediction_log_dropped_total", {"model": model}, dropped)

    def flush(self) -> int:
        """Write what is queued now; returns the number of rows written."""
        batch: list[Prediction] = []
        while len(batch) < BATCH_ROWS:
            try:
                batch.append(self.rows.get_nowait())
            except queue.Empty:
                break
        if not batch:
            return 0
        try:
            self.store.add_predictions(batch)
        except Exception:  # the database may be briefly away; these rows are lost, not retried
            log.warning(
                "prediction log: dropped %d rows the database refused", len(batch), exc_info=True
            )
            for row in batch:
                self.metrics.inc("tuneloop_prediction_log_dropped_total", {"model": row.model_name})
            return 0
        return len(batch)

    def _write_forever(self) -> None:
        while True:
            if self.flush() < BATCH_ROWS:
                threading.Event().wait(self.flush_seconds)
