"""Model versions, the production alias, and the champion/challenger rule.

A version is a folder written in full before its row is inserted, so a row never points at a
half-written model. It is self-contained (encoder, tokenizer, head, label names), except for a
LoRA version, which holds its adapters and head and names the base model they belong to.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.errors import ModelUnavailable, NotFound
from jobs.inference import Classifier
from jobs.model import (
    ADAPTER_DIR,
    ENCODER_DIR,
    ClassifierModel,
    apply_strategy,
    build_classifier,
    count_parameters,
    is_lora_folder,
    load_state,
    resolve_base_model,
    save_classifier,
    save_lora_classifier,
)
from jobs.settings import Settings
from jobs.spec import REGISTRY_REFERENCE, JobKind, JobSpec, StrategyKind
from jobs.store import ModelVersion, Store

log = logging.getLogger(__name__)

FOOTPRINT_FILE = "footprint.json"


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    champion_version: int | None
    champion_score: float | None
    challenger_score: float | None

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def decide_promotion(
    policy: str,
    champion_version: int | None,
    champion_score: float | None,
    challenger_score: float | None,
) -> PromotionDecision:
    """The champion/challenger rule: the challenger replaces the champion only if it is better.

    Scores are accuracies on the same held-out labelled rows; a tie keeps the champion, since
    a swap should buy something.
    """

    def decision(promote: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(
            promote, reason, champion_version, champion_score, challenger_score
        )

    if policy == "never":
        return decision(False, "serving.promote is 'never'")
    if champion_version is None:
        return decision(True, "first version of this model")
    if policy == "always":
        return decision(True, "serving.promote is 'always'")
    assert champion_score is not None and challenger_score is not None
    if challenger_score > champion_score:
        return decision(
            True,
            f"challenger {challenger_score:.4f} beats champion "
            f"v{champion_version} {champion_score:.4f}",
        )
    return decision(
        False,
        f"challenger {challenger_score:.4f} does not beat champion "
        f"v{champion_version} {champion_score:.4f}; kept as a candidate",
    )


class Registry:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    def folder(self, version: ModelVersion) -> Path:
        return self.settings.models_dir() / version.path

    def register(
        self,
        *,
        job_id: str,
        spec: JobSpec,
        base_dir: Path,
        weights: Path,
        label_names: list[str],
        metrics: dict[str, Any],
        dataset_hash: str,
        parent_version: int | None = None,
    ) -> ModelVersion:
        """Write a trained model's folder from its checkpoint weights and record a version."""
        relative = Path(spec.model_name) / job_id
        target = self.settings.models_dir() / relative
        staging = target.with_name(f".{job_id}.partial")
        shutil.rmtree(staging, ignore_errors=True)

        model = build_classifier(
            base_dir, len(label_names), dropout=0.0, pretrained=spec.kind is JobKind.FINE_TUNING
        )
        apply_strategy(model, spec.strategy)
        trained = model.head if spec.strategy.kind is StrategyKind.FEATURE_EXTRACTION else model
        load_state(trained, weights)
        if spec.strategy.kind is StrategyKind.LORA:
            save_lora_classifier(model, base_dir, spec.base_model, label_names, staging)
        else:
            save_classifier(model, base_dir, label_names, staging)
        (staging / "spec.json").write_text(json.dumps(spec.to_document(), indent=2))
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
        footprint = measure_footprint(model, staging)
        (staging / FOOTPRINT_FILE).write_text(json.dumps(footprint, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)

        version = self.store.add_model_version(
            ModelVersion(
                model_name=spec.model_name,
                version=0,
                job_id=job_id,
                path=str(relative),
                metrics=metrics,
                spec=spec.to_document(),
                dataset_hash=dataset_hash,
                parent_version=parent_version,
                score=metrics.get("val_accuracy"),
            )
        )
        log.info("model %s: registered v%d from job %s", spec.model_name, version.version, job_id)
        return version

    def footprint(self, version: ModelVersion) -> dict[str, int]:
        """Trained and total parameters of a version, and the bytes it takes on disk."""
        return dict(json.loads((self.folder(version) / FOOTPRINT_FILE).read_text()))

    def base_version(self, reference: str) -> ModelVersion:
        """The version a ``model:NAME[@VERSION]`` base names; without a version, production."""
        match = REGISTRY_REFERENCE.match(reference)
        assert match is not None, "the spec validated the form"
        name = match["name"]
        try:
            if match["version"] is not None:
                return self.store.get_version(name, int(match["version"]))
            version = self.production(name)
        except NotFound:
            raise ModelUnavailable(
                f"base model {reference!r}: no such registered model version", field="base_model"
            ) from None
        if version is None:
            raise ModelUnavailable(
                f"base model {reference!r}: model {name!r} has no production version; name one "
                f"as model:{name}@VERSION",
                field="base_model",
            )
        return version

    def production(self, name: str) -> ModelVersion | None:
        model = self.store.get_model(name)
        if model.production_version is None:
            return None
        return self.store.get_version(name, model.production_version)

    def challenge(
        self, challenger: ModelVersion, policy: str, texts: list[str], labels: list[str]
    ) -> PromotionDecision:
        """Score champion and challenger on the same labelled rows and promote by the rule."""
        champion = self.production(challenger.model_name)
        champion_score = challenger_score = None
        if champion is not None and policy == "if_better":
            champion_score = Classifier(self.folder(champion)).accuracy(texts, labels)
            challenger_score = Classifier(self.folder(challenger)).accuracy(texts, labels)
        decision = decide_promotion(
            policy, champion.version if champion else None, champion_score, challenger_score
        )
        if decision.promote:
            self.store.set_production(challenger.model_name, challenger.version)
        log.info(
            "model %s: v%d %s: %s",
            challenger.model_name,
            challenger.version,
            "promoted" if decision.promote else "not promoted",
            decision.reason,
        )
        return decision


def resolve_base(spec: JobSpec, settings: Settings, store: Store) -> Path:
    """The local folder of a spec's base model.

    A registered version (``model:NAME[@VERSION]``) lends its encoder folder, a base model in
    Hugging Face format; that is how a pretrained model is fine-tuned. A pretraining job needs
    only its base's configuration.
    """
    if not spec.base_model.startswith("model:"):
        return resolve_base_model(spec.base_model, weights=spec.kind is JobKind.FINE_TUNING)
    registry = Registry(settings, store)
    version = registry.base_version(spec.base_model)
    folder = registry.folder(version)
    if is_lora_folder(folder):
        raise ModelUnavailable(
            f"base model {spec.base_model!r} is {version.model_name} v{version.version}, a LoRA "
            "version: it holds adapters, not an encoder to fine-tune; use its base model",
            field="base_model",
        )
    return folder / ENCODER_DIR


def pin_base(spec: JobSpec, settings: Settings, store: Store) -> JobSpec:
    """Name the exact version a ``model:NAME`` base is today, so that a job, its retries and
    its retraining jobs all start from the same weights whatever is promoted later."""
    if not spec.base_model.startswith("model:") or "@" in spec.base_model:
        return spec
    version = Registry(settings, store).base_version(spec.base_model)
    pinned = f"model:{version.model_name}@{version.version}"
    return spec.model_copy(update={"base_model": pinned})


def measure_footprint(model: ClassifierModel, folder: Path) -> dict[str, int]:
    """What a version costs: parameters trained and in all, and bytes on disk (adapters apart,
    for LoRA, since those are what each further version of the same base adds)."""
    parameters = count_parameters(model)
    footprint = {
        "trainable_parameters": parameters["trainable"],
        "total_parameters": parameters["total"],
        "stored_bytes": folder_bytes(folder),
    }
    if (folder / ADAPTER_DIR).is_dir():
        footprint["adapter_bytes"] = folder_bytes(folder / ADAPTER_DIR)
    return footprint


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
