from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.errors import DatasetInvalid, PathRefused
from jobs.images import (
    ImageAugmenter,
    ImageProblem,
    check_images,
    decode_base64_image,
    decode_image,
    extract_zip,
    image_digest,
    image_problems,
    load_image,
    read_image_folder,
    resolve_image_paths,
)
from jobs.spec import ImageAugmentation


def save(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 6), color: object = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)  # type: ignore[arg-type]
    return path


def png_bytes(mode: str = "RGB", color: object = (10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (4, 3), color).save(buffer, "PNG")  # type: ignore[arg-type]
    return buffer.getvalue()


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG header claiming far more pixels than Pillow's own limit allows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


def noise(size: tuple[int, int] = (32, 24), seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# Folders of class subfolders


def test_read_image_folder_labels_each_image_by_its_class_folder(tmp_path: Path) -> None:
    save(tmp_path / "dog" / "c.PNG")
    save(tmp_path / "cat" / "b.jpg")
    save(tmp_path / "cat" / "a.png")
    save(tmp_path / "cat" / "nested" / "d.webp")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    save(tmp_path / "cat" / ".hidden.png")
    save(tmp_path / ".cache" / "x.png")
    save(tmp_path / "__MACOSX" / "cat" / "._a.png")

    paths, labels = read_image_folder(tmp_path)

    root = tmp_path.resolve()
    assert paths == [
        str(root / "cat" / "a.png"),
        str(root / "cat" / "b.jpg"),
        str(root / "cat" / "nested" / "d.webp"),
        str(root / "dog" / "c.PNG"),
    ]
    assert labels == ["cat", "cat", "cat", "dog"]


def test_images_at_the_top_level_are_refused(tmp_path: Path) -> None:
    save(tmp_path / "loose.png")
    save(tmp_path / "cat" / "a.png")
    with pytest.raises(DatasetInvalid, match=r"top level \('loose\.png'\)") as caught:
        read_image_folder(tmp_path)
    assert caught.value.field == "data"


def test_a_folder_without_images_says_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetInvalid, match=r"found 1 folder and 1 other file \(\.csv\)"):
        read_image_folder(tmp_path)


def test_a_link_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    outside = save(tmp_path / "outside.png")
    folder = tmp_path / "data"
    save(folder / "cat" / "a.png")
    os.symlink(outside, folder / "cat" / "b.png")
    with pytest.raises(PathRefused, match=r"'cat/b\.png'.*outside the dataset folder") as caught:
        read_image_folder(folder)
    assert caught.value.field == "data.path"


def test_a_link_inside_the_folder_is_followed_but_not_round_a_loop(tmp_path: Path) -> None:
    save(tmp_path / "cat" / "a.png")
    save(tmp_path / "dog" / "b.png")
    os.symlink(tmp_path / "cat", tmp_path / "dog" / "linked")
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "loop")
    paths, labels = read_image_folder(tmp_path)
    assert labels == ["cat", "dog", "dog"]
    assert paths[-1].endswith("dog/linked/a.png")


# Paths named by a table


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    save(root / "images" / "cat" / "a.png")
    save(root / "tables" / "b.png")
    save(tmp_path / "outside.png")
    return root


def test_table_paths_are_resolved_from_the_table_folder(data_root: Path) -> None:
    paths = resolve_image_paths(
        ["../images/cat/a.png", "b.png"], data_root / "tables", data_root, "image"
    )
    root = data_root.resolve()
    assert paths == [str(root / "images" / "cat" / "a.png"), str(root / "tables" / "b.png")]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("../../outside.png", "outside the data root"),
        ("/etc/passwd", "absolute paths"),
        ("https://example.com/a.png", "URLs"),
        ("file:///etc/passwd", "URLs"),
        ("..\\images\\cat\\a.png", "backslashes"),
        ("b.png\x00.txt", "NUL"),
    ],
)
def test_table_paths_leaving_the_root_are_refused_naming_the_row(
    data_root: Path, raw: str, reason: str
) -> None:
    with pytest.raises(PathRefused) as caught:
        resolve_image_paths(["b.png", raw], data_root / "tables", data_root, "image")
    assert caught.value.field == "data.image"
    assert f"row 2 {raw!r}: " in caught.value.message
    assert reason in caught.value.message
    assert caught.value.message.startswith("1 of 2 paths in column 'image'")


def test_missing_table_paths_are_listed_with_how_many_in_all(data_root: Path) -> None:
    values = ["b.png"] + [f"missing{i}.png" for i in range(7)]
    with pytest.raises(PathRefused) as caught:
        resolve_image_paths(values, data_root / "tables", data_root, "image")
    message = caught.value.message
    assert message.startswith("7 of 8 paths in column 'image' cannot be used")
    assert "row 2 'missing0.png': no such file" in message
    assert "row 6 'missing4.png'" in message
    assert "missing5.png" not in message
    assert message.endswith("; and 2 more")


