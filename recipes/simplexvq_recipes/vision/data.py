"""Data sets and loaders of the recipe. Accelerate's ``prepare`` shards the loaders across processes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from simplexvq_recipes.vision.config import DataConfig
from simplexvq_recipes.vision.photos import PhotoTiles
from simplexvq_vision import ImageFolderDataset, center_crop_transform


def build_dataset(config: DataConfig, split: str) -> Dataset:
    """The ``train`` or ``val`` images as [0, 1] tensors (3, image_size, image_size)."""
    config.validate()
    if config.dataset == "photos":
        return PhotoTiles(split, config.image_size, scales=config.photo_scales, sources=config.photo_sources)
    folder = Path(config.root) / (config.train_split if split == "train" else config.val_split)
    return ImageFolderDataset(folder, center_crop_transform(config.image_size), on_bad_image=config.on_bad_image)


def build_loader(dataset: Dataset, config: DataConfig, *, train: bool, seed: int) -> DataLoader:
    """Training: shuffled, whole batches; evaluation: in order, every image. Both with their own generator, so
    that creating an iterator never draws from the global RNG (exact resume)."""
    return DataLoader(
        dataset,
        batch_size=config.batch_size if train else config.eval_batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=config.num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )
