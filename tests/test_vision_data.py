"""Image data: the offline photo set split by source photo, the ImageNet-layout reader and unreadable files."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from PIL import Image

from simplexvq_recipes.vision.config import DataConfig
from simplexvq_recipes.vision.data import build_dataset, build_loader
from simplexvq_recipes.vision.photos import OPENCV_DOC_DIR, PhotoTiles, tile_photo
from simplexvq_vision import ImageFolderDataset, Normalizer, UnreadableImageError, center_crop_transform


@pytest.fixture(scope="module")
def photos():
    return PhotoTiles("train", 32, scales=[0.25]), PhotoTiles("val", 32, scales=[0.25])


def test_photo_tiles_are_real_and_split_by_source_photo(photos):
    train, val = photos
    assert not set(train.sources) & set(val.sources)
    assert len(set(train.sources)) >= 8 and len(set(val.sources)) >= 5
    assert train.tiles.shape[1:] == (3, 32, 32) and len(train) > 100 and len(val) > 40
    assert 0.0 <= float(train.tiles.min()) and float(train.tiles.max()) <= 1.0
    assert float(train.tiles.std()) > 0.1  # photographs, not flat colour
    assert torch.equal(train[3], train.tiles[3])


def test_a_photo_smaller_than_one_tile_contributes_no_tiles():
    tiles = tile_photo(torch.rand(40, 100, 3).numpy(), size=64, scale=1.0)
    assert tiles.shape == (0, 3, 64, 64)
    assert tile_photo(torch.rand(130, 100, 3).numpy(), size=64, scale=1.0).shape == (2, 3, 64, 64)


@pytest.mark.skipif(not OPENCV_DOC_DIR.is_dir(), reason="optional: apt-get install -y opencv-doc")
def test_opencv_doc_pictures_are_split_by_source_too():
    train = PhotoTiles("train", 32, scales=[0.25], sources=["opencv-doc"])
    val = PhotoTiles("val", 32, scales=[0.25], sources=["opencv-doc"])
    assert not set(train.sources) & set(val.sources)
    assert all(name.startswith("opencv-doc:") for name in train.sources)


def test_missing_opencv_doc_names_the_apt_package(monkeypatch, tmp_path):
    import simplexvq_recipes.vision.photos as photos_module

    monkeypatch.setattr(photos_module, "OPENCV_DOC_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install -y opencv-doc"):
        PhotoTiles("train", 32, sources=["opencv-doc"])


@pytest.fixture()
def image_folder(tmp_path, photos):
    """An ImageNet-layout folder (root/val/<class>/<file>) of real photo tiles saved as PNG and JPEG."""
    train, _ = photos
    for index in range(6):
        folder = tmp_path / "val" / f"n0000000{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (train.tiles[index * 7].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels).resize((48, 40)).save(folder / f"img{index}.{'png' if index % 2 else 'jpg'}")
    return tmp_path


def test_image_folder_reads_the_imagenet_layout_with_center_crop(image_folder):
    config = DataConfig(dataset="imagenet", root=str(image_folder), image_size=32, eval_batch_size=4, num_workers=0)
    dataset = build_dataset(config, "val")
    assert len(dataset) == 6 and dataset.classes == ["n00000000", "n00000001"]
    image = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    batch = next(iter(build_loader(dataset, config, train=False, seed=0)))
    assert batch.shape == (4, 3, 32, 32)
    normalizer = Normalizer("imagenet")
    assert torch.allclose(normalizer.denormalize(normalizer.normalize(batch)), batch, atol=1e-6)


def test_corrupt_and_missing_files_raise_an_error_naming_them(image_folder):
    dataset = ImageFolderDataset(image_folder / "val", center_crop_transform(32))
    corrupt = dataset.samples[1][0]
    with open(corrupt, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(UnreadableImageError, match=re.escape(corrupt)) as error:
        dataset[1]
    assert "data.on_bad_image=skip" in str(error.value)  # the recipe option that skips such files
    missing = dataset.samples[2][0]
    (image_folder / "val" / missing).unlink()
    with pytest.raises(UnreadableImageError, match=re.escape(missing)):
        dataset[2]
    loader = build_loader(dataset, DataConfig(root="x", eval_batch_size=6, num_workers=0), train=False, seed=0)
    with pytest.raises(UnreadableImageError, match=re.escape(corrupt)):
        next(iter(loader))
    with pytest.raises(FileNotFoundError, match="absent"):
        ImageFolderDataset(image_folder / "absent")


def test_skip_policy_warns_naming_the_file_and_returns_the_next_image(image_folder):
    dataset = ImageFolderDataset(image_folder / "val", center_crop_transform(32), on_bad_image="skip")
    bad = dataset.samples[0][0]
    with open(bad, "wb") as file:
        file.write(b"garbage")
    with pytest.warns(RuntimeWarning, match=re.escape(bad)):
        image = dataset[0]
    assert torch.equal(image, dataset.load(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file
        dataset[0]
    assert len(dataset) == 6
    with pytest.raises(ValueError, match="on_bad_image"):
        ImageFolderDataset(image_folder / "val", on_bad_image="ignore")
