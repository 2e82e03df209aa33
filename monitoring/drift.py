"""Drift checks between a reference window (what the model was trained on) and a current window.

Every check answers one question with a p-value, and the verdict over all of them corrects for
multiple testing with Holm's step-down method. The checks and where each comes from:

- ``embedding``: the sentence embeddings, by a maximum mean discrepancy (MMD) permutation test
  with a Gaussian kernel. The test is tuneloop's own (``mmd_permutation_test``); it runs inside the
  Evidently report as the custom metric ``EmbeddingsMMDDrift``. Evidently's default embedding
  method, a domain classifier, gives no p-value to correct, raised more false alarms in
  tests/bench/bench_drift.py, and its metric fits a t-SNE picture on every run (seconds a check).
- ``predicted_label``: the predicted label distribution, by a two-sample chi-square test of
  homogeneity, registered with Evidently as the stattest ``chi2_homogeneity`` (its own
  ``chisquare`` treats the reference shares as exact, which inflates false alarms).
- ``text_length``: words per text, by Evidently's Kolmogorov-Smirnov stattest ``ks``.
- ``oov_share``: the share of a text's words never seen in the reference window, by a one-sided
  Mann-Whitney test (current above reference), registered as the stattest ``mannwhitney_greater``.
- ``accuracy``: accuracy on labelled rows of both windows, by a one-sided Fisher exact test; it is
  computed here, not by Evidently, because labels may cover only part of a window.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import stats

with warnings.catch_warnings():
    # Evidently 0.7.23 touches numpy.core and calls litestar helpers deprecated in litestar 2.23
    # while its modules load. Neither concerns tuneloop, and both would fail runs that treat
    # warnings as errors; drop this filter once Evidently imports cleanly.
    warnings.filterwarnings(
        "ignore", message=r"numpy\.core is deprecated", category=DeprecationWarning
    )
    warnings.filterwarnings(
        "ignore", message=r".*Deprecated in litestar", category=DeprecationWarning
    )
    from evidently import DataDefinition, Dataset, Report
    from evidently.core.metric_types import SingleValue, SingleValueCalculation, SingleValueMetric
    from evidently.core.report import Context
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType
    from evidently.legacy.renderers.html_widgets import CounterData, counter
    from evidently.metrics import ValueDrift

logger = logging.getLogger(__name__)

CheckName = Literal["embedding", "predicted_label", "text_length", "oov_share", "accuracy"]
ALL_CHECKS: tuple[CheckName, ...] = (
    "embedding",
    "predicted_label",
    "text_length",
    "oov_share",
    "accuracy",
)
EMBEDDINGS_NAME = "text"

_WORD = re.compile(r"\w+(?:'\w+)?")


# --- the windows and the configuration ---------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A window of traffic: texts, their embeddings, predicted labels and, maybe, true labels.

    ``true_labels`` may be absent, or hold None for rows nobody has labelled yet.
    """

    texts: list[str]
    embeddings: np.ndarray
    predicted_labels: list[str]
    true_labels: list[str | None] | None = None

    def __post_init__(self) -> None:
        embeddings = np.asarray(self.embeddings, dtype=np.float32)
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be a 2-D array, got shape {embeddings.shape!r}")
        rows = len(self.texts)
        lengths = {
            "embeddings": embeddings.shape[0],
            "predicted_labels": len(self.predicted_labels),
        }
        if self.true_labels is not None:
            lengths["true_labels"] = len(self.true_labels)
        for name, length in lengths.items():
            if length != rows:
                raise ValueError(f"{name} has {length!r} rows but texts has {rows!r}")
        object.__setattr__(self, "embeddings", embeddings)
        object.__setattr__(
            self, "predicted_labels", [str(label) for label in self.predicted_labels]
        )
        if self.true_labels is not None:
            labels = [None if label is None else str(label) for label in self.true_labels]
            object.__setattr__(self, "true_labels", labels)

    @property
    def size(self) -> int:
        return len(self.texts)

    def labelled_rows(self) -> tuple[list[str], list[str]]:
        """Predicted and true labels of the rows that carry a true label."""
        if self.true_labels is None:
            return [], []
        pairs = [
            (p, t)
            for p, t in zip(self.predicted_labels, self.true_labels, strict=True)
            if t is not None
        ]
        return [p for p, _ in pairs], [t for _, t in pairs]


