"""Image datasets through the catalog: zip uploads, class folders, tables of paths, checks."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from jobs.data import DataCatalog
from jobs.errors import DatasetInvalid, PathRefused
from jobs.settings import Settings
from jobs.spec import DataSpec, Task
from jobs.store import Store
from tests.factories import digit_images, write_image_folder

IMAGE = Task.IMAGE_CLASSIFICATION


def zipped(entries: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    buffer.seek(0)
    return buffer


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def digit_entries(prefix: str = "") -> dict[str, bytes]:
    return {
        f"{prefix}{label}/{index}.png": png(image)
        for index, (image, label) in enumerate(digit_images([3, 4], per_class=6))
    }


@pytest.mark.parametrize("prefix", ["", "digits/"])
def test_a_zip_of_class_folders_becomes_a_folder_dataset(
    settings: Settings, local_store: Store, prefix: str
) -> None:
    catalog = DataCatalog(settings, local_store)
    dataset = catalog.save_upload(zipped(digit_entries(prefix)), "digits.zip")
    assert (dataset.format, dataset.rows) == ("folder", 12)
    folder = settings.resolved_data_root() / dataset.path
    assert sorted(p.name for p in folder.iterdir()) == ["3", "4"]
    assert not list(folder.parents[len(Path(prefix).parts)].glob("*.zip")), "the zip is removed"
    data = catalog.load(DataSpec(dataset=dataset.id, validation_split=0.5), seed=0, task=IMAGE)
    assert data.label_names == ["3", "4"]
    assert (len(data.train), len(data.validation)) == (6, 6)
    assert all(Path(path).is_file() for path in data.train.texts)


def test_a_zip_with_an_escaping_entry_is_refused_and_leaves_nothing(
    settings: Settings, local_store: Store
) -> None:
    entries = {**digit_entries(), "../outside.png": b"x"}
    with pytest.raises(DatasetInvalid) as caught:
        DataCatalog(settings, local_store).save_upload(zipped(entries), "digits.zip")
    assert caught.value.field == "file" and "outside.png" in caught.value.message
    assert not list(settings.uploads_dir().iterdir())
    assert not (settings.resolved_data_root().parent / "outside.png").exists()


def test_a_zip_with_a_broken_image_is_refused_naming_it(
    settings: Settings, local_store: Store
) -> None:
    entries = {**digit_entries(), "4/broken.png": b"\x89PNG\r\n\x1a\n...."}
    with pytest.raises(DatasetInvalid) as caught:
        DataCatalog(settings, local_store).save_upload(zipped(entries), "digits.zip")
    assert "4/broken.png" in caught.value.message
    assert not list(settings.uploads_dir().iterdir())


def test_a_table_names_images_relative_to_itself(settings: Settings, local_store: Store) -> None:
    root = settings.resolved_data_root() / "shop"
    write_image_folder(digit_images([1, 2], per_class=5), root / "photos")
    files = sorted((root / "photos").rglob("*.png"))
    frame = pd.DataFrame(
        {
            "photo": [p.relative_to(root).as_posix() for p in files],
            "kind": [p.parent.name for p in files],
        }
    )
    frame.to_csv(root / "items.csv", index=False)
    spec = DataSpec(path="shop/items.csv", image_column="photo", label_column="kind")
    data = DataCatalog(settings, local_store).load(spec, seed=0, task=IMAGE)
    assert sorted(data.train.texts + data.validation.texts) == sorted(str(p) for p in files)

    frame.loc[3, "photo"] = "../../../etc/passwd"
    frame.to_csv(root / "items.csv", index=False)
    with pytest.raises(PathRefused) as caught:
        DataCatalog(settings, local_store).load(spec, seed=0, task=IMAGE)
    assert caught.value.field == "data.photo" and "row 4" in caught.value.message


def test_a_folder_is_not_a_text_dataset(settings: Settings, local_store: Store) -> None:
    write_image_folder(digit_images([1, 2], per_class=2), settings.resolved_data_root() / "pics")
    with pytest.raises(DatasetInvalid, match="is a folder"):
        DataCatalog(settings, local_store).load(
            DataSpec(path="pics"), seed=0, task=Task.TEXT_CLASSIFICATION
        )
