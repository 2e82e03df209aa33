"""tuneloop's Prometheus metrics, every one of them, and how they cross process boundaries.

Two sources, both correct however many processes and nodes the cluster has:

- Job metrics are read from the store at scrape time (``JobsCollector``). The database is the
  truth about jobs, so the numbers survive restarts and agree with the API.
- Event metrics (predictions, drift checks, retrains) happen in Serve replicas and actors all
  over the cluster. Each process buffers its events in a ``Recorder`` and ships them in batches
  to one named actor, ``MetricsHub``, which owns the only registry for them. The API's
  ``/metrics`` asks the hub for its exposition and appends the job metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import ray
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from jobs.store import JobStatus, Store

log = logging.getLogger(__name__)

# The *_created series double every counter's output and no dashboard or rule reads them.
disable_created_metrics()

HUB_NAME = "tuneloop-metrics"
NAMESPACE = "tuneloop"
# Fine-tuning jobs take from seconds (a cached head) to hours (full fine-tuning on big data).
JOB_DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600)
# A batched forward pass of a small encoder on CPU takes milliseconds to a second.
PREDICTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

TRIGGERS = ("user", "retrain", "search")

Event = tuple[str, str, dict[str, str], float]  # (inc | observe | set, metric, labels, value)


def define_event_metrics(registry: CollectorRegistry) -> dict[str, Any]:
    """The metrics recorded by events; the names and labels are part of tuneloop's interface."""
    metrics = [
        Counter(
            "tuneloop_predictions_total",
            "Predictions answered, by model and outcome.",
            ["model", "outcome"],
            registry=registry,
        ),
        Histogram(
            "tuneloop_prediction_latency_seconds",
            "Time to answer a prediction request, batching included.",
            ["model"],
            buckets=PREDICTION_BUCKETS,
            registry=registry,
        ),
        Counter(
            "tuneloop_prediction_log_dropped_total",
            "Logged predictions dropped because the log queue was full.",
            ["model"],
            registry=registry,
        ),
        Gauge(
            "tuneloop_drift_score",
            "Latest drift score per model and check (a p-value: low means drift).",
            ["model", "check"],
            registry=registry,
        ),
        Gauge(
            "tuneloop_drift_detected",
            "1 when the latest check found drift.",
            ["model", "check"],
            registry=registry,
        ),
        Gauge(
            "tuneloop_drift_last_check_timestamp_seconds",
            "Unix time of the latest drift check.",
            ["model"],
            registry=registry,
        ),
        Counter(
            "tuneloop_retrains_total",
            "Retraining jobs triggered by the monitor.",
            ["model"],
            registry=registry,
        ),
    ]
    return {exposed_name(metric): metric for metric in metrics}


def exposed_name(metric: Any) -> str:
    """The name Prometheus sees: client_python keeps a counter's name without ``_total``."""
    return f"{metric._name}_total" if isinstance(metric, Counter) else str(metric._name)


class JobsCollector(Collector):
    """Job metrics computed from the store whenever Prometheus scrapes."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counts = self.store.count_jobs_by_status()
        jobs = GaugeMetricFamily("tuneloop_jobs", "Jobs by state.", labels=["state"])
        for state in JobStatus:
            jobs.add_metric([state.value], counts.get(state.value, 0))
        yield jobs

        finished = self.store.finished_jobs_summary()
        # Every series exists from the start at 0, so increase() sees the first failure.
        totals = {
            (state.value, trigger): 0
            for state in JobStatus
            if state.finished
            for trigger in TRIGGERS
        }
        durations: dict[str, list[float]] = {}
        for state, trigger, seconds in finished:
            totals[(state, trigger)] = totals.get((state, trigger), 0) + 1
            if seconds is not None:
                durations.setdefault(state, []).append(seconds)
        finished_total = CounterMetricFamily(
            "tuneloop_jobs_finished",
            "Jobs that reached a final state.",
            labels=["state", "trigger"],
        )
        for (state, trigger), count in sorted(totals.items()):
            finished_total.add_metric([state, trigger], count)
        yield finished_total
        yield duration_histogram(durations)

        promotions = CounterMetricFamily(
            "tuneloop_promotions",
            "Champion/challenger decisions of finished jobs.",
            labels=["model", "decision"],
        )
        decisions: dict[tuple[str, str], int] = {}
        for model, promoted in self.store.promotion_decisions():
            key = (model, "promoted" if promoted else "kept")
            decisions[key] = decisions.get(key, 0) + 1
        for (model, decision), count in sorted(decisions.items()):
            promotions.add_metric([model, decision], count)
        yield promotions

        epochs = CounterMetricFamily("tuneloop_epochs", "Training epochs completed.")
        epochs.add_metric([], self.store.count_epochs())
        yield epochs


def duration_histogram(durations: dict[str, list[float]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        "tuneloop_job_duration_seconds",
        "Wall time of finished jobs, from start to end.",
        labels=["state"],
    )
    for state, values in sorted(durations.items()):
        buckets = [(str(bound), sum(v <= bound for v in values)) for bound in JOB_DURATION_BUCKETS]
        buckets.append(("+Inf", len(values)))
        family.add_metric([state], buckets, sum(values))
    return family


@ray.remote(num_cpus=0, max_restarts=-1)
class MetricsHub:
    """The one registry of event metrics for the whole cluster."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = define_event_metrics(self.registry)

    def apply(self, events: list[Event]) -> None:
        apply_events(self.metrics, events)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def apply_events(metrics: dict[str, Any], events: list[Event]) -> None:
    for kind, name, labels, value in events:
        metric = metrics.get(name)
        if metric is None:
            log.warning("dropping an event for unknown metric %r", name)
            continue
        child = metric.labels(**labels) if labels else metric
        getattr(child, kind)(value)


def ensure_hub() -> Any:
    return MetricsHub.options(
        name=HUB_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


class Recorder:
    """Buffers this process's metric events and sends them to the hub once a second.

    Recording never blocks and never raises: metrics must not slow or fail the work they
    describe. If the buffer fills while the hub is unreachable, the oldest events are dropped.
    """

    def __init__(self, flush_seconds: float = 1.0, max_events: int = 50_000) -> None:
        self.flush_seconds = flush_seconds
        self.max_events = max_events
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._hub: Any = None
        self._thread = threading.Thread(target=self._flush_forever, daemon=True)
        self._thread.start()

    def inc(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        self._add(("inc", name, labels, value))

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        self._add(("observe", name, labels, value))

    def set(self, name: str, labels: dict[str, str], value: float) -> None:
        self._add(("set", name, labels, value))

    def _add(self, event: Event) -> None:
        with self._lock:
            if len(self._events) >= self.max_events:
                del self._events[: len(self._events) // 10]
            self._events.append(event)

    def flush(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        if not events:
            return
        try:
            if self._hub is None:
                self._hub = ensure_hub()
            ray.get(self._hub.apply.remote(events), timeout=10)
        except Exception:  # the hub may be restarting; keep the events for the next flush
            log.warning("metrics hub unreachable; keeping %d events for later", len(events))
            self._hub = None
            with self._lock:
                self._events = (events + self._events)[-self.max_events :]

    def _flush_forever(self) -> None:
        while True:
            threading.Event().wait(self.flush_seconds)
            self.flush()


_recorder: Recorder | None = None
_recorder_lock = threading.Lock()


def recorder() -> Recorder:
    """This process's recorder, started on first use."""
    global _recorder
    with _recorder_lock:
        if _recorder is None:
            _recorder = Recorder()
        return _recorder