class DriftConfig(BaseModel):
    """How drift is judged. ``alpha`` bounds the chance of a false verdict over all checks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(default=0.05, gt=0.0, lt=1.0)
    checks: tuple[CheckName, ...] = ALL_CHECKS
    min_window_size: int = Field(
        default=30, ge=2, description="rows each window needs for any check"
    )
    permutations: int = Field(
        default=1000,
        ge=99,
        description="MMD permutations; the smallest p-value is 1/(permutations+1)",
    )
    max_embedding_rows: int = Field(
        default=1000,
        ge=10,
        description="rows per window the MMD test uses; larger windows are sampled",
    )
    min_accuracy_drop: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="accuracy loss that counts, on top of significance",
    )
    seed: int = 0

    @field_validator("checks")
    @classmethod
    def _checks_are_distinct(cls, checks: tuple[CheckName, ...]) -> tuple[CheckName, ...]:
        if not checks or len(set(checks)) != len(checks):
            raise ValueError(f"checks must name each check at most once, got {checks!r}")
        return checks


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One check. ``score`` is always a p-value; ``adjusted_p_value`` is its Holm-adjusted value."""

    name: CheckName
    method: str
    score: float | None
    adjusted_p_value: float | None
    detected: bool
    reference_size: int
    current_size: int
    details: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None
    score_kind: str = "p_value"


