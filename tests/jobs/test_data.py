from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from jobs.data import (
    DataCatalog,
    LabelledRows,
    PreparedData,
    resolve_data_path,
    stratified_split,
)
from jobs.errors import DatasetInvalid, PathRefused, TooLarge
from jobs.settings import Settings
from jobs.spec import DataSpec
from jobs.store import Store


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "ok.csv").write_text("text,label\na,0\n")
    (tmp_path / "secret.csv").write_text("text,label\nsecret,1\n")
    return data


@pytest.mark.parametrize(
    "raw",
    [
        "../secret.csv",
        "sub/../../secret.csv",
        "%2e%2e/secret.csv",
        "%252e%252e/secret.csv",
        "..%2fsecret.csv",
        "sub\\..\\..\\secret.csv",
        "/etc/passwd",
        "file:///etc/passwd",
        "http://169.254.169.254/latest",
    ],
)
def test_paths_leaving_the_data_root_are_refused(root: Path, raw: str) -> None:
    with pytest.raises(PathRefused) as caught:
        resolve_data_path(raw, root)
    assert repr(raw) in caught.value.message


def test_symlink_escaping_the_root_is_refused(root: Path) -> None:
    os.symlink(root.parent / "secret.csv", root / "link.csv")
    with pytest.raises(PathRefused, match="outside the data root"):
        resolve_data_path("link.csv", root)


def test_missing_file_is_named(root: Path) -> None:
    with pytest.raises(PathRefused, match=r"'sub/nope\.csv' does not exist"):
        resolve_data_path("sub/nope.csv", root)


def test_file_inside_the_root_resolves(root: Path) -> None:
    assert resolve_data_path("sub/ok.csv", root) == (root / "sub" / "ok.csv").resolve()


def write(settings: Settings, name: str, content: bytes) -> str:
    (settings.resolved_data_root() / name).write_bytes(content)
    return name


def load(settings: Settings, local_store: Store, path: str, **data: object) -> PreparedData:
    spec = DataSpec.model_validate({"path": path, **data})
    return DataCatalog(settings, local_store).load(spec, seed=0)


def test_missing_label_column_lists_the_columns(settings: Settings, local_store: Store) -> None:
    path = write(settings, "d.csv", b"sentence,label\nhello,1\nbye,0\n")
    with pytest.raises(DatasetInvalid, match=r"no column 'text'.*'sentence', 'label'"):
        load(settings, local_store, path)


def test_one_class_only_is_refused(settings: Settings, local_store: Store) -> None:
    path = write(settings, "d.csv", b"text,label\n" + b"good,1\n" * 10)
    with pytest.raises(DatasetInvalid, match="one class only"):
        load(settings, local_store, path)


def test_empty_dataset_is_refused(settings: Settings, local_store: Store) -> None:
    path = write(settings, "d.csv", b"text,label\n")
    with pytest.raises(DatasetInvalid, match="no rows"):
        load(settings, local_store, path)


def test_non_utf8_dataset_is_refused(settings: Settings, local_store: Store) -> None:
    path = write(settings, "d.csv", "text,label\ncafé,1\nthé,0\n".encode("latin-1"))
    with pytest.raises(DatasetInvalid, match="not UTF-8"):
        load(settings, local_store, path)


def test_jsonl_and_parquet_read_like_csv(settings: Settings, local_store: Store) -> None:
    frame = pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": [0, 1] * 5})
    frame.to_json(settings.resolved_data_root() / "d.jsonl", orient="records", lines=True)
    frame.to_parquet(settings.resolved_data_root() / "d.parquet")
    jsonl = load(settings, local_store, "d.jsonl")
    parquet = load(settings, local_store, "d.parquet")
    assert (jsonl.train, jsonl.validation) == (parquet.train, parquet.validation)
    assert jsonl.label_names == ["0", "1"]


def test_split_is_stratified_and_deterministic() -> None:
    rows = LabelledRows([f"t{i}" for i in range(100)], ["a"] * 80 + ["b"] * 20)
    train, held = stratified_split(rows, 0.2, seed=3)
    assert held.labels.count("a") == 16 and held.labels.count("b") == 4
    assert len(train) == 80
    assert stratified_split(rows, 0.2, seed=3) == (train, held)
    assert not set(train.texts) & set(held.texts)


def test_upload_over_the_limit_is_refused_and_leaves_nothing(
    settings: Settings, local_store: Store, tmp_path: Path
) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 100})
    big = tmp_path / "big.csv"
    big.write_bytes(b"text,label\n" + b"x" * 500 + b",1\n")
    with big.open("rb") as handle, pytest.raises(TooLarge, match="100 bytes"):
        DataCatalog(small, local_store).save_upload(handle, "big.csv")
    assert list(small.uploads_dir().iterdir()) == []
    assert local_store.list_datasets() == []
