"""Input checks with messages that name the problem and the fix."""

from __future__ import annotations

import torch
from torch import Tensor


def check_quantizer_input(
    z: Tensor, dim: int, padding_mask: Tensor | None, *, on_device: bool = False, allow_empty: bool = False
) -> Tensor:
    """Validate ``z`` (..., dim) and ``padding_mask`` (...) and return the flat bool mask of valid positions.

    Shapes and dtypes are checked on the host. The values (some position unpadded, every unpadded value finite)
    are checked on the host too, which reads a flag back from the device; with ``on_device=True`` they are checked
    with ``torch._assert_async`` instead (no host sync: on a GPU the error surfaces at the next synchronisation, as
    a device-side assertion carrying the same message). ``allow_empty``: a batch without unpadded positions is
    accepted (a rank of a global KNN must still join its collectives).
    """
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
    if on_device:
        _check_values_on_device(z.detach().reshape(-1, dim), valid, allow_empty)
        return valid
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


def _check_values_on_device(flat: Tensor, valid: Tensor, allow_empty: bool) -> None:
    """The value checks of :func:`check_quantizer_input` as device-side assertions (nothing read back)."""
    if not allow_empty:
        torch._assert_async(
            valid.any(),
            "quantizer input holds no positions to quantize (empty or all padded); skip empty batches before calling "
            "the quantizer",
        )
    finite = torch.isfinite(flat).all(dim=-1) | ~valid
    torch._assert_async(
        finite.all(),
        "quantizer input contains NaN or Inf values at unpadded positions; the upstream network diverged or "
        "overflowed (lower the learning rate, clip gradients, or run the encoder in float32)",
    )
