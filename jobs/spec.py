"""The job spec: one validated document, the same through the API, the CLI and the client.

A spec says what to fine-tune (``base_model``), on what (``data``), how much of the pretrained
network may move (``strategy``), and how fast each part learns (``hyperparameters``). It holds
data only: nothing in it names code to run.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from jobs.errors import SpecInvalid

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
HUB_REFERENCE = re.compile(r"^hub:(?P<repo>[\w.-]+/[\w.-]+)@(?P<revision>[0-9a-f]{40}|[\w.-]+)$")
REGISTRY_REFERENCE = re.compile(
    r"^model:(?P<name>[a-z0-9][a-z0-9-]{0,62})(@(?P<version>[1-9]\d*))?$"
)
MAX_SPEC_BYTES = 64 * 1024
# The deepest a real spec goes is five levels (search.space.PATH.choice[i]); the limit leaves
# room and still stops documents that exhaust recursion in a parser or validator.
MAX_SPEC_DEPTH = 16
MODULE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(StrEnum):
    TEXT_CLASSIFICATION = "text_classification"
    IMAGE_CLASSIFICATION = "image_classification"


class JobKind(StrEnum):
    """``fine_tuning`` starts from the base model's weights; ``pretraining`` builds the base
    model from its configuration alone, with freshly initialised weights, and trains all of it:
    the version it registers is a base that later jobs fine-tune (``base_model: model:NAME``)."""

    FINE_TUNING = "fine_tuning"
    PRETRAINING = "pretraining"


class StrategyKind(StrEnum):
    FEATURE_EXTRACTION = "feature_extraction"
    PARTIAL = "partial"
    FULL = "full"
    LORA = "lora"


class DataSpec(Strict):
    """Where the rows come from. Exactly one of ``dataset`` and ``path`` names the training set.

    Text rows are a table (CSV, JSONL, Parquet). Image rows are a folder with one subfolder of
    images per class (an uploaded zip becomes one), or a table whose ``image_column`` holds
    image paths relative to the table's own folder.
    """

    dataset: str | None = Field(default=None, description="An uploaded dataset id.")
    path: str | None = Field(default=None, description="A file or folder under the data root.")
    format: Literal["auto", "csv", "jsonl", "parquet", "folder"] = "auto"
    text_column: str = "text"
    image_column: str = "image"
    label_column: str = "label"
    validation_dataset: str | None = None
    validation_path: str | None = None
    validation_split: float = Field(default=0.2, gt=0, lt=1)

    @model_validator(mode="after")
    def _one_source_each(self) -> DataSpec:
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of 'dataset' and 'path'")
        if self.validation_dataset is not None and self.validation_path is not None:
            raise ValueError("give at most one of 'validation_dataset' and 'validation_path'")
        return self

    @property
    def has_validation_file(self) -> bool:
        return self.validation_dataset is not None or self.validation_path is not None


class Strategy(Strict):
    """How much of the pretrained encoder trains.

    ``feature_extraction`` freezes the encoder and trains the head on cached encoder outputs;
    ``partial`` freezes the embeddings and the lowest ``frozen_layers`` encoder layers;
    ``full`` trains everything; ``lora`` freezes the encoder and trains low-rank adapters
    (``rank``, scaled by ``alpha / rank``) on its ``target_modules``, the linear layers whose
    names end so. The defaults adapt the attention's query and value projections of BERT-like
    encoders. Each kind ignores the fields of the others.
    """

    kind: StrategyKind = StrategyKind.PARTIAL
    frozen_layers: int = Field(default=4, ge=0)
    rank: int = Field(default=8, ge=1, le=256, description="lora: rank of each adapter.")
    alpha: float = Field(default=16, gt=0, le=1024, description="lora: adapter scale numerator.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="lora: dropout on adapter inputs.")
    target_modules: list[Annotated[str, Field(pattern=MODULE_NAME_PATTERN)]] = Field(
        default_factory=lambda: ["query", "value"],
        min_length=1,
        max_length=32,
        description="lora: names (or dotted name endings) of the linear layers to adapt.",
    )


class EarlyStopping(Strict):
    metric: Literal["val_accuracy", "val_f1", "val_loss"] = "val_f1"
    patience: int = Field(default=2, ge=1)
    min_delta: float = Field(default=0.0, ge=0)

    @property
    def mode(self) -> Literal["min", "max"]:
        return "min" if self.metric == "val_loss" else "max"


class WordDropout(Strict):
    """Text: each word of a training sentence is removed with ``probability``."""

    kind: Literal["word_dropout"] = "word_dropout"
    probability: float = Field(default=0.1, gt=0, lt=0.5)


class ImageAugmentation(Strict):
    """Images: each training image is changed anew in every epoch, in this order.

    A random crop covering ``crop_scale`` of the image's area (aspect ratio 3/4 to 4/3), resized
    back to the image's size; a left-right flip with probability one half when ``flip``; a
    rotation by up to ``rotation_degrees`` either way; brightness, contrast and saturation each
    scaled by a factor drawn from [1 - ``color_jitter``, 1 + ``color_jitter``]. Set a part to
    null (or false, or 0) to leave it out.
    """

    kind: Literal["image"] = "image"
    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    flip: bool = True
    rotation_degrees: float = Field(default=10.0, ge=0, le=180)
    color_jitter: float = Field(default=0.2, ge=0, lt=1)

    @field_validator("crop_scale")
    @classmethod
    def _scale_within_the_image(
        cls, value: tuple[float, float] | None
    ) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] <= value[1] <= 1:
            raise ValueError(
                f"crop_scale {list(value)} must be [low, high] with 0 < low <= high <= 1"
            )
        return value


def _augmentation_kind(value: Any) -> str:
    # Specs written before images existed give word dropout without its kind.
    if isinstance(value, dict):
        return str(value.get("kind", "word_dropout"))
    return str(getattr(value, "kind", "word_dropout"))


Augmentation = Annotated[
    Annotated[WordDropout, Tag("word_dropout")] | Annotated[ImageAugmentation, Tag("image")],
    Discriminator(_augmentation_kind),
]


class Hyperparameters(Strict):
    epochs: int = Field(default=3, ge=1, le=100)
    batch_size: int = Field(default=16, ge=1, le=1024)
    max_length: int = Field(default=64, ge=8, le=512)
    encoder_lr: float = Field(default=2e-5, gt=0, le=1, description="Pretrained layers.")
    head_lr: float = Field(default=1e-3, gt=0, le=1, description="The new classification head.")
    weight_decay: float = Field(default=0.01, ge=0, le=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0
    early_stopping: EarlyStopping | None = None
    augmentation: Augmentation | None = None

    @model_validator(mode="after")
    def _encoder_learns_slower(self) -> Hyperparameters:
        if self.encoder_lr > self.head_lr:
            raise ValueError(
                f"encoder_lr {self.encoder_lr} is above head_lr {self.head_lr}; pretrained "
                "layers must learn no faster than the new head"
            )
        return self


class Resources(Strict):
    workers: int = Field(default=1, ge=1, le=64)
    cpus_per_worker: float = Field(default=1.0, gt=0, le=64)
    # A worker drives one device (DDP, one process per GPU); more GPUs means more workers.
    gpus_per_worker: float = Field(default=0.0, ge=0, le=1)


class Limits(Strict):
    """When a running job is stopped and failed instead of being left to run.

    Both clocks restart with each attempt. Progress is a heartbeat from the job's training
    workers: at their start, during an epoch at least every few seconds, and at each epoch's
    end. Until the workers first report, the runner allows the longer of
    ``no_progress_seconds`` and its own start-up allowance (``TUNELOOP_JOB_STARTUP_SECONDS``).
    """

    timeout_seconds: float = Field(
        default=24 * 3600,
        gt=0,
        le=7 * 24 * 3600,
        description="Wall-clock seconds an attempt may run, from its start; a week at most.",
    )
    no_progress_seconds: float = Field(
        default=900,
        ge=5,
        le=24 * 3600,
        description="Seconds without a worker heartbeat before the job is deemed stalled.",
    )
    memory_mb: int | None = Field(
        default=None,
        ge=64,
        le=4 * 1024 * 1024,
        description="Resident memory each training worker may use, in MiB; unlimited if unset.",
    )


SEARCHABLE = frozenset(
    {
        "hyperparameters.encoder_lr",
        "hyperparameters.head_lr",
        "hyperparameters.batch_size",
        "hyperparameters.epochs",
        "hyperparameters.weight_decay",
        "hyperparameters.warmup_ratio",
        "hyperparameters.dropout",
        "hyperparameters.augmentation",
        "strategy.kind",
        "strategy.frozen_layers",
        "strategy.rank",
        "strategy.alpha",
        "strategy.dropout",
    }
)
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")


class Distribution(Strict):
    """The values one searched hyperparameter takes; give exactly one field.

    ``choice`` draws from a list and ``grid`` tries every value of one; ``uniform`` and
    ``loguniform`` draw a number between two bounds, ``randint`` an integer with both bounds
    included. For ``hyperparameters.augmentation`` a value of true means word dropout with its
    defaults, false means none.
    """

    choice: list[Any] | None = Field(default=None, min_length=1, max_length=64)
    grid: list[Any] | None = Field(default=None, min_length=1, max_length=64)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one_kind_with_rising_bounds(self) -> Distribution:
        given = [kind for kind in DISTRIBUTIONS if getattr(self, kind) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(DISTRIBUTIONS)}; got {', '.join(given) or 'none'}"
            )
        bounds = self.uniform or self.loguniform or self.randint
        if bounds is not None and bounds[0] >= bounds[1]:
            raise ValueError(f"bounds {list(bounds)} must rise: give [low, high] with low < high")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform bounds {list(self.loguniform)} must be above 0")
        return self

    @property
    def kind(self) -> str:
        return next(kind for kind in DISTRIBUTIONS if getattr(self, kind) is not None)


class Search(Strict):
    """Hyperparameter search: ``trials`` runs of the job, each with values drawn from ``space``.

    Every trial trains with the job's resources; ``scheduler`` ``asha`` stops the weak ones
    early. The trial best by ``metric`` becomes the job's model version, promoted by the same
    rule as any other (see Serving). ``trials`` is required, so a search is always bounded.
    """

    space: dict[str, Distribution] = Field(
        min_length=1, description="Spec paths to search, e.g. 'hyperparameters.head_lr'."
    )
    searcher: Literal["random", "optuna"] = "random"
    trials: int = Field(ge=1, description="Trials in all, grid points included.")
    max_concurrent: int = Field(default=1, ge=1, description="Trials running at once.")
    time_limit_seconds: float | None = Field(
        default=None, gt=0, description="Stop every trial after this long; the best so far wins."
    )
    scheduler: Literal["asha", "none"] = "asha"
    grace_epochs: int = Field(default=1, ge=1, description="Epochs before ASHA may stop a trial.")
    reduction_factor: int = Field(
        default=3, ge=2, description="ASHA lets about 1 in this many trials on at each rung."
    )
    metric: Literal["val_accuracy", "val_f1", "val_loss"] | None = Field(
        default=None, description="The early-stopping metric when unset, else val_accuracy."
    )
    seed: int | None = Field(default=None, description="Seeds the searcher; the job's by default.")

    @field_validator("space")
    @classmethod
    def _searchable_paths(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        for path in space:
            if path not in SEARCHABLE:
                raise ValueError(
                    f"{path!r} cannot be searched; give any of {', '.join(sorted(SEARCHABLE))}"
                )
        return space

    @field_validator("searcher")
    @classmethod
    def _grid_needs_the_random_searcher(cls, searcher: str, info: ValidationInfo) -> str:
        grid = [path for path, d in info.data.get("space", {}).items() if d.grid is not None]
        if searcher == "optuna" and grid:
            raise ValueError(
                f"optuna draws every value itself and cannot walk the grid of {', '.join(grid)}; "
                "use choice there, or searcher 'random'"
            )
        return searcher

    @field_validator("trials")
    @classmethod
    def _trials_cover_the_grid_evenly(cls, trials: int, info: ValidationInfo) -> int:
        points = grid_points(info.data.get("space", {}))
        if trials % points:
            raise ValueError(
                f"{trials} trials do not cover the grid's {points} points evenly; "
                f"give a multiple of {points}"
            )
        return trials

    @property
    def grid_points(self) -> int:
        return grid_points(self.space)


def grid_points(space: dict[str, Distribution]) -> int:
    """How many value combinations the ``grid`` dimensions of a space make."""
    points = 1
    for distribution in space.values():
        if distribution.grid is not None:
            points *= len(distribution.grid)
    return points


class Serving(Strict):
    """When a trained version becomes the one that answers predictions.

    Challenger and champion are compared on ``challenge_dataset`` when it is set (retraining
    sets it to recent labelled traffic the challenger never trained on), else on the job's
    validation rows.
    """

    promote: Literal["if_better", "always", "never"] = "if_better"
    challenge_dataset: str | None = None


class RetrainPolicy(Strict):
    """When the monitor starts a retraining job by itself."""

    enabled: bool = True
    min_window: int = Field(default=100, ge=30, description="Predictions a verdict needs.")
    cooldown_seconds: float = Field(default=600, ge=0, description="Between two retrains.")
    accuracy_drop: float = Field(
        default=0.05, gt=0, lt=1, description="Labelled accuracy drop that triggers alone."
    )
    holdout_fraction: float = Field(
        default=0.3,
        gt=0,
        lt=1,
        description="Share of recent labelled rows kept out of training, to judge the result.",
    )


class Monitoring(Strict):
    """How the served model's traffic is watched for drift."""

    enabled: bool = True
    window_size: int = Field(default=200, ge=30, le=5000, description="Recent predictions.")
    window_seconds: float | None = Field(default=None, gt=0, description="Only newer ones.")
    schedule_seconds: float = Field(default=60, ge=1, description="Time between checks.")
    reference_size: int = Field(default=500, ge=30, le=5000, description="Training rows.")
    alpha: float = Field(
        default=0.02, gt=0, lt=0.5, description="Significance of the overall verdict."
    )
    sample_rate: float = Field(default=1.0, gt=0, le=1, description="Predictions logged.")
    retrain: RetrainPolicy = RetrainPolicy()


