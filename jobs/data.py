"""Datasets: where rows may be read from, how they are parsed, and what makes them usable.

Every path a spec names is resolved under the data root and refused if it leaves it, however
it is spelled. A dataset is checked in full at submission, so a job never queues on data that
would fail it: for images, every file's header is read and every unusable image named.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import unquote

import numpy as np
import pandas as pd

from jobs.errors import DatasetInvalid, NotFound, PathRefused, TooLarge
from jobs.images import (
    check_images,
    extract_zip,
    image_digest,
    read_image_folder,
    resolve_image_paths,
)
from jobs.remote import fetch
from jobs.settings import Settings
from jobs.spec import DataSpec, Task
from jobs.store import Dataset, Store, new_id

log = logging.getLogger(__name__)

FORMATS_BY_SUFFIX = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
# An uploaded zip is a folder of images, one subfolder per class.
UPLOAD_SUFFIXES = {**FORMATS_BY_SUFFIX, ".zip": "folder"}
CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class LabelledRows:
    """Inputs and their labels: texts, or for images absolute paths of image files."""

    texts: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class PreparedData:
    train: LabelledRows
    validation: LabelledRows
    label_names: list[str]
    sha256: str

    def label_ids(self, rows: LabelledRows) -> list[int]:
        index = {name: i for i, name in enumerate(self.label_names)}
        return [index[label] for label in rows.labels]


def resolve_data_path(raw: str, data_root: Path, *, folders: bool = False) -> Path:
    """Return the file (or with ``folders`` the file or folder) ``raw`` names under
    ``data_root``, or refuse it.

    Refused: absolute paths, URLs, backslashes, any ``..`` (also percent-encoded, once or more),
    and symlinks that resolve outside the root.
    """
    decoded = raw
    for _ in range(5):  # double- and triple-encoded traversal must decode to its real form
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    reason = None
    if "://" in decoded or decoded.startswith("file:"):
        reason = "URLs are not read as paths"
    elif "\\" in decoded:
        reason = "backslashes are not allowed"
    elif decoded.startswith("/") or PurePosixPath(decoded).is_absolute():
        reason = "absolute paths are not allowed; give a path relative to the data root"
    elif ".." in PurePosixPath(decoded).parts:
        reason = "'..' is not allowed"
    elif "\x00" in decoded:
        reason = "NUL bytes are not allowed"
    if reason:
        raise PathRefused(f"dataset path {raw!r} refused: {reason}", field="data.path")

    root = data_root.resolve()
    candidate = (root / decoded).resolve()
    if not candidate.is_relative_to(root):
        raise PathRefused(
            f"dataset path {raw!r} refused: it resolves outside the data root", field="data.path"
        )
    if not (candidate.is_file() or (folders and candidate.is_dir())):
        raise PathRefused(
            f"dataset path {raw!r} does not exist under the data root {str(root)!r}",
            field="data.path",
        )
    return candidate


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        return "folder"
    found = FORMATS_BY_SUFFIX.get(path.suffix.lower())
    if found is None:
        accepted = ", ".join(sorted(FORMATS_BY_SUFFIX))
        raise DatasetInvalid(
            f"cannot tell the format of {path.name!r}; name it with one of {accepted} "
            "or set data.format",
            field="data.format",
        )
    return found


def read_table(path: Path, fmt: str) -> pd.DataFrame:
    """Parse a dataset file; text files must be UTF-8."""
    if fmt == "parquet":
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise DatasetInvalid(f"{path.name!r} is not a readable Parquet file: {exc}") from None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetInvalid(
            f"{path.name!r} is not UTF-8: invalid byte at offset {exc.start}"
        ) from None
    try:
        if fmt == "csv":
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        return pd.read_json(io.StringIO(text), lines=True, dtype=False)
    except (ValueError, pd.errors.ParserError) as exc:
        raise DatasetInvalid(f"{path.name!r} is not valid {fmt.upper()}: {exc}") from None


def labelled_rows(
    frame: pd.DataFrame, spec: DataSpec, name: str, task: Task = Task.TEXT_CLASSIFICATION
) -> LabelledRows:
    """Pick the input and label columns out of ``frame``, refusing what cannot be trained on."""
    input_role = "image_column" if task is Task.IMAGE_CLASSIFICATION else "text_column"
    input_column = getattr(spec, input_role)
    for role, column in ((input_role, input_column), ("label_column", spec.label_column)):
        if column not in frame.columns:
            available = ", ".join(repr(str(c)) for c in frame.columns)
            raise DatasetInvalid(
                f"{name!r} has no column {column!r} (data.{role}); its columns are: {available}",
                field=f"data.{role}",
            )
    if frame.empty:
        raise DatasetInvalid(f"{name!r} has no rows", field="data")
    texts = frame[input_column]
    labels = frame[spec.label_column]
    missing = int((texts.isna() | (texts.astype(str).str.strip() == "")).sum())
    if missing:
        raise DatasetInvalid(
            f"{name!r} has {missing} rows with an empty {input_column!r}", field="data"
        )
    if labels.isna().any():
        raise DatasetInvalid(
            f"{name!r} has {int(labels.isna().sum())} rows without a {spec.label_column!r}",
            field="data.label_column",
        )
    return LabelledRows(texts=texts.astype(str).tolist(), labels=labels.astype(str).tolist())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


class DataCatalog:
    """Finds, reads and checks the datasets a spec names."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    def locate(
        self, dataset_id: str | None, path: str | None, field: str, *, folders: bool = False
    ) -> Path:
        root = self.settings.resolved_data_root()
        if dataset_id is not None:
            try:
                dataset = self.store.get_dataset(dataset_id)
            except NotFound:
                raise NotFound(f"no uploaded dataset {dataset_id!r}", field=field) from None
            return root / dataset.path
        assert path is not None
        try:
            return resolve_data_path(path, root, folders=folders)
        except PathRefused as exc:
            raise PathRefused(exc.message, field=field) from None

    def rows(
        self,
        dataset_id: str | None,
        path: str | None,
        spec: DataSpec,
        task: Task,
        field: str,
    ) -> tuple[LabelledRows, str]:
        """One dataset's labelled rows, checked, and a digest of its contents.

        Text rows come from a table. Image rows come from a folder of class folders, or from
        a table whose image column names files relative to the table; every image is checked.
        """
        images = task is Task.IMAGE_CLASSIFICATION
        location = self.locate(dataset_id, path, field, folders=True)
        fmt = detect_format(location, spec.format)
        if not images:
            if fmt == "folder":
                raise DatasetInvalid(
                    f"{location.name!r} is a folder; a text dataset is a CSV, JSONL or Parquet "
                    "file",
                    field=field,
                )
            rows = labelled_rows(read_table(location, fmt), spec, location.name)
            return rows, file_sha256(location)
        if fmt == "folder":
            if not location.is_dir():
                raise DatasetInvalid(
                    f"{location.name!r} is a file, but data.format says 'folder'", field=field
                )
            paths, labels = read_image_folder(location)
            rows = LabelledRows(paths, labels)
        else:
            table = labelled_rows(read_table(location, fmt), spec, location.name, task)
            root = self.settings.resolved_data_root()
            paths = resolve_image_paths(table.texts, location.parent, root, spec.image_column)
            rows = LabelledRows(paths, table.labels)
        check_images(rows.texts, shown_relative_to=self.settings.resolved_data_root())
        digest = hashlib.sha256()
        for image, label in zip(rows.texts, rows.labels, strict=True):
            digest.update(f"{image_digest(image)}:{label}\n".encode())
        return rows, digest.hexdigest()

    def load(
        self, spec: DataSpec, *, seed: int, task: Task = Task.TEXT_CLASSIFICATION
    ) -> PreparedData:
        """Read, check and split the data a spec names; deterministic for a given seed."""
        train_field = "data.dataset" if spec.dataset else "data.path"
        train, train_digest = self.rows(spec.dataset, spec.path, spec, task, train_field)
        train_name = spec.dataset or spec.path or ""
        digest = hashlib.sha256(train_digest.encode())

        if spec.has_validation_file:
            field = "data.validation_dataset" if spec.validation_dataset else "data.validation_path"
            validation, val_digest = self.rows(
                spec.validation_dataset, spec.validation_path, spec, task, field
            )
            digest.update(val_digest.encode())
        else:
            train, validation = stratified_split(train, spec.validation_split, seed)
            digest.update(f"split={spec.validation_split},seed={seed}".encode())

        label_names = sorted(set(train.labels))
        if len(label_names) < 2:
            raise DatasetInvalid(
                f"{train_name!r} has one class only ({label_names[0]!r}); a classifier "
                "needs at least two",
                field="data.label_column",
            )
        unknown = sorted(set(validation.labels) - set(label_names))
        if unknown:
            raise DatasetInvalid(
                f"the validation rows have labels the training rows lack: {unknown}",
                field="data.label_column",
            )
        if len(validation) == 0:
            raise DatasetInvalid("the validation split is empty; give more rows", field="data")
        return PreparedData(train, validation, label_names, digest.hexdigest())

    def save_upload(self, stream: BinaryIO, filename: str, *, name: str | None = None) -> Dataset:
        """Store an uploaded file under the data root, refusing it past the size limit.

        A zip of images is unpacked into a folder (entries that would land outside it are
        refused) and checked image by image, so a bad upload is refused with every bad file.
        """
        suffix = Path(filename).suffix.lower()
        fmt = UPLOAD_SUFFIXES.get(suffix)
        if fmt is None:
            accepted = ", ".join(sorted(UPLOAD_SUFFIXES))
            raise DatasetInvalid(
                f"upload {filename!r} has suffix {suffix!r}; accepted: {accepted}", field="file"
            )
        dataset_id = new_id("ds")
        folder = Path("uploads") / dataset_id
        target = self.settings.resolved_data_root() / folder / f"data{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        size, digest = self._copy_limited(stream, target)
        try:
            if fmt == "folder":
                images = self._unpack_images(target, target.parent / "images")
                relative = folder / images.relative_to(target.parent)
                rows = len(read_image_folder(images)[0])
            else:
                relative = folder / target.name
                rows = len(read_table(target, fmt))
        except (DatasetInvalid, PathRefused):
            shutil.rmtree(target.parent, ignore_errors=True)
            raise
        dataset = Dataset(
            id=dataset_id,
            name=name or filename,
            path=str(relative),
            format=fmt,
            sha256=digest,
            size_bytes=size,
            rows=rows,
        )
        (target.parent / "meta.json").write_text(json.dumps({"filename": filename}))
        log.info("dataset %s: stored %r, %d rows, %d bytes", dataset_id, filename, rows, size)
        return self.store.add_dataset(dataset)

    def _unpack_images(self, archive: Path, target: Path) -> Path:
        """Unpack a zip of class folders and check every image; the archive is then removed.

        Returns the folder that holds the class folders: ``target``, or the one folder inside
        it when the zip wraps everything in a folder of its own, as zipping a folder does.
        """
        try:
            extract_zip(archive, target, max_bytes=self.settings.max_upload_bytes * 4)
            entries = [e for e in target.iterdir() if not e.name.startswith((".", "__MACOSX"))]
            classes = target
            if len(entries) == 1 and entries[0].is_dir():
                inside = [e for e in entries[0].iterdir() if not e.name.startswith(".")]
                if inside and all(e.is_dir() for e in inside):
                    classes = entries[0]
            paths, _ = read_image_folder(classes)
            check_images(paths, shown_relative_to=classes)
        except (DatasetInvalid, PathRefused) as exc:
            raise type(exc)(exc.message, field="file") from None
        archive.unlink()
        return classes

    def import_url(self, url: str, *, name: str | None = None) -> Dataset:
        """Fetch a dataset from an http(s) URL through the guard in jobs/remote.py and store it
        like an upload; the URL's file name gives the format."""
        with tempfile.TemporaryDirectory(dir=self.settings.uploads_dir()) as folder:
            download = Path(folder) / "download"
            filename = fetch(url, self.settings, download)
            with download.open("rb") as stream:
                try:
                    return self.save_upload(stream, filename, name=name or url)
                except DatasetInvalid as exc:
                    raise DatasetInvalid(exc.message, field="url") from None

    def _copy_limited(self, stream: BinaryIO, target: Path) -> tuple[int, str]:
        limit = self.settings.max_upload_bytes
        digest = hashlib.sha256()
        size = 0
        with target.open("wb") as out:
            for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
                size += len(chunk)
                if size > limit:
                    out.close()
                    os.unlink(target)
                    target.parent.rmdir()
                    raise TooLarge(f"upload is over the limit of {limit} bytes", field="file")
                digest.update(chunk)
                out.write(chunk)
        return size, digest.hexdigest()


def stratified_split(
    rows: LabelledRows, fraction: float, seed: int
) -> tuple[LabelledRows, LabelledRows]:
    """Hold out ``fraction`` of each class, at least one row of each class with two or more."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(rows.labels)
    held: list[int] = []
    for label in sorted(set(rows.labels)):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        take = round(len(members) * fraction)
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        held.extend(members[:take].tolist())
    held_set = set(held)
    kept = [i for i in range(len(rows)) if i not in held_set]

    def pick(indices: list[int]) -> LabelledRows:
        return LabelledRows([rows.texts[i] for i in indices], [rows.labels[i] for i in indices])

    return pick(kept), pick(sorted(held))
