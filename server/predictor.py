"""The predictor: a Ray Serve deployment answering predictions with each model's production version.

Requests are batched across callers, and every answer is logged for the drift monitor (see
monitoring/prediction_log.py) without waiting for the log. Image models take encoded images
(base64 in JSON, or the bytes of uploaded files), decoded and checked one request at a time
before batching, so that an unusable image fails only its own request and is named in it.

The production alias is re-read at most once a second, so a promotion takes effect within a
second: requests already running finish on the old version, later ones load and use the new
one, and none fails because of the swap.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import torch
from PIL import Image
from ray import serve

from jobs.errors import DatasetInvalid, NotFound, TuneloopError
from jobs.images import decode_base64_image, decode_image
from jobs.inference import Classifier
from jobs.registry import Registry
from jobs.settings import Settings
from jobs.spec import JobSpec
from jobs.store import Store, new_id
from monitoring.metrics import recorder
from monitoring.prediction_log import IMAGE_PREFIX, PredictionLog

log = logging.getLogger(__name__)

ALIAS_TTL_SECONDS = 1.0
# Counts versions, not bytes: a LoRA version whose base is already loaded adds only its adapters
# and head (jobs/inference.py). Bound the cache by memory instead once replicas serve many of them.
LOADED_VERSIONS = 4


@dataclass(frozen=True)
class ImageInput:
    """A decoded RGB image and a digest of its pixels, which names its file in the log."""

    image: Image.Image
    digest: str

    @classmethod
    def of(cls, image: Image.Image) -> ImageInput:
        digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()[:32]
        return cls(image, digest)


def decode_inputs(inputs: list[str] | list[bytes], field: str) -> list[ImageInput]:
    """Images from base64 strings (plain, or data URLs) or from raw file bytes."""
    decoded = []
    for index, item in enumerate(inputs):
        where = f"{field}[{index}]"
        if isinstance(item, bytes):
            image = decode_image(item, field=where)
        elif isinstance(item, str):
            image = decode_base64_image(item, field=where)
        else:
            raise DatasetInvalid(f"{where} is not an image", field=where)
        decoded.append(ImageInput.of(image))
    return decoded


class ModelCache:
    """Loaded model versions, least recently used evicted first, and the production aliases."""

    def __init__(self, registry: Registry, prediction_log: PredictionLog) -> None:
        self.registry = registry
        self.prediction_log = prediction_log
        self.loaded: OrderedDict[tuple[str, int], Classifier] = OrderedDict()
        self.sample_rates: dict[tuple[str, int], float] = {}
        self.aliases: dict[str, tuple[int, float]] = {}

    def production_version(self, name: str) -> int:
        cached = self.aliases.get(name)
        if cached is not None and time.monotonic() - cached[1] < ALIAS_TTL_SECONDS:
            return cached[0]
        version = self.registry.production(name)
        if version is None:
            raise NotFound(f"model {name!r} has no production version yet", field="name")
        self.aliases[name] = (version.version, time.monotonic())
        return version.version

    def classifier(self, name: str, version: int) -> Classifier:
        key = (name, version)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        started = time.perf_counter()
        version_row = self.registry.store.get_version(*key)
        classifier = Classifier(self.registry.folder(version_row))
        self.sample_rates[key] = JobSpec.model_validate(version_row.spec).monitoring.sample_rate
        log.info("model %s: loaded v%d in %.1fs", name, version, time.perf_counter() - started)
        self.loaded[key] = classifier
        while len(self.loaded) > LOADED_VERSIONS:
            self.loaded.popitem(last=False)
        return classifier

    def prepare(
        self, name: str, inputs: list[str] | list[bytes], field: str
    ) -> list[str] | list[ImageInput]:
        """Check one request's inputs against what the production version takes."""
        classifier = self.classifier(name, self.production_version(name))
        if classifier.is_image_model:
            return decode_inputs(inputs, field)
        if any(isinstance(item, bytes) for item in inputs):
            raise DatasetInvalid(
                f"model {name!r} classifies texts; send them as JSON inputs, not as files",
                field=field,
            )
        return cast(list[str], list(inputs))

    def predict(self, name: str, inputs: list[str] | list[ImageInput]) -> dict[str, Any]:
        version = self.production_version(name)
        classifier = self.classifier(name, version)
        images = [item for item in inputs if isinstance(item, ImageInput)]
        if bool(images) != classifier.is_image_model:
            # The production version changed task between checking the request and now.
            raise DatasetInvalid(
                f"model {name!r} v{version} takes {'images' if images else 'texts'} no longer; "
                "send the request again",
                field="inputs",
            )
        probabilities, features = classifier.forward(
            [item.image for item in images] if images else inputs
        )
        labels = classifier.label_names
        predictions = [
            {
                "id": new_id("pred"),
                "label": labels[int(row.argmax())],
                "probabilities": {label: float(p) for label, p in zip(labels, row, strict=True)},
            }
            for row in probabilities
        ]
        logged = (
            [f"{IMAGE_PREFIX}traffic/{name}/{item.digest}.png" for item in images]
            if images
            else inputs
        )
        self.prediction_log.record(
            name,
            version,
            [
                (p["id"], text, p["label"], p["probabilities"])
                for p, text in zip(predictions, logged, strict=True)
            ],
            self.sample_rates.get((name, version), 1.0),
            embeddings=[row.astype("float32").tobytes() for row in features] if images else None,
            images=[item.image for item in images] if images else None,
        )
        return {"model": name, "version": version, "predictions": predictions}