# Checking images


def test_check_images_names_each_unusable_image(tmp_path: Path) -> None:
    good = save(tmp_path / "cat" / "good.png")
    broken = tmp_path / "cat" / "broken.png"
    broken.write_bytes(b"this is not a png")
    cmyk = save(tmp_path / "dog" / "cmyk.jpg", mode="CMYK")
    huge = tmp_path / "dog" / "huge.png"
    huge.write_bytes(huge_png(20_000, 20_000))
    paths = [str(p) for p in (good, broken, cmyk, huge)]
    pil_limit = Image.MAX_IMAGE_PIXELS

    problems = image_problems(paths, shown_relative_to=tmp_path)

    assert problems[0] == ImageProblem("cat/broken.png", "unreadable: cannot identify image file")
    assert problems[1].path == "dog/cmyk.jpg"
    assert problems[1].reason.startswith("mode 'CMYK' is not one of ")
    assert "'RGB'" in problems[1].reason
    assert problems[2] == ImageProblem(
        "dog/huge.png", "20000x20000 pixels, over the limit of 40000000"
    )
    assert len(problems) == 3
    assert pil_limit == Image.MAX_IMAGE_PIXELS
    with pytest.raises(DatasetInvalid, match=r"^3 of 4 images cannot be used: 'cat/broken\.png'"):
        check_images(paths, shown_relative_to=tmp_path)


def test_check_images_accepts_every_convertible_mode(tmp_path: Path) -> None:
    paths = [
        str(save(tmp_path / f"{name}.png", mode=mode))
        for name, mode in [("bw", "1"), ("grey", "L"), ("la", "LA"), ("p", "P"), ("rgba", "RGBA")]
    ]
    paths.append(str(save(tmp_path / "photo.jpg")))
    paths.append(str(save(tmp_path / "sixteen.png", mode="I;16")))
    check_images(paths)


def test_check_images_refuses_past_the_given_limit(tmp_path: Path) -> None:
    path = save(tmp_path / "a.png", size=(10, 10))
    check_images([path], limit=100)
    with pytest.raises(DatasetInvalid, match=r"'a\.png': 10x10 pixels, over the limit of 99"):
        check_images([path], shown_relative_to=tmp_path, limit=99)


def test_check_images_lists_ten_and_counts_the_rest(tmp_path: Path) -> None:
    paths = []
    for i in range(12):
        path = tmp_path / f"bad{i:02}.png"
        path.write_bytes(b"")
        paths.append(str(path))
    with pytest.raises(DatasetInvalid) as caught:
        check_images(paths, shown_relative_to=tmp_path)
    message = caught.value.message
    assert message.startswith("12 of 12 images cannot be used")
    assert "'bad09.png'" in message
    assert "'bad10.png'" not in message
    assert message.endswith("; and 2 more")


def test_a_corrupt_png_chunk_is_found_without_decoding(tmp_path: Path) -> None:
    data = bytearray(png_bytes())
    data[-20] ^= 0xFF  # inside the IDAT chunk, whose checksum no longer matches
    path = tmp_path / "a.png"
    path.write_bytes(bytes(data))
    [problem] = image_problems([path], shown_relative_to=tmp_path)
    assert problem.path == "a.png"
    assert problem.reason.startswith("unreadable: ")


# Decoding


def test_load_image_converts_every_accepted_mode_to_rgb(tmp_path: Path) -> None:
    grey = load_image(save(tmp_path / "grey.png", mode="L", color=90))
    assert grey.mode == "RGB"
    assert grey.getpixel((0, 0)) == (90, 90, 90)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50])
    palette.save(tmp_path / "palette.png")
    assert load_image(tmp_path / "palette.png").getpixel((0, 0)) == (200, 100, 50)

    half = save(tmp_path / "half.png", mode="RGBA", color=(0, 0, 0, 128))
    assert load_image(half).getpixel((0, 0)) == (127, 127, 127)

    clear = save(tmp_path / "clear.png", mode="RGBA", color=(255, 0, 0, 0))
    assert load_image(clear).getpixel((0, 0)) == (255, 255, 255)

    sixteen = Image.fromarray(np.full((3, 4), 40_000, dtype=np.uint16))
    sixteen.save(tmp_path / "sixteen.png")
    assert load_image(tmp_path / "sixteen.png").getpixel((0, 0)) == (156, 156, 156)


