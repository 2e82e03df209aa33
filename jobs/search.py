"""Hyperparameter search: one job, many trials, each a real Ray Train run; the best one wins.

A job whose spec has a ``search`` block runs a Ray Tune experiment in its job process. Each
trial is a Tune function trainable that builds the job's own ``TorchTrainer`` with the trial's
values and the job's workers; ``TuneReportCallback`` forwards every epoch Train reports to Tune,
so ASHA can stop a weak trial after any epoch. A Tune callback writes each trial's values, state
and metric curve to the store as they come. When the trials are done, the best trial's best
checkpoint goes back to the job process, which registers and challenges it as it would any
single run's.

The experiment lives in checkpoints/<job id>-search. A job process that finds one there (its
job was requeued after the last process died) restores it: finished trials are kept, unfinished
ones resume their Train runs from their last checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import combinations, product
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.experiment import Trial as TuneTrial
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import (
    BasicVariantGenerator,
    ConcurrencyLimiter,
    SearchAlgorithm,
    Searcher,
)
from ray.util.placement_group import (
    PlacementGroup,
    placement_group_table,
    remove_placement_group,
)

from jobs.data import DataCatalog, PreparedData
from jobs.errors import SpecInvalid, TuneloopError
from jobs.model import check_strategy
from jobs.registry import resolve_base
from jobs.settings import Settings
from jobs.spec import Distribution, JobSpec, Search, Task, parse_spec
from jobs.store import Job, Store, TrialState, make_engine
from jobs.train import train_loop_per_worker

log = logging.getLogger(__name__)

AUGMENTATION = "hyperparameters.augmentation"
EPOCHS = "hyperparameters.epochs"
CURVE_KEYS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_precision",
    "val_recall",
    "val_f1",
)
PLACEMENT_KEY = "placement_record"
# A trial's Tune actor only drives its Train run; the run's workers hold the CPUs. Tune refuses
# an empty resource request, hence a token amount.
TRIAL_DRIVER_CPU = 0.01
# Tune saves the experiment's state at most this often; a short period keeps a resumed search
# from rerunning trials that had finished just before its job process died.
EXPERIMENT_STATE_SECONDS = 2
# A stopped trial's Train controller dies with its Tune actor within moments; its placement
# group is removed once this long has passed, and watched this long for one made meanwhile.
PLACEMENT_GRACE_SECONDS = 3.0
PLACEMENT_WATCH_SECONDS = 30.0


@dataclass(frozen=True)
class SearchOutcome:
    """The winning trial of a finished search, ready to be registered."""

    spec: JobSpec
    checkpoint: Path
    data: PreparedData
    base_dir: Path
    summary: dict[str, Any]


def search_dir(settings: Settings, job_id: str) -> Path:
    return settings.checkpoints_dir() / f"{job_id}-search"


def search_metric(spec: JobSpec) -> tuple[str, str]:
    """The metric trials are compared on, and whether lower or higher is better."""
    stopping = spec.hyperparameters.early_stopping
    chosen = spec.search.metric if spec.search else None
    metric = chosen or (stopping.metric if stopping else "val_accuracy")
    return metric, "min" if metric == "val_loss" else "max"


def extremes(distribution: Distribution) -> list[Any]:
    """The values that bound what a dimension can give: its bounds, or its listed values."""
    bounds = distribution.uniform or distribution.loguniform or distribution.randint
    if bounds is not None:
        return list(bounds)
    values = list(distribution.choice or distribution.grid or [])
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if numbers and len(numbers) == len(values):
        return sorted({min(numbers), max(numbers)})
    return values


def corners(space: dict[str, Distribution]) -> Iterator[dict[str, Any]]:
    """Each dimension at each of its extremes, then every pair of dimensions at theirs together.

    Pairs catch rules between two fields, such as the encoder learning no faster than the head.
    """
    bounds = {path: extremes(distribution) for path, distribution in sorted(space.items())}
    for path, values in bounds.items():
        for value in values:
            yield {path: value}
    for (first, first_values), (second, second_values) in combinations(bounds.items(), 2):
        for first_value, second_value in product(first_values, second_values):
            yield {first: first_value, second: second_value}


def max_epochs(spec: JobSpec) -> int:
    """The most epochs any trial can train: the horizon ASHA plans its rungs over."""
    distribution = spec.search.space.get(EPOCHS) if spec.search else None
    if distribution is None:
        return spec.hyperparameters.epochs
    return int(max(extremes(distribution)))


def trial_spec(spec: JobSpec, values: dict[str, Any]) -> JobSpec:
    """The concrete spec a trial trains with: the job's, with the trial's values and no search."""
    document = spec.to_document()
    document["search"] = None
    for path, value in values.items():
        section, name = path.split(".")
        if path == AUGMENTATION and isinstance(value, bool):
            # True means the task's augmentation with its defaults.
            kind = "image" if spec.task is Task.IMAGE_CLASSIFICATION else "word_dropout"
            value = {"kind": kind} if value else None
        document[section][name] = value
    return parse_spec(document)


def check_search(spec: JobSpec, settings: Settings, base_dir: Path) -> None:
    """Refuse a search over the configured limits, or one some of whose trials could not train."""
    search = spec.search
    if search is None:
        return
    check_budget(search, settings)
    for values in corners(search.space):
        check_trial(spec, values, base_dir)
    horizon = max_epochs(spec)
    if search.scheduler == "asha" and search.grace_epochs > horizon:
        raise SpecInvalid(
            f"search.grace_epochs is {search.grace_epochs} but trials train at most {horizon} "
            f"epochs; give 1 to {horizon}",
            field="search.grace_epochs",
        )


def check_budget(search: Search, settings: Settings) -> None:
    if search.grid_points > settings.max_trials:
        raise SpecInvalid(
            f"search.space: the grid has {search.grid_points} points, more than the limit of "
            f"{settings.max_trials} trials; list fewer grid values or draw them with choice",
            field="search.space",
        )
    if search.trials > settings.max_trials:
        raise SpecInvalid(
            f"search.trials is {search.trials}; give 1 to {settings.max_trials}",
            field="search.trials",
        )
    if search.max_concurrent > settings.max_concurrent_trials:
        raise SpecInvalid(
            f"search.max_concurrent is {search.max_concurrent}; at most "
            f"{settings.max_concurrent_trials} trials may run at once",
            field="search.max_concurrent",
        )


def check_trial(spec: JobSpec, values: dict[str, Any], base_dir: Path) -> None:
    try:
        trial = trial_spec(spec, values)
        if any(path.startswith("strategy.") for path in values):
            check_strategy(trial.strategy, base_dir)
    except SpecInvalid as exc:
        shown = " and ".join(f"{path}={value!r}" for path, value in values.items())
        raise SpecInvalid(
            f"search.space: a trial with {shown} would be refused: {exc.message}",
            field=f"search.space.{next(iter(values))}",
        ) from None


def tune_space(search: Search) -> dict[str, Any]:
    """The search space as Ray Tune distributions, keyed by spec path."""
    return {path: tune_distribution(d) for path, d in search.space.items()}


def tune_distribution(distribution: Distribution) -> Any:
    if distribution.choice is not None:
        return tune.choice(distribution.choice)
    if distribution.grid is not None:
        return tune.grid_search(distribution.grid)
    if distribution.uniform is not None:
        return tune.uniform(*distribution.uniform)
    if distribution.loguniform is not None:
        return tune.loguniform(*distribution.loguniform)
    assert distribution.randint is not None
    low, high = distribution.randint
    return tune.randint(low, high + 1)  # Tune leaves out the upper bound; the spec includes it


def plain(values: dict[str, Any]) -> dict[str, Any]:
    """A trial's values as JSON types; Tune may hand out numpy numbers."""
    return {path: v.item() if hasattr(v, "item") else v for path, v in values.items()}


