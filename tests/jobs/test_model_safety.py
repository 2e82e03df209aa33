"""Loading weights never runs code: safetensors for models, weights_only for the rest, and no
remote code from a model folder or the Hub."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest
import torch

from jobs.model import load_encoder, load_tokenizer

SOURCE_ROOTS = ("jobs", "monitoring", "server")
REPO = Path(__file__).resolve().parents[2]


def calls(name: str) -> list[tuple[str, ast.Call]]:
    """Every call of an attribute ``name`` (``x.name(...)``) in the package sources."""
    found = []
    for root in SOURCE_ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == name
                ):
                    found.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return found


def keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return "missing"


def test_every_torch_load_is_weights_only() -> None:
    loads = [
        (where, call) for where, call in calls("load") if ast.unparse(call.func) == "torch.load"
    ]
    assert loads, "the scan found no torch.load at all; is it looking in the right place?"
    unsafe = [where for where, call in loads if keyword(call, "weights_only") is not True]
    assert unsafe == [], f"torch.load without weights_only=True at {unsafe}"


def test_no_pickle_loading_in_the_sources() -> None:
    found = [
        where
        for where, call in calls("load") + calls("loads")
        if "pickle" in ast.unparse(call.func)
    ]
    assert found == []


def test_every_from_pretrained_refuses_remote_code() -> None:
    # peft's loaders have no trust_remote_code: they read an adapter's config and weights and
    # run nothing from its folder. Where they load weights is the test below.
    loads = [
        (where, call)
        for where, call in calls("from_pretrained")
        if not ast.unparse(call.func).startswith("PeftModel.")
    ]
    assert len(loads) >= 4
    trusting = [where for where, call in loads if keyword(call, "trust_remote_code") is not False]
    assert trusting == [], f"from_pretrained without trust_remote_code=False at {trusting}"
    models = [(w, c) for w, c in loads if ast.unparse(c.func) == "AutoModel.from_pretrained"]
    pickled = [where for where, call in models if keyword(call, "use_safetensors") is not True]
    assert models and pickled == [], f"AutoModel.from_pretrained without safetensors at {pickled}"


class Payload:
    """Unpickling this runs ``touch`` on a marker file: the proof a loader ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_bearing_checkpoint_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    checkpoint = tmp_path / "optimizer.pt"
    checkpoint.write_bytes(pickle.dumps({"optimizer": Payload(marker)}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(checkpoint, weights_only=True)
    assert not marker.exists()


def test_a_model_folder_with_pickled_weights_only_is_not_loaded(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    marker = tmp_path / "ran"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    load_tokenizer(folder)  # tokenizer files are data, and still load
    with pytest.raises(OSError, match="safetensors"):
        load_encoder(folder)
    assert not marker.exists()