def test_load_image_refuses_an_unusable_file(tmp_path: Path) -> None:
    path = save(tmp_path / "cmyk.jpg", mode="CMYK")
    with pytest.raises(DatasetInvalid, match=r"cmyk\.jpg' cannot be used: mode 'CMYK'"):
        load_image(path)


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(png_bytes()).decode(),
        "data:image/png;base64," + base64.b64encode(png_bytes()).decode(),
        base64.urlsafe_b64encode(png_bytes()).decode().rstrip("="),
    ],
)
def test_base64_and_data_urls_decode_to_rgb(text: str) -> None:
    image = decode_base64_image(text, field="inputs[0]")
    assert image.mode == "RGB"
    assert image.size == (4, 3)
    assert image.getpixel((0, 0)) == (10, 200, 30)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not*base64!", r"^inputs\[3\] is not valid base64"),
        ("data:image/png,abcd", r"^inputs\[3\] is a data URL without ';base64,'"),
        (base64.b64encode(b"plain text").decode(), r"^inputs\[3\] cannot be used as an image"),
        ("", r"^inputs\[3\] cannot be used as an image: empty"),
    ],
)
def test_bad_base64_is_refused_naming_the_field(text: str, message: str) -> None:
    with pytest.raises(DatasetInvalid, match=message) as caught:
        decode_base64_image(text, field="inputs[3]")
    assert caught.value.field == "inputs[3]"


def test_oversize_bytes_are_refused_before_decoding() -> None:
    data = png_bytes()
    with pytest.raises(DatasetInvalid, match=rf"{len(data)} bytes, over the limit of 10"):
        decode_image(data, field="inputs[0]", max_bytes=10)
    with pytest.raises(DatasetInvalid, match=r"over the limit of 10$"):
        decode_base64_image(base64.b64encode(data).decode(), field="inputs[0]", max_bytes=10)


def test_too_many_pixels_are_refused_without_pillows_warning() -> None:
    with pytest.raises(DatasetInvalid, match=r"^inputs\[1\] .* 20000x20000 pixels") as caught:
        decode_image(huge_png(20_000, 20_000), field="inputs[1]")
    assert caught.value.field == "inputs[1]"


# Zip uploads


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in entries.items():
            bundle.writestr(name, data)
    return path


def test_a_zip_of_class_folders_is_extracted(tmp_path: Path) -> None:
    archive = write_zip(
        tmp_path / "upload.zip",
        {
            "cat/": b"",
            "cat/a.png": png_bytes(),
            "dog/b.png": png_bytes(),
            "__MACOSX/cat/._a.png": b"resource fork",
            "dog/.DS_Store": b"finder",
        },
    )
    target = tmp_path / "out"
    extract_zip(archive, target, max_bytes=10_000)
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "cat",
        "cat/a.png",
        "dog",
        "dog/b.png",
    ]
    assert (target / "cat" / "a.png").read_bytes() == png_bytes()
    assert read_image_folder(target)[1] == ["cat", "dog"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../escape.png", "'..' is not allowed"),
        ("cat/../../escape.png", "'..' is not allowed"),
        ("/tmp/escape.png", "absolute paths"),
        ("C:/escape.png", "drive letters"),
        ("cat\\..\\..\\escape.png", "backslashes"),
    ],
)
def test_zip_entries_leaving_the_target_are_refused(tmp_path: Path, name: str, reason: str) -> None:
    archive = write_zip(tmp_path / "upload.zip", {"cat/a.png": png_bytes(), name: b"x"})
    target = tmp_path / "out"
    with pytest.raises(DatasetInvalid, match=reason) as caught:
        extract_zip(archive, target, max_bytes=10_000)
    assert caught.value.field == "file"
    assert repr(name) in caught.value.message
    assert not target.exists()
    assert not (tmp_path / "escape.png").exists()