def describe(values: dict[str, Any]) -> str:
    def shown(value: Any) -> str:
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{path.split('.')[-1]}={shown(v)}" for path, v in sorted(values.items()))


# -- one trial --------------------------------------------------------------------------------


def trial_loop_per_worker(config: dict[str, Any]) -> None:
    """A trial's Train worker: notes its placement group for the janitor, then trains as usual."""
    record = Path(config[PLACEMENT_KEY])
    group = ray.util.get_current_placement_group()
    if ray.train.get_context().get_world_rank() == 0 and group is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        partial = record.with_name(f".{record.name}.{os.getpid()}")
        partial.write_text(group.id.hex())
        os.replace(partial, record)
    train_loop_per_worker({key: v for key, v in config.items() if key != PLACEMENT_KEY})


def trial_trainer(
    job: Job, spec: JobSpec, settings: Settings, trial_id: str, ranking: tuple[str, str]
) -> TorchTrainer:
    """The job's own trainer with a trial's spec, run under the trial's name, reporting to Tune.

    The stable name lets a restarted trial resume its Train run from its last checkpoint. Each
    run keeps its best checkpoint by ``ranking`` besides its latest, so a search's disk
    use grows with its trials, not with their epochs. Tune, not Train, retries a trial whose
    workers failed: a Train run that restarted its own workers could make a new placement group
    after the janitor removed a stopped trial's.
    """
    from jobs.runner import build_trainer  # jobs.runner imports this module to run searches

    # Ray Train v2's trainer; its type hints still describe the v1 class.
    trainer: Any = build_trainer(job, spec, settings)[0]
    metric, mode = ranking
    folder = search_dir(settings, job.id)
    record = placement_folder(folder) / trial_id
    run = dataclasses.replace(
        trainer.run_config,
        name=f"trial-{trial_id}",
        storage_path=str(folder),
        callbacks=[TuneReportCallback()],
        failure_config=ray.train.FailureConfig(max_failures=0),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=1, checkpoint_score_attribute=metric, checkpoint_score_order=mode
        ),
    )
    return TorchTrainer(
        trial_loop_per_worker,
        train_loop_config={
            **trainer.train_loop_config,
            "placement_record": None,  # each trial records its own group, below
            PLACEMENT_KEY: str(record),
        },
        scaling_config=trainer.scaling_config,
        run_config=run,
    )


