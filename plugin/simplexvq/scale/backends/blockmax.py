"""Maxima of blocks of columns: a fast first-index argmax and a cheap bound on which entries can pass a threshold.

``torch.max(x, dim=-1)`` (values and indices) and ``torch.argmax`` are not vectorised on the CPU: on a (255, 8196)
float32 chunk they take 2-3 ms, against 0.1-0.2 ms for ``amax`` over blocks of 64 columns. :class:`BlockMaxima`
keeps those block maxima; the row maximum, the first index where it occurs (the same index as ``torch.argmax``)
and the bound of :func:`simplexvq.scale.backends.candidates.merge_scores` (no entry of a block exceeds its maximum) are
derived from them with a few small operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BLOCK_WIDTH", "BlockMaxima"]

BLOCK_WIDTH = 64


@dataclass
class BlockMaxima:
    """Maxima over the last dimension of ``values`` (..., M), by blocks of ``width`` columns.

    ``full`` (..., M // width): maximum of each full block; ``tail`` (...) maximum of the last ``M % width`` columns
    (``None`` when M is a multiple of ``width``); ``top`` (...) the maximum of the row.
    """

    values: Tensor
    full: Tensor
    tail: Tensor | None
    top: Tensor
    width: int

    @classmethod
    def of(cls, values: Tensor, width: int = BLOCK_WIDTH) -> BlockMaxima:
        if values.shape[-1] == 0:
            raise ValueError("BlockMaxima: the last dimension must not be empty")
        size = values.shape[-1]
        blocks = size // width
        full = values[..., : blocks * width].unflatten(-1, (blocks, width)).amax(dim=-1)
        tail = values[..., blocks * width :].amax(dim=-1) if size % width else None
        if tail is None:
            top = full.amax(dim=-1)
        elif blocks == 0:
            top = tail
        else:
            top = torch.maximum(full.amax(dim=-1), tail)
        return cls(values=values, full=full, tail=tail, top=top, width=width)

    @property
    def covered(self) -> int:
        """Number of leading columns in full blocks."""
        return self.full.shape[-1] * self.width

    def argmax(self) -> Tensor:
        """First index of each row's maximum (long, shape ``values.shape[:-1]``), as ``torch.argmax(values, -1)``."""
        lead = self.values.shape[:-1]
        values = self.values.reshape(-1, self.values.shape[-1])
        top = self.top.reshape(-1, 1)
        blocks = self.full.shape[-1]
        index = None
        if blocks:
            hit = self.full.reshape(-1, blocks) == top
            block = _first_true(hit)  # the first block holding the maximum (0 if none does)
            rows = torch.arange(values.shape[0], device=values.device)
            window = values[:, : self.covered].unflatten(-1, (blocks, self.width))[rows, block]
            index = block * self.width + _first_true(window == top)
        if self.tail is not None:
            in_tail = self.covered + _first_true(values[:, self.covered :] == top)
            index = in_tail if index is None else torch.where(hit.any(dim=-1), index, in_tail)
        return index.reshape(lead)


def _first_true(mask: Tensor) -> Tensor:
    """Index of the first True along the last dimension (0 for an all-False row)."""
    return mask.to(torch.uint8).argmax(dim=-1)