def test_a_symlink_entry_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "upload.zip"
    link = zipfile.ZipInfo("cat/link.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("cat/a.png", png_bytes())
        bundle.writestr(link, "/etc/passwd")
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(DatasetInvalid, match="symbolic links"):
        extract_zip(archive, target, max_bytes=10_000)
    assert list(target.iterdir()) == []


def test_a_zip_over_its_declared_limits_is_refused(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "upload.zip", {"cat/a.png": b"\0" * 5000, "dog/b.png": b"x"})
    target = tmp_path / "out"
    with pytest.raises(DatasetInvalid, match="unpacks to 5001 bytes, over the limit of 5000"):
        extract_zip(archive, target, max_bytes=5000)
    with pytest.raises(DatasetInvalid, match="2 entries, over the limit of 1"):
        extract_zip(archive, target, max_bytes=10_000, max_files=1)
    assert not target.exists()


def test_a_zip_understating_its_sizes_leaves_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:
        bundle.writestr("cat/a.png", png_bytes())
        bundle.writestr("cat/big.png", b"\xff" * 4000)
    data = bytearray(archive.read_bytes())
    first = data.index(b"PK\x01\x02")
    central = data.index(b"PK\x01\x02", first + 4)  # big.png's central directory record
    data[central + 20 : central + 28] = struct.pack("<II", 10, 10)
    archive.write_bytes(bytes(data))
    target = tmp_path / "out"
    with pytest.raises(DatasetInvalid) as caught:
        extract_zip(archive, target, max_bytes=1000)
    assert caught.value.field == "file"
    assert not target.exists()


def test_an_encrypted_or_non_zip_upload_is_refused(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "upload.zip", {"cat/a.png": png_bytes()})
    data = bytearray(archive.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 8] |= 0x1
    archive.write_bytes(bytes(data))
    with pytest.raises(DatasetInvalid, match="encrypted"):
        extract_zip(archive, tmp_path / "out", max_bytes=10_000)

    not_zip = tmp_path / "upload.txt"
    not_zip.write_text("hello")
    with pytest.raises(DatasetInvalid, match="not a readable zip archive"):
        extract_zip(not_zip, tmp_path / "out", max_bytes=10_000)
    assert not (tmp_path / "out").exists()


# Augmentation


ALL_OFF = {"crop_scale": None, "flip": False, "rotation_degrees": 0, "color_jitter": 0}


def augment(seed: int, image: Image.Image | None = None, **parts: object) -> Image.Image:
    spec = ImageAugmentation(**parts)  # type: ignore[arg-type]
    return ImageAugmenter(spec)(image or noise(), random.Random(seed))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_augmentation_is_deterministic_for_a_seed_and_keeps_the_size() -> None:
    first = augment(7, crop_scale=(0.5, 0.9), rotation_degrees=20, color_jitter=0.3)
    again = augment(7, crop_scale=(0.5, 0.9), rotation_degrees=20, color_jitter=0.3)
    other = augment(8, crop_scale=(0.5, 0.9), rotation_degrees=20, color_jitter=0.3)
    assert first.size == (32, 24)
    assert first.mode == "RGB"
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))
    assert not np.array_equal(pixels(first), pixels(noise()))


def test_augmentation_with_every_part_off_leaves_the_pixels() -> None:
    assert np.array_equal(pixels(augment(3, **ALL_OFF)), pixels(noise()))


@pytest.mark.parametrize(
    "part",
    [
        {"crop_scale": (0.3, 0.5)},
        {"rotation_degrees": 45},
        {"color_jitter": 0.5},
    ],
)
def test_each_augmentation_part_alone_changes_the_image(part: dict[str, object]) -> None:
    result = augment(1, **{**ALL_OFF, **part})
    assert result.size == (32, 24)
    assert not np.array_equal(pixels(result), pixels(noise()))


def test_flip_alone_mirrors_about_half_the_time() -> None:
    original = pixels(noise())
    mirrored = original[:, ::-1]
    flipped = 0
    for seed in range(40):
        result = pixels(augment(seed, **{**ALL_OFF, "flip": True}))
        assert np.array_equal(result, original) or np.array_equal(result, mirrored)
        flipped += np.array_equal(result, mirrored)
    assert 10 <= flipped <= 30


def test_a_crop_that_never_fits_falls_back_to_the_centre() -> None:
    wide = noise((64, 8))
    result = augment(0, wide, **{**ALL_OFF, "crop_scale": (1.0, 1.0)})
    centre = wide.resize((64, 8), Image.Resampling.BILINEAR, box=(26, 0, 37, 8))
    assert np.array_equal(pixels(result), pixels(centre))


def test_rotation_fills_the_corners_with_the_mean_colour() -> None:
    flat = Image.new("RGB", (20, 20), (40, 80, 120))
    result = augment(2, flat, **{**ALL_OFF, "rotation_degrees": 45})
    assert result.getpixel((0, 0)) == (40, 80, 120)


def test_image_digest_depends_on_the_bytes_only(tmp_path: Path) -> None:
    first = save(tmp_path / "a.png")
    second = tmp_path / "copy" / "b.png"
    second.parent.mkdir()
    second.write_bytes(first.read_bytes())
    assert image_digest(first) == image_digest(str(second))
    assert image_digest(first) == hashlib.sha256(first.read_bytes()).hexdigest()
    assert image_digest(first) != image_digest(save(tmp_path / "c.png", color=(1, 2, 3)))
