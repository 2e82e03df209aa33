"""The prediction log: what served models were asked and answered, written off the hot path.

``record`` only puts rows on a bounded queue; a background thread writes them to the store in
batches. A full queue, or a database that refuses a batch, drops rows and counts them in
tuneloop_prediction_log_dropped_total: the log may lose rows, a prediction never waits or fails.

An image prediction is logged with the model's embedding of the image, for the drift monitor,
and the image itself is written under the data root (``traffic/MODEL/DIGEST.png``, one file per
distinct image), so that labelled feedback on it can become training data for a retraining job.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from jobs.store import Prediction, Store, utcnow

log = logging.getLogger(__name__)

BATCH_ROWS = 500
IMAGE_PREFIX = "image:"


class PredictionLog:
    def __init__(
        self,
        store: Store,
        metrics: Any,
        *,
        capacity: int = 10_000,
        flush_seconds: float = 0.5,
        data_root: Path | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.flush_seconds = flush_seconds
        self.data_root = data_root
        self.rows: queue.Queue[tuple[Prediction, Image.Image | None]] = queue.Queue(
            maxsize=capacity
        )
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
        embeddings: list[bytes] | None = None,
        images: list[Image.Image] | None = None,
    ) -> None:
        """Queue (prediction id, text, label, probabilities) rows, keeping ``sample_rate``.

        For image models ``embeddings`` and ``images`` hold one entry per row, and each row's
        text is ``image:`` and the path its image is written to under the data root.
        """
        if model not in self._models_seen:
            # The series exists at 0 from the first prediction, so increase() sees a first drop.
            self._models_seen.add(model)
            self.metrics.inc("tuneloop_prediction_log_dropped_total", {"model": model}, 0)
        now = utcnow()
        dropped = 0
        for index, (prediction_id, text, label, probabilities) in enumerate(answers):
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
                embedding=None if embeddings is None else embeddings[index],
            )
            try:
                self.rows.put_nowait((row, None if images is None else images[index]))
            except queue.Full:
                dropped += 1
        if dropped:
            self.metrics.inc("tuneloop_prediction_log_dropped_total", {"model": model}, dropped)

    def flush(self) -> int:
        """Write what is queued now; returns the number of rows written."""
        batch: list[Prediction] = []
        while len(batch) < BATCH_ROWS:
            try:
                row, image = self.rows.get_nowait()
            except queue.Empty:
                break
            batch.append(row)
            if image is not None:
                self._keep_image(row.text, image)
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

    def _keep_image(self, text: str, image: Image.Image) -> None:
        if self.data_root is None:
            return
        target = self.data_root / text.removeprefix(IMAGE_PREFIX)
        if target.exists():
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
            image.save(partial, format="PNG")
            os.replace(partial, target)
        except OSError:
            log.warning("prediction log: could not keep the image %s", target, exc_info=True)

    def _write_forever(self) -> None:
        while True:
            if self.flush() < BATCH_ROWS:
                threading.Event().wait(self.flush_seconds)
