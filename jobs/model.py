"""Transfer-learning models: a pretrained encoder, a new head, and what of them may train.

Weights load from safetensors only and no remote code runs: a base model is data, never code.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoTokenizer,
    BaseImageProcessor,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from jobs.builtins import builtin_model_dir
from jobs.errors import ModelUnavailable, SpecInvalid
from jobs.lora import (
    attach_lora,
    base_fingerprint,
    check_lora,
    has_adapters,
    is_adapter_key,
    save_adapter,
)
from jobs.spec import HUB_REFERENCE, Hyperparameters, Strategy, StrategyKind, Task

log = logging.getLogger(__name__)

HEAD_FILE = "head.safetensors"
LABELS_FILE = "labels.json"
ENCODER_DIR = "encoder"
ADAPTER_DIR = "adapter"
BASE_FILE = "base.json"
SPEC_FILE = "spec.json"
PROCESSOR_FILE = "preprocessor_config.json"
# Top-level norms after the last layer (ViT, ConvNeXt): they train with the layers above the
# frozen ones, or the unfrozen layers would feed a normalisation fitted to other features.
FINAL_NORMS = ("layernorm", "layer_norm", "post_layernorm")
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def resolve_base_model(reference: str, *, weights: bool = True) -> Path:
    """Return a local Hugging Face folder for a spec's ``base_model``, or say why there is none.

    ``weights`` false accepts a folder with a configuration alone, for pretraining. Registered
    versions (``model:NAME``) are resolved by jobs.registry.resolve_base, which knows the store.
    """
    if reference.startswith("builtin:"):
        return builtin_model_dir(reference.removeprefix("builtin:"))
    if reference.startswith("hub:"):
        return _fetch_from_hub(reference)
    folder = Path(reference)
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(
            f"base model folder {reference!r} has no config.json; give a folder in Hugging Face "
            "format",
            field="base_model",
        )
    if weights and not any(folder.glob("*.safetensors")):
        raise ModelUnavailable(
            f"base model folder {reference!r} has no .safetensors weights; other weight formats "
            "can run code when loaded and are refused",
            field="base_model",
        )
    return folder


def _fetch_from_hub(reference: str) -> Path:
    match = HUB_REFERENCE.match(reference)
    assert match is not None, "the spec validated the form"
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            match["repo"],
            revision=match["revision"],
            etag_timeout=10,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelUnavailable(
            f"base model {reference!r} is not in the local Hugging Face cache and the Hub could "
            f"not be reached ({type(exc).__name__}); copy the model to a local folder and give "
            "its absolute path, or use a builtin model",
            field="base_model",
        ) from None
    return resolve_base_model(folder)


def encoder_layers(encoder: nn.Module) -> nn.ModuleList:
    """The stack an encoder's depth is counted in: the transformer layers of a BERT- or
    ViT-shaped encoder, the stages of a ConvNeXt or ResNet."""
    body = getattr(encoder, "encoder", None)
    for owner, name in ((body, "layer"), (body, "stages"), (encoder, "layers")):
        stack = getattr(owner, name, None)
        if isinstance(stack, nn.ModuleList):
            return stack
    raise SpecInvalid(
        f"strategy 'partial' needs an encoder with a stack of layers or stages; "
        f"{type(encoder).__name__} has no encoder.layer, encoder.stages or layers",
        field="strategy.kind",
    )


def encoder_depth(config: PretrainedConfig) -> int | None:
    """Layers (transformers) or stages (convolutional networks) a configuration describes."""
    layers = getattr(config, "num_hidden_layers", None)
    if layers is not None:
        return int(layers)
    depths = getattr(config, "depths", None)
    return len(depths) if depths is not None else None


def check_strategy(strategy: Strategy, base_dir: Path) -> None:
    """Refuse a freeze depth or adapter targets the base model cannot have, before the job
    queues."""
    if strategy.kind is StrategyKind.LORA:
        check_lora(strategy, base_dir)
        return
    if strategy.kind is not StrategyKind.PARTIAL:
        return
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    layers = encoder_depth(config)
    if layers is not None and strategy.frozen_layers > layers:
        raise SpecInvalid(
            f"strategy.frozen_layers is {strategy.frozen_layers} but the base model has "
            f"{layers} layers; give 0 to {layers}",
            field="strategy.frozen_layers",
        )


def check_task(task: Task, base_dir: Path) -> None:
    """Refuse a base model that cannot read the task's inputs, before the job queues."""
    has_processor = (base_dir / PROCESSOR_FILE).is_file()
    if task is Task.IMAGE_CLASSIFICATION and not has_processor:
        raise ModelUnavailable(
            f"task 'image_classification' needs an image model; the base model at "
            f"{str(base_dir)!r} has no {PROCESSOR_FILE} saying how to prepare images",
            field="base_model",
        )
    if task is Task.TEXT_CLASSIFICATION and has_processor:
        raise ModelUnavailable(
            f"the base model at {str(base_dir)!r} is an image model ({PROCESSOR_FILE}); "
            "give task 'image_classification' or a text model",
            field="base_model",
        )