@serve.deployment(name="Predictor", max_ongoing_requests=64)
class Predictor:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = Settings.model_validate(settings)
        # Ray would pick threads from the CPUs reserved, which are kept small so that jobs fit.
        torch.set_num_threads(self.settings.predictor_threads)
        store = Store.open(self.settings.resolved_database_url(), upgrade=False)
        self.metrics = recorder()
        prediction_log = PredictionLog(
            store, self.metrics, data_root=self.settings.resolved_data_root()
        )
        self.models = ModelCache(Registry(self.settings, store), prediction_log)
        self.batched.set_max_batch_size(self.settings.predict_max_batch_size)
        self.batched.set_batch_wait_timeout_s(self.settings.predict_batch_wait_seconds)

    async def predict(
        self, name: str, inputs: list[str] | list[bytes], field: str = "inputs"
    ) -> dict[str, Any]:
        """Answer one request: texts, or images as base64 strings or file bytes."""
        started = time.perf_counter()
        outcome = "error"
        try:
            items = await asyncio.to_thread(self.models.prepare, name, inputs, field)
            answer = await self.batched((name, items))
            if isinstance(answer, TuneloopError):
                raise answer
            outcome = "ok"
            return answer
        finally:
            labels = {"model": name, "outcome": outcome}
            self.metrics.inc("tuneloop_predictions_total", labels, len(inputs))
            if outcome == "ok":
                self.metrics.observe(
                    "tuneloop_prediction_latency_seconds",
                    {"model": name},
                    time.perf_counter() - started,
                )

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def batched(
        self, requests: list[tuple[str, list[Any]]]
    ) -> list[dict[str, Any] | TuneloopError]:
        """One forward pass per model for every request that arrived together."""
        return await asyncio.to_thread(self._answer, requests)

    def _answer(
        self, requests: list[tuple[str, list[Any]]]
    ) -> list[dict[str, Any] | TuneloopError]:
        answers: list[dict[str, Any] | TuneloopError] = [NotFound("unanswered")] * len(requests)
        by_model: dict[str, list[int]] = {}
        for index, (name, _) in enumerate(requests):
            by_model.setdefault(name, []).append(index)
        for name, indices in by_model.items():
            inputs = [item for i in indices for item in requests[i][1]]
            try:
                combined = self.models.predict(name, inputs)
            except TuneloopError as exc:
                for i in indices:
                    answers[i] = exc
                continue
            offset = 0
            for i in indices:
                count = len(requests[i][1])
                answers[i] = {
                    **combined,
                    "predictions": combined["predictions"][offset : offset + count],
                }
                offset += count
        return answers