class JobSpec(Strict):
    model_name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)] = Field(
        description="The registry name the trained model is versioned under."
    )
    kind: JobKind = JobKind.FINE_TUNING
    task: Task = Task.TEXT_CLASSIFICATION
    base_model: str = Field(
        default="builtin:minilm",
        description="builtin:NAME, an absolute local folder in Hugging Face format, "
        "hub:ORG/NAME@REVISION, or model:NAME[@VERSION] for a registered version's encoder.",
    )
    data: DataSpec
    strategy: Strategy = Field(default_factory=Strategy, validate_default=True)
    hyperparameters: Hyperparameters = Hyperparameters()
    resources: Resources = Resources()
    limits: Limits = Limits()
    serving: Serving = Serving()
    monitoring: Monitoring = Monitoring()
    search: Search | None = None

    @field_validator("base_model")
    @classmethod
    def _known_reference_form(cls, value: str) -> str:
        if value.startswith("builtin:"):
            return value
        if value.startswith("hub:"):
            if not HUB_REFERENCE.match(value):
                raise ValueError(
                    f"{value!r} is not hub:ORG/NAME@REVISION; a Hub model needs a pinned revision"
                )
            return value
        if value.startswith("/"):
            return value
        if value.startswith("model:"):
            if not REGISTRY_REFERENCE.match(value):
                raise ValueError(f"{value!r} is not model:NAME or model:NAME@VERSION")
            return value
        raise ValueError(
            f"{value!r} is not builtin:NAME, an absolute folder, hub:ORG/NAME@REVISION "
            "or model:NAME[@VERSION]"
        )

    @field_validator("strategy")
    @classmethod
    def _pretraining_trains_everything(cls, strategy: Strategy, info: ValidationInfo) -> Strategy:
        if info.data.get("kind") is JobKind.PRETRAINING and strategy.kind is not StrategyKind.FULL:
            raise ValueError(
                f"a pretraining job trains every weight from scratch: strategy.kind must be "
                f"'full', not {strategy.kind.value!r}"
            )
        return strategy

    @field_validator("hyperparameters")
    @classmethod
    def _augmentation_suits_the_task(
        cls, hyperparameters: Hyperparameters, info: ValidationInfo
    ) -> Hyperparameters:
        augmentation = hyperparameters.augmentation
        wanted = "image" if info.data.get("task") is Task.IMAGE_CLASSIFICATION else "word_dropout"
        if augmentation is not None and augmentation.kind != wanted:
            raise ValueError(
                f"augmentation kind {augmentation.kind!r} does not suit task "
                f"{info.data.get('task', Task.TEXT_CLASSIFICATION).value!r}; give kind {wanted!r}"
            )
        return hyperparameters

    @field_validator("search")
    @classmethod
    def _pretraining_keeps_its_strategy(cls, search: Search | None, info: ValidationInfo) -> Any:
        if (
            search is not None
            and info.data.get("kind") is JobKind.PRETRAINING
            and "strategy.kind" in search.space
        ):
            raise ValueError("a pretraining job cannot search strategy.kind; it is always 'full'")
        return search

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_spec(document: dict[str, Any]) -> JobSpec:
    """Validate a spec already decoded from JSON or YAML, naming the first field at fault."""
    check_depth(document)
    try:
        return JobSpec.model_validate(document)
    except ValidationError as exc:
        raise spec_error(exc) from None