class TransferClassifier(nn.Module):
    """A pretrained text encoder, mean-pooled, under a new linear head."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.hidden = int(encoder.config.hidden_size)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.hidden, num_labels))

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_ids, attention_mask))


class ImageTransferClassifier(nn.Module):
    """A pretrained image encoder, pooled, under a new linear head.

    Transformers (ViT) are pooled like text, as the mean of their final token states; their own
    pooler, a dense layer over the class token, is left out as for text. Convolutional networks
    (ConvNeXt, ResNet) are pooled by their own global average pooling.
    """

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        config = encoder.config
        sizes = getattr(config, "hidden_sizes", None)
        self.hidden = int(sizes[-1]) if sizes else int(config.hidden_size)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.hidden, num_labels))

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        output = self.encoder(pixel_values=pixel_values)
        hidden = output.last_hidden_state
        if hidden.dim() == 3:
            return hidden.mean(1)
        pooled = getattr(output, "pooler_output", None)
        return (pooled if pooled is not None else hidden.mean((2, 3))).flatten(1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


ClassifierModel = TransferClassifier | ImageTransferClassifier
Processor = PreTrainedTokenizerBase | BaseImageProcessor


def load_encoder(folder: Path, *, pretrained: bool = True) -> nn.Module:
    """The encoder in ``folder``: its weights, or with ``pretrained`` false its configuration
    alone with freshly initialised weights."""
    if not pretrained:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        return AutoModel.from_config(config, trust_remote_code=False)
    return AutoModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def folder_task(folder: Path) -> Task:
    """The task of a model folder: image models carry an image processor's settings."""
    if (folder / PROCESSOR_FILE).is_file():
        return Task.IMAGE_CLASSIFICATION
    return Task.TEXT_CLASSIFICATION


def load_processor(folder: Path) -> Processor:
    """What turns raw inputs into model inputs: the tokenizer, or the image processor (its
    Pillow implementation; the default one needs torchvision)."""
    if folder_task(folder) is Task.IMAGE_CLASSIFICATION:
        processor: BaseImageProcessor = AutoImageProcessor.from_pretrained(
            folder, trust_remote_code=False, backend="pil"
        )
        return processor
    return load_tokenizer(folder)


def build_classifier(
    base_dir: Path, num_labels: int, dropout: float, *, pretrained: bool = True
) -> ClassifierModel:
    encoder = load_encoder(base_dir, pretrained=pretrained)
    if folder_task(base_dir) is Task.IMAGE_CLASSIFICATION:
        return ImageTransferClassifier(encoder, num_labels, dropout)
    return TransferClassifier(encoder, num_labels, dropout)


def apply_strategy(model: ClassifierModel, strategy: Strategy) -> None:
    """Freeze what should stay: the whole encoder, its embeddings and lowest layers, or nothing.

    With LoRA the whole encoder stays and adapters are added to it, the only part of it to train.
    """
    model.head.requires_grad_(True)
    if strategy.kind is StrategyKind.FULL:
        model.encoder.requires_grad_(True)
        _freeze_unused_pooler(model.encoder)
        return
    model.encoder.requires_grad_(False)
    if strategy.kind is StrategyKind.FEATURE_EXTRACTION:
        return
    if strategy.kind is StrategyKind.LORA:
        model.encoder = attach_lora(model.encoder, strategy)
        return
    for layer in encoder_layers(model.encoder)[strategy.frozen_layers :]:
        layer.requires_grad_(True)
    for name in FINAL_NORMS:
        norm = getattr(model.encoder, name, None)
        if isinstance(norm, nn.Module):
            norm.requires_grad_(True)
    _freeze_unused_pooler(model.encoder)


def _freeze_unused_pooler(encoder: nn.Module) -> None:
    # Mean pooling never reads a transformer's pooler: training it would waste time, and on
    # several workers DistributedDataParallel refuses parameters that get no gradient.
    pooler = getattr(encoder, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)


