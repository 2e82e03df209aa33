"""LoRA: low-rank adapters trained on a frozen encoder, and the base model they belong to.

A LoRA model version keeps only what training changed, the adapters and the head. The base
stays in its own folder and the version names it by that folder and a fingerprint of its
contents, so an adapter is never applied to weights it was not trained on. Adapters are written
in peft's own layout (``adapter_config.json`` and ``adapter_model.safetensors``), which
``peft.PeftModel.from_pretrained`` reads as it is.

peft is imported where an adapter is made or saved, not with this module: its import takes
seconds, and every job process, training worker and predictor replica imports this module
whether or not it ever sees an adapter.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModel

from jobs.errors import SpecInvalid
from jobs.spec import Strategy

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Mean pooling never reads the pooler, so an adapter there would get no gradient: wasted
# parameters on one worker, and an error from DistributedDataParallel on several.
POOLER = r"(.*\.)?pooler(\..*)?"
ADAPTER_MARK = "lora_"
# What makes a base model: its configuration, its weights and its tokenizer. Read-me files,
# sentence-transformers settings and the like may change without changing an adapter's meaning.
BASE_FILE_PATTERNS = (
    "config.json",
    "preprocessor_config.json",
    "*.safetensors",
    "tokenizer*.json",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.model",
)
READ_CHUNK = 1 << 20


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the one deprecation peft 0.21 triggers in transformers 5 when it wraps a model.

    Remove once peft reads ``is_activation_checkpointing`` instead of the deprecated
    ``is_gradient_checkpointing``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        yield


def lora_config(strategy: Strategy, encoder: nn.Module) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=strategy.rank,
        lora_alpha=strategy.alpha,
        lora_dropout=strategy.dropout,
        target_modules=list(strategy.target_modules),
        exclude_modules=POOLER if hasattr(encoder, "pooler") else None,
        bias="none",
    )


def attach_lora(encoder: nn.Module, strategy: Strategy) -> PeftModel:
    """Wrap a frozen encoder with fresh, trainable adapters on the strategy's target modules."""
    from peft import get_peft_model

    with quiet_peft():
        return get_peft_model(encoder, lora_config(strategy, encoder))


def has_adapters(model: nn.Module) -> bool:
    peft = sys.modules.get("peft")  # no model can hold a PeftModel before peft is imported
    return peft is not None and any(isinstance(m, peft.PeftModel) for m in model.modules())


def is_adapter_key(key: str) -> bool:
    return ADAPTER_MARK in key


def save_adapter(encoder: PeftModel, target: Path) -> None:
    """Write the adapters in peft's layout, without the model card peft would add."""
    from peft import get_peft_model_state_dict

    target.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(encoder)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()}, str(target / ADAPTER_WEIGHTS)
    )
    encoder.peft_config["default"].save_pretrained(str(target))


def linear_layers(base_dir: Path) -> dict[str, nn.Linear]:
    """The encoder's linear layers an adapter may target, by module name, built without weights."""
    config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)
    with torch.device("meta"):
        encoder = AutoModel.from_config(config, trust_remote_code=False)
    return {
        name: module
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear) and not re.fullmatch(POOLER, name)
    }


def check_lora(strategy: Strategy, base_dir: Path) -> None:
    """Refuse target modules the base model lacks, and a rank above what they can hold."""
    layers = linear_layers(base_dir)
    targeted: list[nn.Linear] = []
    for target in strategy.target_modules:
        matched = [m for name, m in layers.items() if name == target or name.endswith(f".{target}")]
        if not matched:
            names = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in layers}))
            raise SpecInvalid(
                f"strategy.target_modules: {target!r} names no linear layer of the base model; "
                f"its linear layers are named {names or '(none)'}",
                field="strategy.target_modules",
            )
        targeted.extend(matched)
    widest = min(min(m.in_features, m.out_features) for m in targeted)
    if strategy.rank > widest:
        raise SpecInvalid(
            f"strategy.rank is {strategy.rank} but the targeted layers have {widest} features; "
            f"give 1 to {widest}",
            field="strategy.rank",
        )


def base_fingerprint(folder: Path) -> str:
    """A content hash of the files that make a base model; equal hashes mean the same model."""
    files = sorted(
        {path for pattern in BASE_FILE_PATTERNS for path in folder.glob(pattern) if path.is_file()}
    )
    signature = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_files(str(folder.resolve()), signature)


@functools.lru_cache(maxsize=32)
def _hash_files(folder: str, signature: tuple[tuple[str, int, int], ...]) -> str:
    """Hash once per process and file state: a base is read in full each time it is hashed."""
    digest = hashlib.sha256()
    for name, _, _ in signature:
        digest.update(f"{name}\0".encode())
        with (Path(folder) / name).open("rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
