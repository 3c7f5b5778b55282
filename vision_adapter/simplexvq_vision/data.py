"""Image plumbing: pixel normalisation, the paper's 256 x 256 center crop, and an ImageNet-layout folder reader
whose unreadable files give an error naming them (or are skipped with a warning naming them)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torchvision import datasets, transforms

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
NORMALIZATIONS: tuple[str, ...] = ("imagenet", "symmetric", "none")
BAD_IMAGE_POLICIES: tuple[str, ...] = ("error", "skip")


class Normalizer:
    """Maps pixels in [0, 1] to the model's input space and back.

    ``imagenet``: (x - mean) / std with ImageNet's channel statistics (what timm's pretrained backbones expect);
    ``symmetric``: 2x - 1, i.e. [-1, 1]; ``none``: [0, 1] unchanged. Reconstruction losses and rMSE are measured
    in this space; PSNR in [0, 1] pixel space.
    """

    def __init__(self, kind: str = "imagenet") -> None:
        if kind not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {kind!r}; choose one of {', '.join(NORMALIZATIONS)}")
        self.kind = kind
        if kind == "imagenet":
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        elif kind == "symmetric":
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def normalize(self, pixels: Tensor) -> Tensor:
        return (pixels - self.mean.to(pixels)) / self.std.to(pixels)

    def denormalize(self, inputs: Tensor) -> Tensor:
        """Back to pixels, clamped to [0, 1] (what an image file can hold)."""
        return (inputs * self.std.to(inputs) + self.mean.to(inputs)).clamp(0.0, 1.0)


def center_crop_transform(image_size: int = 256) -> Callable:
    """Resize the shorter side to ``image_size`` and take the central square (B.1), as a [0, 1] float tensor."""
    return transforms.Compose(
        [
            transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
        ]
    )


class UnreadableImageError(RuntimeError):
    """An image file that is missing, truncated or not an image; the message names the file."""


class ImageFolderDataset(datasets.ImageFolder):
    """torchvision's ``ImageFolder`` (``root/<class>/<image>``, the ImageNet train/val layout) returning only the
    transformed image, with a clear error for an unreadable file, or ``on_bad_image="skip"`` to warn (naming the
    file, once) and return the next readable image instead, so batch sizes and sharding stay unchanged."""

    def __init__(self, root: str | Path, transform: Callable | None = None, on_bad_image: str = "error") -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"image folder {root} does not exist; expected the ImageNet layout {root}/<class>/<image>.JPEG"
            )
        super().__init__(str(root), transform=transform)
        self.on_bad_image = on_bad_image
        self._warned: set[str] = set()

    def load(self, index: int) -> Tensor:
        """The transformed image at ``index``; raises :class:`UnreadableImageError` naming the file."""
        path = self.samples[index][0]
        try:
            image = self.loader(path)
            return self.transform(image) if self.transform is not None else image
        except (OSError, ValueError, SyntaxError) as error:  # PIL: missing, truncated, unidentified
            raise UnreadableImageError(
                f"cannot read image file {path}: {type(error).__name__}: {error}; to skip unreadable images with a "
                "warning instead, pass on_bad_image='skip' (the vision recipe's data.on_bad_image=skip)"
            ) from error

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        if self.on_bad_image == "error":
            return self.load(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                return self.load(candidate)
            except UnreadableImageError as error:
                path = self.samples[candidate][0]
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping unreadable image: {error}", RuntimeWarning, stacklevel=2)
        raise UnreadableImageError(f"no readable image in {self.root}")