def parameter_groups(model: ClassifierModel, hp: Hyperparameters) -> list[dict[str, Any]]:
    """Discriminative learning rates: the encoder at ``encoder_lr``, the head at ``head_lr``.

    Only trainable parameters join, so with LoRA the encoder's groups hold its adapters alone.
    """
    groups: list[dict[str, Any]] = []
    for part, lr in ((model.encoder, hp.encoder_lr), (model.head, hp.head_lr)):
        decay, no_decay = [], []
        for name, parameter in part.named_parameters():
            if parameter.requires_grad:
                (no_decay if name.endswith(NO_DECAY) else decay).append(parameter)
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": hp.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def save_classifier(
    model: ClassifierModel, base_dir: Path, label_names: list[str], target: Path
) -> None:
    """Write a self-contained model folder: encoder and its tokenizer or image processor, head,
    label names. The encoder folder is a base model in Hugging Face format of its own."""
    target.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(target / ENCODER_DIR, safe_serialization=True)
    load_processor(base_dir).save_pretrained(target / ENCODER_DIR)
    save_file(_contiguous(model.head.state_dict()), str(target / HEAD_FILE))
    (target / LABELS_FILE).write_text(json.dumps(label_names))


def save_lora_classifier(
    model: ClassifierModel,
    base_dir: Path,
    base_model: str,
    label_names: list[str],
    target: Path,
) -> None:
    """Write a LoRA model folder: adapters, head, label names, and the base they belong to."""
    target.mkdir(parents=True, exist_ok=True)
    save_adapter(model.encoder, target / ADAPTER_DIR)  # type: ignore[arg-type]
    save_file(_contiguous(model.head.state_dict()), str(target / HEAD_FILE))
    (target / LABELS_FILE).write_text(json.dumps(label_names))
    base = {
        "base_model": base_model,
        "path": str(base_dir),
        "fingerprint": base_fingerprint(base_dir),
    }
    (target / BASE_FILE).write_text(json.dumps(base, indent=2))


def is_lora_folder(folder: Path) -> bool:
    return (folder / BASE_FILE).is_file()


def lora_base(folder: Path) -> tuple[Path, str]:
    """The base model folder a LoRA version was trained on, and its fingerprint.

    The recorded folder is used while it exists; otherwise the recorded reference is resolved
    again (a builtin's folder moves with the installation). Either way its contents must be the
    ones the adapters were trained on.
    """
    recorded = json.loads((folder / BASE_FILE).read_text())
    base_dir = Path(recorded["path"])
    if not (base_dir / "config.json").is_file():
        base_dir = resolve_base_model(recorded["base_model"])
    found = base_fingerprint(base_dir)
    if found != recorded["fingerprint"]:
        raise ModelUnavailable(
            f"model version {folder.name!r} holds LoRA adapters for base model "
            f"{recorded['base_model']!r} with fingerprint {recorded['fingerprint'][:12]}, but "
            f"the base at {str(base_dir)!r} has fingerprint {found[:12]}; its files changed "
            "since training. Restore that base model, or train the version again",
            field="base_model",
        )
    return base_dir, found


def load_classifier(folder: Path) -> tuple[ClassifierModel, Processor, list[str]]:
    """Load a folder written by :func:`save_classifier`, ready for inference."""
    label_names = load_labels(folder)
    model = build_classifier(folder / ENCODER_DIR, len(label_names), dropout=0.0)
    model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
    model.eval()
    return model, load_processor(folder / ENCODER_DIR), label_names


def wrap_encoder(encoder: nn.Module, task: Task, num_labels: int) -> ClassifierModel:
    """A classifier around an encoder already in memory, such as a shared LoRA base."""
    if task is Task.IMAGE_CLASSIFICATION:
        return ImageTransferClassifier(encoder, num_labels, dropout=0.0)
    return TransferClassifier(encoder, num_labels, dropout=0.0)


def load_labels(folder: Path) -> list[str]:
    return list(json.loads((folder / LABELS_FILE).read_text()))


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps: the whole state, or with LoRA the adapters and the head only,
    since the frozen base can always be loaded again from its folder."""
    state = model.state_dict()
    if not has_adapters(model):
        return state
    return {key: v for key, v in state.items() if is_adapter_key(key) or key.startswith("head.")}


def save_state(model: nn.Module, path: Path) -> None:
    save_file(_contiguous(trained_state(model)), str(path))


def load_state(model: nn.Module, path: Path) -> None:
    """Load a :func:`save_state` file; every trained tensor must be in it and nothing else."""
    state = load_file(str(path))
    if not has_adapters(model):
        model.load_state_dict(state)
        return
    expected = trained_state(model).keys()
    absent, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if absent or unexpected:
        raise RuntimeError(
            f"{path.name} does not fit this LoRA model: missing {absent[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.load_state_dict(state, strict=False)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}


def copy_tree_atomically(source: Path, target: Path) -> None:
    """Copy a folder so that ``target`` either does not exist or is complete."""
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    os.replace(staging, target)
