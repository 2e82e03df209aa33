"""Image classification datasets: where images may be read from, how they are checked and decoded.

A dataset is either a folder with one subfolder per class or a table whose column names image
files relative to the table's own folder; either way no path may leave the data root. Every
image is checked at submission from its header alone (readable, a mode that converts to RGB,
not too many pixels), so a job never queues on an image that would fail it mid-epoch.

Pillow's own decompression-bomb guard warns, and past twice its limit raises, inside
``Image.open`` before the caller sees the size. Images are therefore opened with that guard
off for the moment of parsing the header, and measured against tuneloop's own, lower limit
before any pixel is decoded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import random
import re
import shutil
import stat
import threading
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
from PIL import Image, ImageEnhance, ImageFile, ImageOps, ImageStat, UnidentifiedImageError

from jobs.errors import DatasetInvalid, PathRefused
from jobs.spec import ImageAugmentation

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MAX_IMAGE_PIXELS = 40_000_000

# 16-bit greyscale is scaled to 8 bits rather than clipped as Pillow's own conversion does.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L"})
ACCEPTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"}) | SIXTEEN_BIT_MODES

SKIPPED_NAMES = frozenset({"__MACOSX"})
CHUNK_BYTES = 1024 * 1024
LISTED_IMAGE_PROBLEMS = 10
LISTED_PATH_PROBLEMS = 5
CROP_TRIES = 10
ASPECT_RATIOS = (3 / 4, 4 / 3)

_pil_limit_lock = threading.Lock()


@dataclass(frozen=True)
class ImageProblem:
    path: str
    reason: str


class _Unusable(Exception):
    """An image that cannot be used, with the reason as the user should read it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_image_folder(folder: Path) -> tuple[list[str], list[str]]:
    """Return the images under ``folder`` and, for each, the name of its class subfolder.

    Images nested deeper inside a class folder belong to that class. Hidden entries and
    ``__MACOSX`` are what archivers leave behind, not data, so they are passed over; an image at
    the top level has no class and is refused rather than dropped without a word.
    """
    if not folder.is_dir():
        raise DatasetInvalid(f"{folder.name!r} is not a folder", field="data")
    root = folder.resolve()
    entries = _visible_entries(root, root)

    loose = [e for e in entries if e.is_file() and e.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        names = ", ".join(repr(e.name) for e in loose[:3])
        more = f" and {len(loose) - 3} more" if len(loose) > 3 else ""
        raise DatasetInvalid(
            f"{folder.name!r} has images at its top level ({names}{more}); put each image in a "
            "subfolder named for its class, e.g. 'cat/1.png'",
            field="data",
        )

    paths: list[str] = []
    labels: list[str] = []
    for entry in entries:
        if entry.is_dir():
            for image in _images_under(entry, root, frozenset({root})):
                paths.append(str(image))
                labels.append(entry.name)
    if not paths:
        raise DatasetInvalid(
            f"{folder.name!r} has no images in class subfolders ({_summary(entries)}); "
            f"accepted image suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}",
            field="data",
        )
    return paths, labels


def _visible_entries(directory: Path, root: Path) -> list[Path]:
    entries = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or entry.name in SKIPPED_NAMES:
            continue
        if not entry.resolve().is_relative_to(root):
            shown = entry.relative_to(root).as_posix()
            raise PathRefused(
                f"{shown!r} in {root.name!r} is a link that resolves outside the dataset folder",
                field="data.path",
            )
        entries.append(entry)
    return entries


def _images_under(directory: Path, root: Path, above: frozenset[Path]) -> Iterator[Path]:
    resolved = directory.resolve()
    if resolved in above:  # a link back to a folder being read would loop for ever
        return
    for entry in _visible_entries(directory, root):
        if entry.is_dir():
            yield from _images_under(entry, root, above | {resolved})
        elif entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            yield entry


def _summary(entries: list[Path]) -> str:
    folders = sum(1 for e in entries if e.is_dir())
    files = [e for e in entries if not e.is_dir()]
    if not folders and not files:
        return "it is empty"
    found = []
    if folders:
        found.append(f"{folders} folder{'s' if folders != 1 else ''}")
    if files:
        suffixes = sorted({e.suffix.lower() or "no suffix" for e in files})
        found.append(
            f"{len(files)} other file{'s' if len(files) != 1 else ''} ({', '.join(suffixes)})"
        )
    return "found " + " and ".join(found)


def resolve_image_paths(
    values: list[str], table_dir: Path, data_root: Path, column: str
) -> list[str]:
    """Return the files a table column names, each relative to the table's own folder.

    ``..`` is allowed as long as the file stays under the data root, because a table beside an
    ``images/`` folder is a common layout. Rows are numbered from 1 over the data rows, a header
    not counted. Every bad row is collected so that one submission shows what to fix.
    """
    root = data_root.resolve()
    base = table_dir.resolve()
    resolved: list[str] = []
    problems: list[str] = []
    for row, raw in enumerate(values, start=1):
        try:
            resolved.append(str(_resolve_image_path(raw, base, root)))
        except _Unusable as exc:
            problems.append(f"row {row} {raw!r}: {exc.reason}")
    if problems:
        listed = "; ".join(problems[:LISTED_PATH_PROBLEMS])
        more = len(problems) - LISTED_PATH_PROBLEMS
        raise PathRefused(
            f"{len(problems)} of {len(values)} paths in column {column!r} cannot be used: {listed}"
            + (f"; and {more} more" if more > 0 else ""),
            field=f"data.{column}",
        )
    return resolved


def _resolve_image_path(raw: object, base: Path, root: Path) -> Path:
    if not isinstance(raw, str) or not raw.strip():
        raise _Unusable("empty; give a path relative to the table's folder")
    if "://" in raw or raw.startswith(("file:", "data:")):
        raise _Unusable("URLs are not read as paths")
    if "\\" in raw:
        raise _Unusable("backslashes are not allowed")
    if "\x00" in raw:
        raise _Unusable("NUL bytes are not allowed")
    if PurePosixPath(raw).is_absolute():
        raise _Unusable("absolute paths are not allowed; give a path relative to the table")
    candidate = (base / raw).resolve()
    if not candidate.is_relative_to(root):
        raise _Unusable("it resolves outside the data root")
    if not candidate.is_file():
        raise _Unusable("no such file")
    return candidate


@contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Turn Pillow's global guard off while a header is parsed; the lock keeps two threads from
    restoring each other's saved value."""
    with _pil_limit_lock:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(source: str | Path | IO[bytes], limit: int) -> ImageFile.ImageFile:
    try:
        with _own_pixel_limit():
            image = Image.open(source)
    except Exception as exc:  # Pillow's plugins raise many unrelated types for a bad file
        raise _Unusable(f"unreadable: {_describe(exc)}") from None
    width, height = image.size
    if width * height > limit:
        image.close()
        raise _Unusable(f"{width}x{height} pixels, over the limit of {limit}")
    if image.mode not in ACCEPTED_MODES:
        image.close()
        accepted = ", ".join(repr(m) for m in sorted(ACCEPTED_MODES))
        raise _Unusable(f"mode {image.mode!r} is not one of {accepted}")
    return image


def _describe(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # without the file name, which the caller shows its own way
    return str(exc) or type(exc).__name__


def image_problems(
    paths: Sequence[str | Path],
    *,
    shown_relative_to: Path | None = None,
    limit: int = MAX_IMAGE_PIXELS,
) -> list[ImageProblem]:
    """Check each image from its header and, for PNG, its chunk checksums; no pixels are
    decoded, so a large dataset is checked in the time it takes to read it."""
    problems = []
    for path in paths:
        try:
            with _open(path, limit) as image:
                try:
                    image.verify()
                except Exception as exc:  # as in _open
                    raise _Unusable(f"unreadable: {_describe(exc)}") from None
        except _Unusable as exc:
            problems.append(ImageProblem(_shown(path, shown_relative_to), exc.reason))
    return problems


def check_images(
    paths: Sequence[str | Path],
    *,
    shown_relative_to: Path | None = None,
    limit: int = MAX_IMAGE_PIXELS,
) -> None:
    problems = image_problems(paths, shown_relative_to=shown_relative_to, limit=limit)
    if not problems:
        return
    listed = "; ".join(f"{p.path!r}: {p.reason}" for p in problems[:LISTED_IMAGE_PROBLEMS])
    more = len(problems) - LISTED_IMAGE_PROBLEMS
    raise DatasetInvalid(
        f"{len(problems)} of {len(paths)} images cannot be used: {listed}"
        + (f"; and {more} more" if more > 0 else ""),
        field="data",
    )


def _shown(path: str | Path, base: Path | None) -> str:
    if base is not None:
        for candidate, folder in ((Path(path), base), (Path(path).resolve(), base.resolve())):
            if candidate.is_relative_to(folder):
                return candidate.relative_to(folder).as_posix()
    return str(path)


def load_image(path: str | Path) -> Image.Image:
    """Decode an image for training, as RGB; see ``_to_rgb`` for how other modes are mapped."""
    try:
        return _decoded(_open(path, MAX_IMAGE_PIXELS))
    except _Unusable as exc:
        raise DatasetInvalid(
            f"image {str(path)!r} cannot be used: {exc.reason}", field="data"
        ) from None


def decode_image(
    data: bytes,
    *,
    field: str,
    limit: int = MAX_IMAGE_PIXELS,
    max_bytes: int = 10 * 1024 * 1024,
) -> Image.Image:
    """Decode an image sent for prediction exactly as ``load_image`` decodes a training one, so
    that a model sees the same pixels at both ends."""
    try:
        if not data:
            raise _Unusable("empty")
        if len(data) > max_bytes:
            raise _Unusable(f"{len(data)} bytes, over the limit of {max_bytes}")
        return _decoded(_open(io.BytesIO(data), limit))
    except _Unusable as exc:
        raise DatasetInvalid(
            f"{field} cannot be used as an image: {exc.reason}", field=field
        ) from None


def decode_base64_image(
    text: str,
    *,
    field: str,
    limit: int = MAX_IMAGE_PIXELS,
    max_bytes: int = 10 * 1024 * 1024,
) -> Image.Image:
    """Accept plain base64 (standard or URL-safe alphabet, line breaks and missing padding
    forgiven) or a ``data:`` URL carrying base64; the bytes themselves decide the format."""
    payload = text.strip()
    if payload.startswith("data:"):
        header, comma, payload = payload.partition(",")
        if not comma or not header.endswith(";base64"):
            raise DatasetInvalid(
                f"{field} is a data URL without ';base64,'; send 'data:image/png;base64,...' "
                "or plain base64",
                field=field,
            )
    payload = "".join(payload.split()).translate(str.maketrans("-_", "+/"))
    if len(payload) // 4 * 3 > max_bytes:  # refused before decoding, which would copy it all
        raise DatasetInvalid(
            f"{field} cannot be used as an image: about {len(payload) // 4 * 3} bytes, over the "
            f"limit of {max_bytes}",
            field=field,
        )
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except ValueError as exc:  # binascii.Error, or a character outside ASCII
        raise DatasetInvalid(f"{field} is not valid base64: {exc}", field=field) from None
    return decode_image(data, field=field, limit=limit, max_bytes=max_bytes)


def _decoded(image: ImageFile.ImageFile) -> Image.Image:
    with image:
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except Exception as exc:  # as in _open
            raise _Unusable(f"unreadable: {_describe(exc)}") from None
    return _to_rgb(upright)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Transparent parts become white, as a viewer shows them, rather than whatever colour the
    invisible pixels happen to hold; 16-bit greyscale keeps its top 8 bits."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(pixels).convert("RGB")
    if image.mode in {"RGBA", "LA", "PA"} or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def extract_zip(archive: Path, target: Path, *, max_bytes: int, max_files: int = 100_000) -> None:
    """Extract an uploaded archive of images into ``target``, or refuse it and leave nothing.

    Every entry is checked before anything is written. The bytes written are counted as well as
    the sizes declared, because a header can understate what an entry inflates to.
    """
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"extraction target {str(target)!r} is not empty")
    existed = target.exists()
    try:
        with zipfile.ZipFile(archive) as bundle:
            entries = _checked_entries(bundle, target.resolve(), max_bytes, max_files)
            target.mkdir(parents=True, exist_ok=True)
            _write_entries(bundle, entries, target.resolve(), max_bytes)
    except zipfile.BadZipFile as exc:
        _clear(target, existed)
        raise DatasetInvalid(
            f"the upload is not a readable zip archive: {exc}", field="file"
        ) from None
    except (OSError, EOFError, zlib.error, NotImplementedError) as exc:
        _clear(target, existed)
        raise DatasetInvalid(
            f"the zip archive cannot be extracted: {_describe(exc)}", field="file"
        ) from None
    except DatasetInvalid:
        _clear(target, existed)
        raise


def _checked_entries(
    bundle: zipfile.ZipFile, root: Path, max_bytes: int, max_files: int
) -> list[zipfile.ZipInfo]:
    infos = bundle.infolist()
    if len(infos) > max_files:
        raise DatasetInvalid(
            f"the zip archive has {len(infos)} entries, over the limit of {max_files}",
            field="file",
        )
    declared = sum(info.file_size for info in infos)
    if declared > max_bytes:
        raise DatasetInvalid(
            f"the zip archive unpacks to {declared} bytes, over the limit of {max_bytes}",
            field="file",
        )
    kept = []
    for info in infos:
        reason = _entry_refusal(info, root)
        if reason:
            raise DatasetInvalid(
                f"the zip entry {info.filename!r} is refused: {reason}", field="file"
            )
        parts = PurePosixPath(info.filename).parts
        if parts and parts[0] not in SKIPPED_NAMES and not any(p.startswith(".") for p in parts):
            kept.append(info)
    return kept


def _entry_refusal(info: zipfile.ZipInfo, root: Path) -> str | None:
    name = info.filename
    if "\x00" in name:
        return "NUL bytes are not allowed"
    if "\\" in name:
        return "backslashes are not allowed"
    if name.startswith("/"):
        return "absolute paths are not allowed"
    if re.match(r"[A-Za-z]:", name):
        return "drive letters are not allowed"
    if ".." in PurePosixPath(name).parts:
        return "'..' is not allowed"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic links are not allowed"
    if info.flag_bits & 0x1:
        return "encrypted entries are not allowed"
    if not (root / name).resolve().is_relative_to(root):
        return "it would land outside the extraction folder"
    return None


def _write_entries(
    bundle: zipfile.ZipFile, entries: list[zipfile.ZipInfo], root: Path, max_bytes: int
) -> None:
    written = 0
    for info in entries:
        destination = root / info.filename
        if info.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        with bundle.open(info) as source, destination.open("xb") as out:
            for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
                written += len(chunk)
                if written > max_bytes:
                    raise DatasetInvalid(
                        f"the zip archive unpacks to more than {max_bytes} bytes, though its "
                        "headers declare less",
                        field="file",
                    )
                out.write(chunk)


def _clear(target: Path, existed: bool) -> None:
    if not target.exists():
        return
    if not existed:
        shutil.rmtree(target)
        return
    for entry in target.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


class ImageAugmenter:
    """Changes one RGB training image, the parts in the order ``ImageAugmentation`` gives.

    The rotation fills the corners it uncovers with the image's mean colour, so that no black
    wedge appears that a model could learn as a cue of augmented images. The three colour
    factors are applied in a fixed order, brightness, contrast, saturation, so the same seed
    gives the same image whatever the parameters. A disabled part draws no random number and
    leaves the image as it is.
    """

    def __init__(self, augmentation: ImageAugmentation) -> None:
        self.augmentation = augmentation

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        if image.mode != "RGB":
            raise ValueError(f"augmentation needs an RGB image, got mode {image.mode!r}")
        spec = self.augmentation
        if spec.crop_scale is not None:
            image = self._crop(image, spec.crop_scale, rng)
        if spec.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if spec.rotation_degrees > 0:
            angle = rng.uniform(-spec.rotation_degrees, spec.rotation_degrees)
            fill = tuple(round(c) for c in ImageStat.Stat(image).mean)
            image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)
        if spec.color_jitter > 0:
            low, high = 1 - spec.color_jitter, 1 + spec.color_jitter
            for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhancer(image).enhance(rng.uniform(low, high))
        return image

    @staticmethod
    def _crop(image: Image.Image, scale: tuple[float, float], rng: random.Random) -> Image.Image:
        width, height = image.size
        box = None
        log_low, log_high = math.log(ASPECT_RATIOS[0]), math.log(ASPECT_RATIOS[1])
        for _ in range(CROP_TRIES):
            area = width * height * rng.uniform(*scale)
            ratio = math.exp(rng.uniform(log_low, log_high))
            crop_w = round(math.sqrt(area * ratio))
            crop_h = round(math.sqrt(area / ratio))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left = rng.randint(0, width - crop_w)
                top = rng.randint(0, height - crop_h)
                box = (left, top, left + crop_w, top + crop_h)
                break
        if box is None:  # no try fitted: the largest centred crop whose ratio is in range
            crop_w = min(width, round(height * ASPECT_RATIOS[1]))
            crop_h = min(height, round(width / ASPECT_RATIOS[0]))
            left, top = (width - crop_w) // 2, (height - crop_h) // 2
            box = (left, top, left + crop_w, top + crop_h)
        return image.resize((width, height), Image.Resampling.BILINEAR, box=box)


def image_digest(path: str | Path) -> str:
    """A cache key for a decoded or embedded image, so that a renamed or copied file is not
    decoded twice and an edited one is not served from the cache."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()