def run_trial(config: dict[str, Any], *, job_id: str, settings: dict[str, Any]) -> None:
    """One trial, in its own Tune actor: a whole Ray Train run with the trial's values."""
    parsed = Settings.model_validate(settings)
    store = Store(make_engine(parsed.resolved_database_url()))
    try:
        train_trial(store, job_id, parsed, tune.get_context().get_trial_id(), plain(config))
    finally:
        store.engine.dispose()


def train_trial(
    store: Store, job_id: str, settings: Settings, trial_id: str, values: dict[str, Any]
) -> None:
    job = store.get_job(job_id)
    searched = JobSpec.model_validate(job.spec)
    try:
        spec = trial_spec(searched, values)
        result = trial_trainer(job, spec, settings, trial_id, search_metric(searched)).fit()
        if result.error is not None:
            raise result.error
    except Exception as exc:
        end_failed_trial(store, job_id, trial_id, f"{type(exc).__name__}: {exc}")
        raise
    # A run that returns trained to its end or stopped early by its own patience, unless the
    # job was cancelled under it.
    if not store.get_job(job_id).cancel_requested:
        store.finish_trial(job_id, trial_id, TrialState.SUCCEEDED)


def end_failed_trial(store: Store, job_id: str, trial_id: str, error: str) -> TrialState:
    """Record a trial whose run raised or whose actor died. Cancelling a search kills its
    trials' actors and trainers, so a trial that fails once its job is cancelled was stopped,
    not broken."""
    if store.get_job(job_id).cancel_requested:
        store.finish_trial(job_id, trial_id, TrialState.STOPPED)
        return TrialState.STOPPED
    store.finish_trial(job_id, trial_id, TrialState.FAILED, error=error)
    return TrialState.FAILED


# -- the search -------------------------------------------------------------------------------


def placement_folder(folder: Path) -> Path:
    return folder / "placement"


class PlacementJanitor:
    """Removes the placement groups of trials that ended.

    Tune ends a trial by stopping its actor, which takes the trial's Train controller with it
    before the controller can release its workers' placement group. Ray Train's own cleaner
    notices a dead controller only through Ray's State API, which needs the dashboard; without
    it the group would go on holding its CPUs. Each trial's rank-0 worker writes its group's id
    to a file named for the trial (trial_loop_per_worker).
    """

    def __init__(self, job_id: str, folder: Path) -> None:
        self.job_id = job_id
        self.folder = folder
        self.ended: dict[str, float] = {}
        self.swept_at = 0.0

    def trial_ended(self, trial_id: str) -> None:
        self.ended.setdefault(trial_id, time.monotonic())

    def sweep(self) -> None:
        """Remove the groups of trials that ended a little while ago; at most once a second."""
        now = time.monotonic()
        if now - self.swept_at < 1.0:
            return
        self.swept_at = now
        for trial_id, ended in list(self.ended.items()):
            if now - ended >= PLACEMENT_GRACE_SECONDS:
                self.remove(self.folder / trial_id)
            if now - ended >= PLACEMENT_WATCH_SECONDS:
                del self.ended[trial_id]

    def remove_all(self) -> None:
        """Remove every trial's group: for when no trial of the search can be running."""
        for record in sorted(self.folder.glob("*")):
            if not record.name.startswith("."):
                self.remove(record)

    def remove(self, record: Path) -> None:
        try:
            group = PlacementGroup(ray.PlacementGroupID.from_hex(record.read_text().strip()))
        except FileNotFoundError:
            return
        if placement_group_table(group).get("state") in (None, "REMOVED"):
            return
        remove_placement_group(group)
        log.info("job %s: removed the placement group of ended trial %s", self.job_id, record.name)


