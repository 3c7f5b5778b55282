"""A picture of what the autoencoder does: each original next to its reconstruction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid


def reconstruction_grid(
    originals: Tensor, reconstructions: Tensor, pairs_per_row: int = 4, padding: int = 2, min_size: int = 96
) -> Tensor:
    """(3, H', W') image in [0, 1]: rows of (original, reconstruction) pairs; inputs (B, 3, H, W) in [0, 1].
    Small images are enlarged by an integer factor (nearest neighbour, pixels stay visible) to ``min_size``."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    interleaved = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)  # o0, r0, o1, r1, ...
    factor = -(-min_size // min(interleaved.shape[-2:]))
    if factor > 1:
        interleaved = F.interpolate(interleaved.float(), scale_factor=factor, mode="nearest")
    return make_grid(interleaved.float().clamp(0, 1).cpu(), nrow=2 * pairs_per_row, padding=padding, pad_value=1.0)
