"""Cheap per-group statistics of one batch, computed without gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from simplexvq.functional import perplexity


@torch.no_grad()
def code_histogram(indices: Tensor, codebook_size: int) -> Tensor:
    """Counts of each code per group: ``indices`` (N, G) with values in [0, M), or -1 for a padded position (not
    counted) -> (G, M) float counts. A scatter-add into a fixed (G, M) buffer: no size is read back from the device
    (``bincount`` reads the largest index to size its output)."""
    groups = indices.shape[1]
    counted = indices >= 0
    offsets = torch.arange(groups, device=indices.device) * codebook_size
    flat = (indices.clamp_min(0) + offsets).reshape(-1)
    counts = torch.zeros(groups * codebook_size, dtype=torch.float32, device=indices.device)
    return counts.index_add_(0, flat, counted.reshape(-1).to(torch.float32)).reshape(groups, codebook_size)


@torch.no_grad()
def hard_code_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """``code_perplexity``: perplexity of the mean onehot code, per group (fairseq's ``code_perplexity``); indices
    of -1 (padded positions) are left out."""
    counts = code_histogram(indices, codebook_size)
    return {"code_perplexity": perplexity(counts / counts.sum(dim=-1, keepdim=True))}


@torch.no_grad()
def probability_stats(probs: Tensor) -> dict[str, Tensor]:
    """Statistics of assignment probabilities ``probs`` (N, G, M), each of shape (G,)."""
    return {
        "prob_perplexity": perplexity(probs.mean(dim=0)),
        "individual_perplexity": perplexity(probs).mean(dim=0),
        "max_prob": probs.amax(dim=-1).mean(dim=0),
    }