class TrialRecorder(tune.Callback):
    """Writes each trial to the store as Tune runs it: its values, state and metric curve.

    Tune pickles its callbacks with the experiment, so this one holds a database URL and opens
    its store when first used.
    """

    def __init__(
        self, job_id: str, database_url: str, spec: JobSpec, janitor: PlacementJanitor
    ) -> None:
        self.job_id = job_id
        self.database_url = database_url
        self.spec_document = spec.to_document()
        self.metric, self.mode = search_metric(spec)
        self.janitor = janitor
        self._store: Store | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(make_engine(self.database_url))
        return self._store

    def planned_epochs(self, trial: TuneTrial) -> int:
        spec = JobSpec.model_validate(self.spec_document)
        return trial_spec(spec, plain(trial.config)).hyperparameters.epochs

    def on_trial_start(
        self, iteration: int, trials: list[TuneTrial], trial: TuneTrial, **info: Any
    ) -> None:
        values = plain(trial.config)
        self.store.start_trial(self.job_id, trial.trial_id, values)
        self.store.append_log(
            self.job_id, "INFO", f"trial {trial.trial_id} started: {describe(values)}"
        )

    def on_trial_result(
        self,
        iteration: int,
        trials: list[TuneTrial],
        trial: TuneTrial,
        result: dict[str, Any],
        **info: Any,
    ) -> None:
        row = {key: float(result[key]) for key in CURVE_KEYS if key in result}
        if "epoch" not in row:
            return
        self.store.record_trial_epoch(
            self.job_id,
            trial.trial_id,
            row,
            metric=self.metric,
            mode=self.mode,
            checkpoint=result.get(CHECKPOINT_PATH_KEY),
        )

    def on_trial_complete(
        self, iteration: int, trials: list[TuneTrial], trial: TuneTrial, **info: Any
    ) -> None:
        epochs = int(trial.last_result.get("epoch", 0))
        planned = self.planned_epochs(trial)
        stopped = epochs < planned and self.store.finish_trial(
            self.job_id, trial.trial_id, TrialState.STOPPED
        )
        if not stopped:
            self.store.finish_trial(self.job_id, trial.trial_id, TrialState.SUCCEEDED)
        verb = "stopped" if stopped else "finished"
        self.store.append_log(
            self.job_id, "INFO", f"trial {trial.trial_id} {verb} after {epochs} of {planned} epochs"
        )
        self.janitor.trial_ended(trial.trial_id)

    def on_trial_error(
        self, iteration: int, trials: list[TuneTrial], trial: TuneTrial, **info: Any
    ) -> None:
        state = end_failed_trial(self.store, self.job_id, trial.trial_id, "its Tune actor failed")
        if state is TrialState.STOPPED:
            self.store.append_log(
                self.job_id, "INFO", f"trial {trial.trial_id} stopped: its job was cancelled"
            )
        else:
            self.store.append_log(self.job_id, "WARNING", f"trial {trial.trial_id} failed")
        self.janitor.trial_ended(trial.trial_id)

    def on_step_end(self, iteration: int, trials: list[TuneTrial], **info: Any) -> None:
        self.janitor.sweep()


class CancelStopper(tune.Stopper):
    """Ends the whole search once its job is cancelled; reads the flag at most once a second."""

    def __init__(self, job_id: str, database_url: str) -> None:
        self.job_id = job_id
        self.database_url = database_url
        self.checked_at = 0.0
        self.cancelled = False
        self._store: Store | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        now = time.monotonic()
        if not self.cancelled and now - self.checked_at >= 1.0:
            self.checked_at = now
            if self._store is None:
                self._store = Store(make_engine(self.database_url))
            self.cancelled = self._store.get_job(self.job_id).cancel_requested
        return self.cancelled


def searcher(search: Search, seed: int) -> Searcher | SearchAlgorithm:
    """The searcher, limited to ``max_concurrent`` trials at once.

    Each kind takes the limit its own way: Tune ignores TuneConfig's limit for a random-search
    generator passed in, so the limit goes to the searcher itself.
    """
    if search.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # loads optuna only where it is used

        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=search.max_concurrent)
    return BasicVariantGenerator(max_concurrent=search.max_concurrent, random_state=seed)


