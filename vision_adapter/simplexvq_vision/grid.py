"""A picture of what the autoencoder does: each original next to its reconstruction, with labels.

Columns alternate input / reconstruction; a white header names each column and, with ``title``, the run (the
quantizer method, say), so that a grid saved on its own still says what it shows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

COLUMN_LABELS: tuple[str, str] = ("input", "reconstruction")
SHORT_COLUMN_LABELS: tuple[str, str] = ("input", "recon.")


def reconstruction_grid(
    originals: Tensor,
    reconstructions: Tensor,
    pairs_per_row: int = 4,
    padding: int = 2,
    min_size: int = 96,
    *,
    labels: bool = True,
    title: str | None = None,
) -> Tensor:
    """(3, H', W') image in [0, 1]: rows of (original, reconstruction) pairs; inputs (B, 3, H, W) in [0, 1].
    Small images are enlarged by an integer factor (nearest neighbour, pixels stay visible) to ``min_size``.

    ``labels`` adds a header above the grid naming every column (``input`` / ``reconstruction``, shortened to
    ``recon.`` when the images are too narrow); ``title`` (e.g. the quantizer method) adds a first header line.
    The images below the header are the same pixels as with ``labels=False``.
    """
    if originals.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    interleaved = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)  # o0, r0, o1, r1, ...
    factor = -(-min_size // min(interleaved.shape[-2:]))
    if factor > 1:
        interleaved = F.interpolate(interleaved.float(), scale_factor=factor, mode="nearest")
    columns = min(2 * pairs_per_row, len(interleaved))
    grid = make_grid(interleaved.float().clamp(0, 1).cpu(), nrow=2 * pairs_per_row, padding=padding, pad_value=1.0)
    if not labels and title is None:
        return grid
    header = grid_header(grid.shape[-1], interleaved.shape[-1], padding, columns if labels else 0, title=title)
    return torch.cat([header, grid], dim=1)


def grid_header(
    width: int, cell_width: int, padding: int, columns: int, *, title: str | None = None, font_size: int = 12
) -> Tensor:
    """(3, h, width) white strip in [0, 1] with black text: ``title`` on a first line (if given), then the label
    of each of ``columns`` image columns (alternating input / reconstruction), each centred over its column."""
    font = ImageFont.load_default(size=font_size)
    names = COLUMN_LABELS
    if columns and max(_text_width(font, name) for name in names) > cell_width - 2:
        names = SHORT_COLUMN_LABELS
    line_height = font_size + 4
    lines = (title is not None) + (columns > 0)
    image = Image.new("RGB", (width, lines * line_height + padding), "white")
    draw = ImageDraw.Draw(image)
    top = padding
    if title is not None:
        draw.text((padding, top), title, fill="black", font=font)
        top += line_height
    for column in range(columns):
        name = names[column % 2]
        left = padding + column * (cell_width + padding)
        draw.text((left + max(0, (cell_width - _text_width(font, name)) // 2), top), name, fill="black", font=font)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return pixels.permute(2, 0, 1).contiguous()


def _text_width(font: ImageFont.ImageFont, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(right - left)
