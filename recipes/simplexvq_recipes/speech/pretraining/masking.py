"""Time masking and distractor sampling of wav2vec 2.0 pretraining (appendix B.2).

Random draws come from ``generator`` when one is given (validation uses its own, so it never disturbs the training
RNG), else from PyTorch's global CPU RNG (saved and restored by Accelerate for exact resume). Draws happen on the
CPU whatever the model's device, so a run is reproducible across devices.
"""

from __future__ import annotations

import torch
from torch import Tensor


def padding_mask(lengths: Tensor | None, batch: int, max_len: int, device: torch.device | None = None) -> Tensor:
    """(B, T) bool, True at padded frames (PyTorch's ``key_padding_mask`` convention); all False without lengths."""
    if lengths is None:
        return torch.zeros(batch, max_len, dtype=torch.bool, device=device)
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def span_mask(
    lengths: Tensor,
    max_len: int,
    *,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Masked frames of each utterance, (B, max_len) bool.

    wav2vec 2.0's scheme: ``round_random(mask_prob * T)`` frames of an utterance of ``T`` unpadded frames (at least
    ``min_masks``) are drawn without replacement as span starts, and each start masks itself and the following
    frames, ``mask_length`` in all; spans may overlap. Utterances of at most ``mask_length`` frames use spans of
    ``T - 1`` frames. Padded frames are never masked.
    """
    if not 0.0 <= mask_prob <= 1.0 or mask_length < 1 or min_masks < 0:
        raise ValueError(
            f"span_mask: need 0 <= mask_prob <= 1, mask_length >= 1, min_masks >= 0; got {mask_prob}, "
            f"{mask_length}, {min_masks}"
        )
    lengths_cpu = lengths.detach().to("cpu", torch.long)
    mask = torch.zeros(len(lengths_cpu), max_len, dtype=torch.bool)
    for row, length in enumerate(lengths_cpu.tolist()):
        if length < 2:
            continue
        span = min(mask_length, length - 1)
        num_starts_possible = length - span + 1
        wanted = int(mask_prob * length + torch.rand((), generator=generator).item())
        num_starts = min(max(wanted, min_masks), num_starts_possible)
        starts = torch.randperm(num_starts_possible, generator=generator)[:num_starts]
        frames = (starts[:, None] + torch.arange(span)[None, :]).reshape(-1)
        mask[row, frames] = True
    return mask.to(lengths.device)


def sample_distractors(
    counts: Tensor, num_distractors: int, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Indices of distractors drawn from the same utterance's other masked frames.

    ``counts`` (B,): masked frames per utterance; masked frames are numbered utterance after utterance (the order
    of ``x[mask]`` for a (B, T) mask). Returns ``indices`` (N, num_distractors) into those N frames, drawn
    uniformly with replacement among the *other* masked frames of the same utterance, and ``valid`` (N,) bool,
    False for frames of an utterance with a single masked frame (they have no distractor; their indices point at
    themselves and must be ignored).
    """
    counts = counts.detach().to("cpu", torch.long)
    total = int(counts.sum())
    offsets = torch.cumsum(counts, 0) - counts  # first frame of each utterance
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)  # utterance of each frame
    position = torch.arange(total) - offsets[owner]  # frame index within its utterance
    others = (counts[owner] - 1).clamp_min(1)  # how many other frames each frame can draw from
    draw = (torch.rand(total, num_distractors, generator=generator) * others[:, None]).long()
    draw = torch.minimum(draw, others[:, None] - 1)  # guard against rand() rounding up to 1.0
    draw = draw + (draw >= position[:, None]).long()  # skip the frame itself
    valid = counts[owner] > 1
    indices = torch.where(valid[:, None], offsets[owner][:, None] + draw, torch.arange(total)[:, None])
    return indices, valid