def scheduler(spec: JobSpec) -> TrialScheduler:
    assert spec.search is not None
    if spec.search.scheduler == "none":
        return FIFOScheduler()
    # Epochs, not Tune's iterations: a trial resumed from a checkpoint keeps counting from its
    # last epoch, so its rungs stay where they were.
    return ASHAScheduler(
        time_attr="epoch",
        max_t=max_epochs(spec),
        grace_period=spec.search.grace_epochs,
        reduction_factor=spec.search.reduction_factor,
    )


def build_tuner(
    job: Job, spec: JobSpec, settings: Settings, janitor: PlacementJanitor
) -> tune.Tuner:
    """A new Tune experiment for the search, or the one a lost job process left, restored."""
    assert spec.search is not None
    folder = search_dir(settings, job.id)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, job_id=job.id, settings=settings.model_dump(mode="json")),
        {"CPU": TRIAL_DRIVER_CPU},
    )
    if tune.Tuner.can_restore(folder):
        return tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True)

    search = spec.search
    metric, mode = search_metric(spec)
    url = settings.resolved_database_url()
    seed = spec.hyperparameters.seed if search.seed is None else search.seed
    return tune.Tuner(
        trainable,
        param_space=tune_space(search),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=searcher(search, seed),
            scheduler=scheduler(spec),
            num_samples=search.trials // search.grid_points,
            time_budget_s=search.time_limit_seconds,
        ),
        run_config=tune.RunConfig(
            name=folder.name,
            storage_path=str(folder.parent),
            callbacks=[TrialRecorder(job.id, url, spec, janitor)],
            stop=CancelStopper(job.id, url),
            failure_config=tune.FailureConfig(max_failures=settings.max_worker_failures),
            verbose=0,
        ),
    )


def run_search(job: Job, spec: JobSpec, settings: Settings, store: Store) -> SearchOutcome | None:
    """Run a search job's trials to the end and return its winner; None if it was cancelled."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(EXPERIMENT_STATE_SECONDS))
    folder = search_dir(settings, job.id)
    janitor = PlacementJanitor(job.id, placement_folder(folder))
    janitor.folder.mkdir(parents=True, exist_ok=True)
    janitor.remove_all()  # groups a job process that died mid-search left behind

    if tune.Tuner.can_restore(folder):
        finished = [t for t in store.list_trials(job.id) if t.state != TrialState.RUNNING]
        store.append_log(
            job.id, "INFO", f"resuming the search: {len(finished)} trial(s) already ended"
        )
    results = build_tuner(job, spec, settings, janitor).fit()

    # The last trials' controllers die with their Tune actors just after fit returns; a second
    # pass catches a group one of them made in between.
    janitor.remove_all()
    time.sleep(PLACEMENT_GRACE_SECONDS)
    janitor.remove_all()
    store.stop_running_trials(job.id)
    if store.get_job(job.id).cancel_requested:
        return None
    errors = [str(error) for error in results.errors]
    return winner(job, spec, settings, store, errors)


def winner(
    job: Job, spec: JobSpec, settings: Settings, store: Store, errors: list[str]
) -> SearchOutcome:
    """The best trial of a finished search, with the data and model it trained on."""
    metric, mode = search_metric(spec)
    best = store.best_trial(job.id)
    if best is None or best.checkpoint is None:
        reason = f"; first error: {errors[0].splitlines()[0][:300]}" if errors else ""
        raise TuneloopError(f"no trial of the search reported {metric}{reason}")
    trials = store.list_trials(job.id)
    summary = {
        "trials": len(trials),
        "best_trial": best.trial_id,
        "config": best.config,
        "metric": metric,
        "mode": mode,
        "best_metric": best.best_metric,
        "best_epoch": best.best_epoch,
        "trial_epochs": sum(len(trial.curve) for trial in trials),
    }
    store.replace_epochs(job.id, best.curve)
    store.append_log(
        job.id,
        "INFO",
        f"search done: trial {best.trial_id} is best with {metric} {best.best_metric:.4f} at "
        f"epoch {best.best_epoch} ({describe(best.config)}); {len(trials)} trials, "
        f"{summary['trial_epochs']} trial-epochs",
    )
    log.info("job %s: search won by trial %s", job.id, best.trial_id)
    chosen = trial_spec(spec, best.config)
    return SearchOutcome(
        spec=chosen,
        checkpoint=Path(best.checkpoint),
        data=DataCatalog(settings, store).load(
            chosen.data, seed=chosen.hyperparameters.seed, task=chosen.task
        ),
        base_dir=resolve_base(chosen, settings, store),
        summary=summary,
    )
