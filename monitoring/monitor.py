"""The monitor: checks each served model's recent traffic for drift and retrains when it must.

One actor for the cluster. On each model's schedule it compares the production version's recent
predictions with a reference (a sample of its training rows and the model's own predictions
on them), stores the verdict with its Evidently report, updates the drift gauges, and asks the
retrain policy whether to start a retraining job: the production spec, retrained on its data
plus the labelled feedback since, judged against the champion on recent labelled rows it never
trained on.

Texts are compared through MiniLM sentence embeddings, whatever model serves them, and their
lengths and vocabulary. Images are compared through the served model's own embeddings, which
the predictor logs with each image, and have no length or vocabulary checks.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray

from jobs.builtins import builtin_model_dir
from jobs.data import DataCatalog, LabelledRows
from jobs.errors import TuneloopError
from jobs.inference import Classifier
from jobs.registry import Registry
from jobs.settings import Settings
from jobs.spec import JobSpec, Task
from jobs.store import Dataset, DriftReport, ModelVersion, Store, new_id, utcnow
from jobs.submission import submit_job
from monitoring.drift import ALL_CHECKS, CheckName, DriftConfig, DriftResult, Window, check_drift
from monitoring.embeddings import TextEncoder
from monitoring.metrics import recorder
from monitoring.policy import RetrainDecision, decide_retrain
from monitoring.prediction_log import IMAGE_PREFIX

log = logging.getLogger(__name__)

MONITOR_NAME = "tuneloop-monitor"
NAMESPACE = "tuneloop"
MIN_LABELLED_FOR_RETRAIN = 30
MIN_CHALLENGE_ROWS = 20
IMAGE_CHECKS: tuple[CheckName, ...] = ("embedding", "predicted_label", "accuracy")


@dataclass(frozen=True)
class CheckOutcome:
    report: DriftReport
    result: DriftResult
    decision: RetrainDecision


class Monitor:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.registry = Registry(settings, store)
        self.catalog = DataCatalog(settings, store)
        self.metrics = recorder()
        self._encoder: TextEncoder | None = None
        self._references: dict[tuple[str, int], Window] = {}
        self._last_check: dict[str, float] = {}

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = TextEncoder(builtin_model_dir("minilm"))
        return self._encoder

    def reports_dir(self) -> Path:
        folder = self.settings.resolved_artifact_root() / "reports"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def tick(self) -> list[CheckOutcome]:
        """Check every model whose schedule says it is due."""
        outcomes = []
        for model in self.store.list_models():
            if model.production_version is None:
                continue
            version = self.store.get_version(model.name, model.production_version)
            spec = JobSpec.model_validate(version.spec)
            due = self._last_check.get(model.name, 0.0) + spec.monitoring.schedule_seconds
            if not spec.monitoring.enabled or time.monotonic() < due:
                continue
            self._last_check[model.name] = time.monotonic()
            try:
                outcome = self.check(version, spec)
            except TuneloopError as exc:
                log.warning("model %s: drift check skipped: %s", model.name, exc.message)
                continue
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def check(self, version: ModelVersion, spec: JobSpec) -> CheckOutcome | None:
        """One drift check of a version's recent traffic; None when the window is too small."""
        name, settings = version.model_name, spec.monitoring
        since = (
            utcnow() - timedelta(seconds=settings.window_seconds)
            if (settings.window_seconds)
            else None
        )
        logged = self.store.recent_predictions(
            name, version.version, limit=settings.window_size, since=since
        )
        if len(logged) < settings.retrain.min_window:
            log.debug(
                "model %s: %d predictions, waiting for %d",
                name,
                len(logged),
                settings.retrain.min_window,
            )
            return None

        images = spec.task is Task.IMAGE_CLASSIFICATION
        if images:
            logged = [p for p in logged if p.embedding is not None]
        labels = {pid: label for _, label, pid in self.store.labelled_feedback(name) if pid}
        texts = [p.text for p in logged]
        current = Window(
            texts=texts,
            embeddings=(
                np.stack([np.frombuffer(p.embedding or b"", dtype=np.float32) for p in logged])
                if images
                else self.encoder.encode(texts)
            ),
            predicted_labels=[p.label for p in logged],
            true_labels=[labels.get(p.id) for p in logged],
        )
        reference = self.reference(version, spec)
        config = DriftConfig(alpha=settings.alpha, checks=IMAGE_CHECKS if images else ALL_CHECKS)
        result = check_drift(reference, current, config, render_html=True)
        report = self.store_report(version, result)
        self.export_gauges(name, result)
        decision = self.apply_policy(version, spec, result, len(logged), report)
        log.info(
            "model %s v%d: drift %s (%s); %s",
            name,
            version.version,
            "DETECTED" if result.drift_detected else "not detected",
            ", ".join(result.detected_checks) or "no check fired",
            decision.reason,
        )
        return CheckOutcome(self.store.get_drift_report(report.id), result, decision)

    def reference(self, version: ModelVersion, spec: JobSpec) -> Window:
        """A sample of the version's training rows, embedded and predicted; cached per version."""
        key = (version.model_name, version.version)
        if key not in self._references:
            data = self.catalog.load(spec.data, seed=spec.hyperparameters.seed, task=spec.task)
            rows = sample_rows(data.train, spec.monitoring.reference_size, seed=0)
            classifier = Classifier(self.registry.folder(version))
            probabilities, features = classifier.forward(rows.texts)
            predicted = probabilities.argmax(-1)
            self._references[key] = Window(
                texts=rows.texts,
                embeddings=features
                if classifier.is_image_model
                else self.encoder.encode(rows.texts),
                predicted_labels=[classifier.label_names[i] for i in predicted],
                true_labels=list(rows.labels),
            )
        return self._references[key]

    def store_report(self, version: ModelVersion, result: DriftResult) -> DriftReport:
        report_id = new_id("drift")
        folder = self.reports_dir()
        (folder / f"{report_id}.json").write_text(json.dumps(result.report, default=str))
        (folder / f"{report_id}.html").write_text(result.html or "")
        checks = {
            c.name: {
                "score": c.score,
                "adjusted_p_value": c.adjusted_p_value,
                "detected": c.detected,
                "method": c.method,
                "skipped": c.skipped,
            }
            for c in result.checks
        }
        first = result.checks[0]
        return self.store.add_drift_report(
            DriftReport(
                id=report_id,
                model_name=version.model_name,
                version=version.version,
                drift_detected=result.drift_detected,
                checks=checks,
                reference_size=first.reference_size,
                current_size=first.current_size,
            )
        )

    def export_gauges(self, name: str, result: DriftResult) -> None:
        for check in result.checks:
            if check.skipped:
                continue
            labels = {"model": name, "check": check.name}
            self.metrics.set("tuneloop_drift_score", labels, check.score)
            self.metrics.set("tuneloop_drift_detected", labels, float(check.detected))
        self.metrics.set(
            "tuneloop_drift_last_check_timestamp_seconds", {"model": name}, time.time()
        )

    def apply_policy(
        self,
        version: ModelVersion,
        spec: JobSpec,
        result: DriftResult,
        window: int,
        report: DriftReport,
    ) -> RetrainDecision:
        name = version.model_name
        feedback = self.store.labelled_feedback(name, since=version.created_at)
        last = self.store.last_job(name, "retrain")
        accuracy = next((c for c in result.checks if c.name == "accuracy"), None)
        decision = decide_retrain(
            policy=spec.monitoring.retrain,
            drift_detected=result.drift_detected,
            accuracy_dropped=bool(accuracy and accuracy.detected),
            window_size=window,
            labelled_rows=len(feedback),
            in_flight=bool(self.store.jobs_in_flight(name, "retrain")),
            last_retrain_at=last.created_at if last else None,
            now=utcnow(),
            min_labelled=MIN_LABELLED_FOR_RETRAIN,
        )
        job_id = None
        if decision.retrain:
            job_id = self.start_retrain(version, spec, feedback, report.id)
        self.store.set_drift_decision(report.id, decision.reason, job_id)
        return decision

    def start_retrain(
        self,
        version: ModelVersion,
        spec: JobSpec,
        feedback: list[tuple[str, str, str | None]],
        report_id: str,
    ) -> str:
        """Queue the production spec on its data plus recent labels; returns the job id."""
        name = version.model_name
        images = spec.task is Task.IMAGE_CLASSIFICATION
        rows = [(self.table_path(t, images), y, p) for t, y, p in feedback]
        if images:  # labelled rows sent as text cannot train an image model
            rows = [row for row in rows if row[0] is not None]
        random.Random(report_id).shuffle(rows)
        held = max(MIN_CHALLENGE_ROWS, int(len(rows) * spec.monitoring.retrain.holdout_fraction))
        challenge, extra = rows[:held], rows[held:]
        data = self.catalog.load(spec.data, seed=spec.hyperparameters.seed, task=spec.task)
        column = "image" if images else "text"
        original = pd.DataFrame(
            {
                column: [
                    self.table_path(t, images) for t in data.train.texts + data.validation.texts
                ],
                "label": data.train.labels + data.validation.labels,
            }
        )
        learned = pd.DataFrame(
            {column: [t for t, _, _ in extra], "label": [y for _, y, _ in extra]}
        )
        train_set = self.save_dataset(pd.concat([original, learned]), f"{name}-{report_id}-train")
        judge_set = self.save_dataset(
            pd.DataFrame(
                {column: [t for t, _, _ in challenge], "label": [y for _, y, _ in challenge]}
            ),
            f"{name}-{report_id}-judge",
        )

        document = spec.to_document()
        document["data"] = {
            "dataset": train_set.id,
            f"{column}_column": column,
            "label_column": "label",
            "validation_split": spec.data.validation_split,
        }
        document["serving"] = {**document["serving"], "challenge_dataset": judge_set.id}
        job = submit_job(
            store=self.store,
            settings=self.settings,
            spec=JobSpec.model_validate(document),
            trigger="retrain",
            parent_version=version.version,
            idempotency_key=f"retrain-{name}-v{version.version}-{report_id}",
        )
        self.store.append_log(
            job.id,
            "INFO",
            f"started by drift report {report_id} on {name} "
            f"v{version.version}: {len(original)} original rows, "
            f"{len(learned)} labelled rows added, {len(challenge)} held out "
            "to judge the challenger",
        )
        self.metrics.inc("tuneloop_retrains_total", {"model": name})
        return job.id

    def table_path(self, item: str, images: bool) -> str | None:
        """A row's input as a retraining table holds it: the text itself, or an image's path
        relative to the table. Every upload's table lies at ``uploads/ID/``, so one relative
        path serves whatever id the table gets. None for a text row given to an image model."""
        if not images:
            return item
        root = self.settings.resolved_data_root()
        if item.startswith(IMAGE_PREFIX):
            path = root / item.removeprefix(IMAGE_PREFIX)
        elif Path(item).is_absolute():
            path = Path(item)
        else:
            return None
        return os.path.relpath(path, self.settings.uploads_dir() / "ID")

    def save_dataset(self, frame: pd.DataFrame, name: str) -> Dataset:
        relative = Path("retrain") / f"{name}.csv"
        path = self.settings.resolved_data_root() / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(path, index=False)
        with path.open("rb") as handle:
            return self.catalog.save_upload(handle, path.name, name=name)


def sample_rows(rows: LabelledRows, size: int, seed: int) -> LabelledRows:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    keep = sorted(order[:size])
    return LabelledRows([rows.texts[i] for i in keep], [rows.labels[i] for i in keep])


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=4)
class MonitorActor:
    """The monitor as one named, detached actor, checking on a loop in a thread."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from jobs.logs import configure_logging

        self.settings = Settings.model_validate(settings)
        configure_logging(self.settings)
        self.monitor = Monitor(
            self.settings, Store.open(self.settings.resolved_database_url(), upgrade=False)
        )
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                self.monitor.tick()
            except Exception:  # one failed round must not end monitoring
                log.exception("monitor round failed")
            time.sleep(self.settings.monitor_poll_seconds)

    def ping(self) -> bool:
        return self.thread.is_alive()


def ensure_monitor(settings: Settings) -> Any:
    return MonitorActor.options(
        name=MONITOR_NAME,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(settings.model_dump(mode="json"))
