"""Real natural-image patches that exist offline: scikit-image's bundled photographs, split by source image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

# The one train / validation split of the photographs bundled inside the scikit-image wheel (no download), used by
# the patch demo and the vision recipe's photo tiles (:mod:`simplexvq_recipes.vision.photos`). No photo is on both
# sides.
TRAIN_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "camera",
    "coins",
    "grass",
    "brick",
)
VAL_PHOTOS: tuple[str, ...] = ("chelsea", "immunohistochemistry", "gravel", "moon", "clock")


@dataclass(kw_only=True)
class PatchSplits:
    """Flattened RGB patches in [0, 1]: ``train`` (N, 3 * size * size) and ``val`` likewise."""

    train: Tensor
    val: Tensor
    patch_size: int


def load_photo(name: str) -> np.ndarray:
    """One bundled scikit-image photo as float32 RGB in [0, 1], shape (H, W, 3)."""
    import skimage.data
    from skimage.util import img_as_float32

    try:
        image = getattr(skimage.data, name)()
    except (AttributeError, ModuleNotFoundError, OSError) as error:
        raise RuntimeError(
            f"scikit-image photo {name!r} is not available offline ({error}); install scikit-image>=0.20 or pick "
            "another name from skimage.data"
        ) from error
    image = img_as_float32(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def extract_patches(image: np.ndarray, patch_size: int) -> Tensor:
    """All non-overlapping ``patch_size`` x ``patch_size`` patches of an (H, W, 3) image, flattened."""
    tensor = torch.from_numpy(image).permute(2, 0, 1)  # (3, H, W)
    patches = tensor.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size)  # (3, h, w, p, p)
    return patches.permute(1, 2, 0, 3, 4).reshape(-1, 3 * patch_size * patch_size)


def load_patch_splits(patch_size: int = 4) -> PatchSplits:
    """Patches of the training photos and of the (disjoint) validation photos."""

    def gather(names: tuple[str, ...]) -> Tensor:
        return torch.cat([extract_patches(load_photo(name), patch_size) for name in names])

    return PatchSplits(train=gather(TRAIN_PHOTOS), val=gather(VAL_PHOTOS), patch_size=patch_size)
