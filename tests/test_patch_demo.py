"""The patch demo's data and quantizer settings: one offline photo split, any core option through the spec."""

from __future__ import annotations

from simplexvq_recipes import natural_patches
from simplexvq_recipes.vision import photos


def test_one_photo_split_shared_by_the_patch_demo_and_the_vision_recipe():
    train = {*natural_patches.TRAIN_PHOTOS, *photos.SKIMAGE_TRAIN, *photos.OPENCV_DOC_TRAIN}
    val = {*natural_patches.VAL_PHOTOS, *photos.SKIMAGE_VAL, *photos.OPENCV_DOC_VAL}
    assert not train & val, f"photos on both sides of the split: {sorted(train & val)}"
    assert photos.SKIMAGE_TRAIN == natural_patches.TRAIN_PHOTOS and photos.SKIMAGE_VAL == natural_patches.VAL_PHOTOS
    assert len(set(natural_patches.TRAIN_PHOTOS)) == len(natural_patches.TRAIN_PHOTOS) >= 5
    assert len(set(natural_patches.VAL_PHOTOS)) == len(natural_patches.VAL_PHOTOS) >= 3