@dataclass(frozen=True)
class DriftResult:
    """The verdict, its checks, and the Evidently report they were computed in."""

    drift_detected: bool
    alpha: float
    checks: list[CheckResult]
    report: dict[str, Any]
    html: str | None
    seconds: float
    correction: str = "holm"

    @property
    def detected_checks(self) -> list[CheckName]:
        return [check.name for check in self.checks if check.detected]

    def check(self, name: CheckName) -> CheckResult:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(
            f"no check named {name!r}; this result has {[c.name for c in self.checks]!r}"
        )

    def to_dict(self, *, include_html: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_html:
            data.pop("html")
        return data


# --- text descriptors ----------------------------------------------------------------------------


def words(text: str) -> list[str]:
    """Lower-cased word tokens; apostrophes inside a word keep it whole (don't, it's)."""
    return _WORD.findall(text.lower())


def vocabulary(texts: Iterable[str]) -> set[str]:
    return {word for text in texts for word in words(text)}


def oov_share(texts: Sequence[str], vocabulary: set[str]) -> np.ndarray:
    """Share of each text's words missing from ``vocabulary``; a text without words scores 0."""
    shares = np.zeros(len(texts), dtype=np.float64)
    for row, text in enumerate(texts):
        tokens = words(text)
        if tokens:
            shares[row] = sum(token not in vocabulary for token in tokens) / len(tokens)
    return shares


def _reference_oov_share(texts: Sequence[str]) -> np.ndarray:
    # Against its own vocabulary the reference would score zero everywhere, so each reference text
    # is scored against the vocabulary of the other reference texts: a word is unseen there when
    # this text is the only one holding it.
    tokenised = [set(words(text)) for text in texts]
    document_frequency = Counter(word for tokens in tokenised for word in tokens)
    shares = np.zeros(len(texts), dtype=np.float64)
    for row, text in enumerate(texts):
        tokens = words(text)
        if tokens:
            shares[row] = sum(document_frequency[token] == 1 for token in tokens) / len(tokens)
    return shares


def _text_lengths(texts: Sequence[str]) -> np.ndarray:
    return np.array([len(words(text)) for text in texts], dtype=np.float64)


# --- statistics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MMDTestResult:
    p_value: float
    mmd2: float
    bandwidth: float
    reference_rows: int
    current_rows: int
    permutations: int


def mmd_permutation_test(
    reference: np.ndarray,
    current: np.ndarray,
    *,
    permutations: int = 1000,
    max_rows: int = 1000,
    seed: int = 0,
) -> MMDTestResult:
    """Two-sample MMD test with a Gaussian kernel, its p-value from label permutations.

    The kernel width is the median squared distance over the pooled rows, which does not depend
    on which row came from which window, so the permutation p-value is exact. The statistic is the
    biased (V-statistic) estimate of MMD squared. Windows above ``max_rows`` are sampled down
    without replacement to bound the cost, which grows with the square of the rows.
    """
    if min(len(reference), len(current)) < 2:
        raise ValueError(
            f"the MMD test needs at least 2 rows a side, got {len(reference)!r} reference and "
            f"{len(current)!r} current rows"
        )
    rng = np.random.default_rng(seed)
    x = _sample_rows(reference, max_rows, rng)
    y = _sample_rows(current, max_rows, rng)
    kernel, bandwidth = _gaussian_kernel(np.vstack([x, y]).astype(np.float64))

    m, n = len(x), len(y)
    weights = np.concatenate([np.full(m, 1.0 / m), np.full(n, -1.0 / n)])
    observed = float(weights @ kernel @ weights)
    null = _permuted_statistics(kernel, weights, permutations, rng)
    p_value = (1 + int(np.count_nonzero(null >= observed))) / (permutations + 1)
    return MMDTestResult(p_value, max(observed, 0.0), bandwidth, m, n, permutations)


def _sample_rows(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= limit:
        return rows
    return rows[rng.choice(len(rows), size=limit, replace=False)]


def _gaussian_kernel(points: np.ndarray) -> tuple[np.ndarray, float]:
    squares = np.einsum("ij,ij->i", points, points)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2.0 * points @ points.T, 0.0)
    upper = distances[np.triu_indices(len(points), k=1)]
    bandwidth = float(np.median(upper)) if upper.size else 1.0
    if bandwidth <= 0.0:
        bandwidth = 1.0  # identical rows everywhere: any width gives MMD zero
    return np.exp(-distances / bandwidth), bandwidth


def _permuted_statistics(
    kernel: np.ndarray, weights: np.ndarray, permutations: int, rng: np.random.Generator
) -> np.ndarray:
    # Each column of a block is one relabelling; w' K w for all of them is one matrix product.
    # Blocks keep the working memory near 2 x rows x 256 floats.
    results = []
    for start in range(0, permutations, 256):
        count = min(256, permutations - start)
        block = rng.permuted(np.tile(weights, (count, 1)), axis=1).T
        results.append(np.einsum("ib,ib->b", block, kernel @ block))
    return np.concatenate(results)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the order given.

    A check is significant at level alpha exactly when its adjusted p-value is at most alpha; the
    chance of any false verdict over all checks then stays at most alpha, whatever their
    dependence.
    """
    count = len(p_values)
    order = np.argsort(p_values, kind="stable")
    adjusted = [0.0] * count
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (count - rank) * float(p_values[index])))
        adjusted[index] = running
    return adjusted


def _chi2_homogeneity(
    reference: pd.Series, current: pd.Series, feature_type: ColumnType, threshold: float
) -> tuple[float, bool]:
    categories = sorted(set(reference.dropna()) | set(current.dropna()), key=str)
    if len(categories) < 2:
        return 1.0, False
    table = np.array(
        [
            [int((reference == category).sum()) for category in categories],
            [int((current == category).sum()) for category in categories],
        ]
    )
    p_value = float(stats.chi2_contingency(table, correction=False).pvalue)
    return p_value, p_value < threshold


def _mannwhitney_greater(
    reference: pd.Series, current: pd.Series, feature_type: ColumnType, threshold: float
) -> tuple[float, bool]:
    if pd.concat([reference, current]).nunique() < 2:
        return 1.0, False  # one value on both sides: nothing to rank, and no drift
    p_value = float(stats.mannwhitneyu(current, reference, alternative="greater").pvalue)
    return p_value, p_value < threshold


register_stattest(
    StatTest(
        name="chi2_homogeneity",
        display_name="chi-square test of homogeneity p_value",
        allowed_feature_types=[ColumnType.Categorical],
    ),
    default_impl=_chi2_homogeneity,
)
register_stattest(
    StatTest(
        name="mannwhitney_greater",
        display_name="Mann-Whitney U p_value (current greater)",
        allowed_feature_types=[ColumnType.Numerical],
    ),
    default_impl=_mannwhitney_greater,
)


# --- the embedding check as an Evidently metric --------------------------------------------------


class EmbeddingsMMDDrift(SingleValueMetric):
    """Evidently metric whose value is the p-value of ``mmd_permutation_test``."""

    embeddings_name: str
    permutations: int = 1000
    max_rows: int = 1000
    seed: int = 0
    threshold: float = 0.05


class EmbeddingsMMDValue(SingleValue):
    mmd2: float
    bandwidth: float
    reference_rows: int
    current_rows: int


class EmbeddingsMMDDriftCalculation(SingleValueCalculation[EmbeddingsMMDDrift]):
    def calculate(
        self, context: Context, current_data: Dataset, reference_data: Dataset | None
    ) -> EmbeddingsMMDValue:
        if reference_data is None:
            raise ValueError("EmbeddingsMMDDrift needs a reference dataset, got None")
        columns = (context.data_definition.embeddings or {})[self.metric.embeddings_name]
        test = mmd_permutation_test(
            reference_data.as_dataframe()[columns].to_numpy(),
            current_data.as_dataframe()[columns].to_numpy(),
            permutations=self.metric.permutations,
            max_rows=self.metric.max_rows,
            seed=self.metric.seed,
        )
        base = self.result(test.p_value)
        result = EmbeddingsMMDValue(
            value=test.p_value,
            display_name=base.display_name,
            mmd2=test.mmd2,
            bandwidth=test.bandwidth,
            reference_rows=test.reference_rows,
            current_rows=test.current_rows,
        )
        result.metric_value_location = base.metric_value_location
        result.widget = [counter(counters=[self._counter(test)], title="")]
        return result

    def _counter(self, test: MMDTestResult) -> CounterData:
        verdict = "detected" if test.p_value <= self.metric.threshold else "not detected"
        label = (
            f"Drift in embeddings {verdict} at level {self.metric.threshold:.4g}: "
            f"MMD permutation test, MMD² {test.mmd2:.4g}, {test.reference_rows} reference and "
            f"{test.current_rows} current rows, {test.permutations} permutations"
        )
        return CounterData(label, f"p = {test.p_value:.4g}")

    def display_name(self) -> str:
        return f"Drift in embeddings '{self.metric.embeddings_name}' (MMD p-value)"


# --- the check -----------------------------------------------------------------------------------


_METHODS: dict[CheckName, str] = {
    "embedding": "MMD permutation test (tuneloop, in Evidently as EmbeddingsMMDDrift)",
    "predicted_label": "chi-square homogeneity (Evidently ValueDrift, chi2_homogeneity)",
    "text_length": "Kolmogorov-Smirnov on words per text (Evidently ValueDrift, ks)",
    "oov_share": "Mann-Whitney, current greater (Evidently ValueDrift, mannwhitney_greater)",
    "accuracy": "Fisher exact, current lower (scipy)",
}
_COLUMNS: dict[CheckName, tuple[str, str]] = {
    # check -> (column in the Evidently datasets, stattest)
    "predicted_label": ("predicted_label", "chi2_homogeneity"),
    "text_length": ("text_length", "ks"),
    "oov_share": ("oov_share", "mannwhitney_greater"),
}


def check_drift(
    reference: Window,
    current: Window,
    config: DriftConfig | None = None,
    *,
    render_html: bool = False,
) -> DriftResult:
    """Run the configured checks of ``current`` against ``reference`` and give one verdict.

    Drift is detected when at least one check is significant after the Holm-Bonferroni
    correction over the p-values of the checks that ran, so the chance of a false verdict on
    unchanged traffic is at most ``config.alpha``. The accuracy check must also show a drop of at
    least ``config.min_accuracy_drop``. Checks without enough rows are reported as skipped.

    The Evidently report is always returned as a dict; its HTML (several megabytes, mostly the
    viewer's scripts) only when ``render_html`` is set. The per-column flags drawn in the report
    use the Bonferroni level alpha/k, the first Holm step, so the report can flag fewer checks than
    the verdict but never more.
    """
    config = config or DriftConfig()
    started = time.perf_counter()
    if reference.embeddings.shape[1] != current.embeddings.shape[1]:
        raise ValueError(
            f"embedding widths differ: reference {reference.embeddings.shape[1]!r}, "
            f"current {current.embeddings.shape[1]!r}"
        )
    skipped = _skip_reasons(reference, current, config)
    running = [name for name in config.checks if name not in skipped]
    level = config.alpha / max(len(running), 1)

    metrics = _metrics(running, level, config)
    snapshot = _run_report(reference, current, metrics, with_embeddings="embedding" in running)
    raw = _p_values(snapshot, metrics, running, reference, current)
    adjusted = dict(zip(running, holm_adjust([raw[name][0] for name in running]), strict=True))

    checks = [
        _check_result(
            name, raw.get(name), adjusted.get(name), skipped.get(name), reference, current, config
        )
        for name in config.checks
    ]
    result = DriftResult(
        drift_detected=any(check.detected for check in checks),
        alpha=config.alpha,
        checks=checks,
        report=json.loads(snapshot.json()),
        html=snapshot.get_html_str(as_iframe=False) if render_html else None,
        seconds=time.perf_counter() - started,
    )
    logger.debug(
        "drift check: %d reference and %d current rows, detected in %s, %.3f s",
        reference.size,
        current.size,
        result.detected_checks or "none",
        result.seconds,
    )
    return result


def _skip_reasons(reference: Window, current: Window, config: DriftConfig) -> dict[CheckName, str]:
    smallest = min(reference.size, current.size)
    if smallest < config.min_window_size:
        reason = (
            f"windows have {reference.size} reference and {current.size} current rows; "
            f"each needs min_window_size={config.min_window_size}"
        )
        return {name: reason for name in config.checks}
    if "accuracy" not in config.checks:
        return {}
    labelled = {"reference": reference, "current": current}
    for side, window in labelled.items():
        rows = len(window.labelled_rows()[1])
        if rows < config.min_window_size:
            return {
                "accuracy": f"{side} window has {rows} labelled rows; "
                f"accuracy needs min_window_size={config.min_window_size}"
            }
    return {}


def _frame(window: Window, oov: np.ndarray, with_embeddings: bool) -> pd.DataFrame:
    columns: dict[str, Any] = {
        "predicted_label": window.predicted_labels,
        "text_length": _text_lengths(window.texts),
        "oov_share": oov,
    }
    frame = pd.DataFrame(columns)
    if not with_embeddings:
        return frame
    embeddings = pd.DataFrame(window.embeddings, columns=_embedding_columns(window))
    return pd.concat([frame, embeddings], axis=1)


def _embedding_columns(window: Window) -> list[str]:
    return [f"embedding_{i}" for i in range(window.embeddings.shape[1])]


def _run_report(
    reference: Window, current: Window, metrics: dict[CheckName, Any], with_embeddings: bool
) -> Any:
    definition = DataDefinition(
        numerical_columns=["text_length", "oov_share"],
        categorical_columns=["predicted_label"],
        embeddings={EMBEDDINGS_NAME: _embedding_columns(reference)} if with_embeddings else None,
    )
    vocab = vocabulary(reference.texts)
    reference_data = Dataset.from_pandas(
        _frame(reference, _reference_oov_share(reference.texts), with_embeddings), definition
    )
    current_data = Dataset.from_pandas(
        _frame(current, oov_share(current.texts, vocab), with_embeddings), definition
    )
    report = Report(list(metrics.values()), include_tests=False)
    return report.run(current_data, reference_data)


def _metrics(running: list[CheckName], level: float, config: DriftConfig) -> dict[CheckName, Any]:
    metrics: dict[CheckName, Any] = {}
    for name in running:
        if name == "embedding":
            metrics[name] = _embedding_metric(level, config)
        elif name in _COLUMNS:
            column, method = _COLUMNS[name]
            metrics[name] = ValueDrift(column=column, method=method, threshold=level)
    return metrics


def _embedding_metric(level: float, config: DriftConfig) -> EmbeddingsMMDDrift:
    return EmbeddingsMMDDrift(
        embeddings_name=EMBEDDINGS_NAME,
        permutations=config.permutations,
        max_rows=config.max_embedding_rows,
        seed=config.seed,
        threshold=level,
    )


def _p_values(
    snapshot: Any,
    metrics: dict[CheckName, Any],
    running: list[CheckName],
    reference: Window,
    current: Window,
) -> dict[CheckName, tuple[float, dict[str, float]]]:
    """The p-value and the details of every check that ran, read back from the report."""
    results: dict[CheckName, tuple[float, dict[str, float]]] = {}
    for name in running:
        if name == "accuracy":
            results[name] = _accuracy_test(reference, current)
            continue
        value = snapshot.metric_results[metrics[name].metric_id]
        details: dict[str, float] = {}
        if isinstance(value, EmbeddingsMMDValue):
            details = {
                "mmd2": value.mmd2,
                "bandwidth": value.bandwidth,
                "reference_rows": value.reference_rows,
                "current_rows": value.current_rows,
            }
        results[name] = (float(value.value), details)
    return results


def _accuracy_test(reference: Window, current: Window) -> tuple[float, dict[str, float]]:
    ref_predicted, ref_true = reference.labelled_rows()
    cur_predicted, cur_true = current.labelled_rows()
    ref_correct = sum(p == t for p, t in zip(ref_predicted, ref_true, strict=True))
    cur_correct = sum(p == t for p, t in zip(cur_predicted, cur_true, strict=True))
    table = [
        [ref_correct, len(ref_true) - ref_correct],
        [cur_correct, len(cur_true) - cur_correct],
    ]
    # "greater": the odds of a correct answer are higher in the reference than now.
    p_value = float(stats.fisher_exact(table, alternative="greater").pvalue)
    reference_accuracy = ref_correct / len(ref_true)
    current_accuracy = cur_correct / len(cur_true)
    details = {
        "reference_accuracy": reference_accuracy,
        "current_accuracy": current_accuracy,
        "drop": reference_accuracy - current_accuracy,
    }
    return p_value, details


def _check_result(
    name: CheckName,
    raw: tuple[float, dict[str, float]] | None,
    adjusted: float | None,
    skipped: str | None,
    reference: Window,
    current: Window,
    config: DriftConfig,
) -> CheckResult:
    sizes = _sizes(name, reference, current)
    if raw is None or adjusted is None:
        return CheckResult(name, _METHODS[name], None, None, False, *sizes, skipped=skipped)
    p_value, details = raw
    detected = adjusted <= config.alpha
    if name == "accuracy":
        detected = detected and details["drop"] >= config.min_accuracy_drop
    return CheckResult(name, _METHODS[name], p_value, adjusted, detected, *sizes, details=details)


def _sizes(name: CheckName, reference: Window, current: Window) -> tuple[int, int]:
    if name == "accuracy":
        return len(reference.labelled_rows()[1]), len(current.labelled_rows()[1])
    return reference.size, current.size
