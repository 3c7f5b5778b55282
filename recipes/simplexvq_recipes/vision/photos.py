"""A small real image data set that exists offline, for demos and tests: square tiles of natural photographs.

Sources: scikit-image's bundled photographs (always available with scikit-image) and, optionally, the pictures
of Debian's ``opencv-doc`` package (``apt-get install -y opencv-doc``). Train and validation are split by source
photograph, so no photo (and no scene: only one picture of each stereo pair is used) is on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from simplexvq_recipes.natural_patches import TRAIN_PHOTOS, VAL_PHOTOS, load_photo

SKIMAGE_TRAIN: tuple[str, ...] = TRAIN_PHOTOS
SKIMAGE_VAL: tuple[str, ...] = VAL_PHOTOS

OPENCV_DOC_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
OPENCV_DOC_TRAIN: tuple[str, ...] = (
    "aero1.jpg",
    "aloeL.jpg",
    "apple.jpg",
    "baboon.jpg",
    "board.jpg",
    "building.jpg",
    "ela_original.jpg",
    "fruits.jpg",
    "graf1.png",
    "HappyFish.jpg",
    "leuvenA.jpg",
    "orange.jpg",
    "rubberwhale1.png",
    "smarties.png",
)
OPENCV_DOC_VAL: tuple[str, ...] = ("butterfly.jpg", "home.jpg", "messi5.jpg", "squirrel_cls.jpg", "stuff.jpg")
SOURCES: tuple[str, ...] = ("skimage", "opencv-doc")


def _read_file(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def source_photos(source: str, split: str) -> list[tuple[str, np.ndarray]]:
    """(name, float32 RGB image in [0, 1]) of every photo of ``source`` in ``split`` (``train`` or ``val``)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if source == "skimage":
        names = SKIMAGE_TRAIN if split == "train" else SKIMAGE_VAL
        return [(f"skimage:{name}", load_photo(name)) for name in names]
    if source == "opencv-doc":
        if not OPENCV_DOC_DIR.is_dir():
            raise FileNotFoundError(
                f"{OPENCV_DOC_DIR} does not exist: install Debian's opencv-doc pictures with "
                "'apt-get install -y opencv-doc', or use photo_sources=[skimage]"
            )
        names = OPENCV_DOC_TRAIN if split == "train" else OPENCV_DOC_VAL
        present = [name for name in names if (OPENCV_DOC_DIR / name).is_file()]
        if not present:
            raise FileNotFoundError(f"none of the expected opencv-doc pictures {names} is in {OPENCV_DOC_DIR}")
        return [(f"opencv-doc:{name}", _read_file(OPENCV_DOC_DIR / name)) for name in present]
    raise ValueError(f"unknown photo source {source!r}; choose from {', '.join(SOURCES)}")


def tile_photo(image: np.ndarray, size: int, scale: float) -> Tensor:
    """Non-overlapping ``size`` x ``size`` tiles (N, 3, size, size) of an (H, W, 3) photo resized by ``scale``."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    if scale != 1.0:
        height, width = (max(1, round(d * scale)) for d in tensor.shape[-2:])
        tensor = F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    if min(tensor.shape[-2:]) < size:  # a photo smaller than one tile (at this scale) contributes none
        return tensor.new_zeros(0, 3, size, size)
    tiles = tensor[0].unfold(1, size, size).unfold(2, size, size)  # (3, h, w, size, size)
    return tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size).clamp(0, 1).contiguous()


class PhotoTiles(Dataset):
    """Tiles of real photographs as [0, 1] float tensors (3, size, size); ``sources[i]`` names tile i's photo."""

    def __init__(
        self, split: str, size: int, scales: Sequence[float] = (0.25, 0.5), sources: Sequence[str] = ("skimage",)
    ) -> None:
        if not sources:
            raise ValueError("photo data set: give at least one source (skimage, opencv-doc)")
        tiles, names = [], []
        for source in sources:
            for name, image in source_photos(source, split):
                for scale in scales:
                    photo_tiles = tile_photo(image, size, scale)
                    tiles.append(photo_tiles)
                    names.extend([name] * len(photo_tiles))
        self.tiles = torch.cat(tiles)
        self.sources = names
        if not len(self.tiles):
            raise ValueError(f"no {size}x{size} tile fits in the {split} photos at scales {list(scales)}")

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> Tensor:
        return self.tiles[index]