def check_depth(document: Any, limit: int = MAX_SPEC_DEPTH) -> None:
    """Refuse a document nested deeper than ``limit``, walking it without recursion."""
    pending: list[tuple[Any, int, str]] = [(document, 0, "")]
    while pending:
        value, depth, path = pending.pop()
        if not isinstance(value, dict | list):
            continue
        if depth >= limit:
            raise SpecInvalid(
                f"{path or 'spec'}: nested deeper than {limit} levels; no spec field is",
                field=path or None,
            )
        items = value.items() if isinstance(value, dict) else enumerate(value)
        pending.extend((child, depth + 1, f"{path}.{key}".lstrip(".")) for key, child in items)


class SpecLoader(yaml.SafeLoader):
    """The safe YAML loader without aliases, and with a nesting limit.

    An alias makes one node appear in many places: a few hundred bytes of nested aliases
    (the "billion laughs") become a document of billions of values once anything walks it.
    A spec never needs one. The composer recurses once per level, so depth is bounded here,
    before Python's recursion limit is.
    """

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not allowed in a spec{mark}")
        self.depth += 1
        try:
            if self.depth > MAX_SPEC_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nested deeper than {MAX_SPEC_DEPTH} levels{mark}")
            return super().compose_node(parent, index)  # type: ignore[no-untyped-call]
        finally:
            self.depth -= 1


def load_spec_document(text: str) -> dict[str, Any]:
    """Decode a spec written as YAML or JSON (JSON is YAML), refusing what could exhaust us."""
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecInvalid(f"spec is {len(text.encode())} bytes; the limit is {MAX_SPEC_BYTES}")
    try:
        if text.lstrip().startswith("{"):
            document = json.loads(text)
        else:
            document = yaml.load(text, Loader=SpecLoader)  # a SafeLoader, less aliases
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecInvalid(f"spec is not valid JSON or YAML: {exc}") from None
    except RecursionError:
        raise SpecInvalid(f"spec is nested deeper than {MAX_SPEC_DEPTH} levels") from None
    if not isinstance(document, dict):
        raise SpecInvalid(f"spec must be a mapping, got {type(document).__name__}")
    return document


def load_spec_text(text: str) -> JobSpec:
    """Parse a spec written as YAML or JSON; YAML is read with the safe loader, less aliases."""
    return parse_spec(load_spec_document(text))


def spec_error(exc: ValidationError) -> SpecInvalid:
    first = exc.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown field; remove it or check its spelling"
    detail = f"{field}: {message}" if field else message
    return SpecInvalid(detail, field=field)
