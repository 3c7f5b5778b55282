"""Input checks with messages that name the problem and the fix."""

from __future__ import annotations

import torch
from torch import Tensor


def check_quantizer_input(z: Tensor, dim: int, padding_mask: Tensor | None) -> Tensor:
    """Validate ``z`` (..., dim) and ``padding_mask`` (...) and return the flat bool mask of valid positions."""
    if not isinstance(z, Tensor):
        raise TypeError(f"quantizer input must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() < 2:
        raise ValueError(
            f"quantizer input must have shape (..., {dim}) with at least one leading (batch) dimension, got "
            f"shape {tuple(z.shape)}; use z.unsqueeze(0) for a single vector"
        )
    if z.shape[-1] != dim:
        raise ValueError(
            f"quantizer input has feature size {z.shape[-1]} in its last dimension but the quantizer was built "
            f"with dim={dim}; move the features to the last dimension (e.g. images: B, H, W, C) or rebuild the "
            "quantizer with the right dim"
        )
    if not z.is_floating_point():
        raise TypeError(f"quantizer input must be a floating-point tensor, got {z.dtype}")
    if padding_mask is None:
        valid = torch.ones(z.shape[:-1].numel(), dtype=torch.bool, device=z.device)
    else:
        if padding_mask.shape != z.shape[:-1]:
            raise ValueError(
                f"padding_mask must have the input's shape without the feature dimension, {tuple(z.shape[:-1])}, "
                f"got {tuple(padding_mask.shape)}"
            )
        if padding_mask.dtype != torch.bool:
            raise TypeError(f"padding_mask must be a bool tensor (True = padded), got {padding_mask.dtype}")
        valid = ~padding_mask.reshape(-1)
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            f"quantizer input holds no positions to quantize (shape {tuple(z.shape)}"
            + (", all padded" if padding_mask is not None and z.shape[:-1].numel() else "")
            + "); skip empty batches before calling the quantizer"
        )
    flat = z.detach().reshape(-1, dim)[valid]
    if not torch.isfinite(flat).all():
        bad = (~torch.isfinite(flat)).any(dim=-1).sum().item()
        kind = "NaN" if torch.isnan(flat).any() else "Inf"
        raise ValueError(
            f"quantizer input contains {kind} values at {bad} of {num_valid} unpadded positions; the upstream "
            "network diverged or overflowed (lower the learning rate, clip gradients, or run the encoder in "
            "float32)"
        )
    return valid
