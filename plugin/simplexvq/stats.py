"""Cheap per-group statistics of one batch, computed without gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from simplexvq.functional import perplexity


@torch.no_grad()
def code_histogram(indices: Tensor, codebook_size: int) -> Tensor:
    """Counts of each code per group: ``indices`` (N, G) with values in [0, M) -> (G, M) float counts."""
    groups = indices.shape[1]
    offsets = torch.arange(groups, device=indices.device) * codebook_size
    flat = (indices + offsets).reshape(-1)
    return torch.bincount(flat, minlength=groups * codebook_size).reshape(groups, codebook_size).float()


@torch.no_grad()
def hard_code_stats(indices: Tensor, codebook_size: int) -> dict[str, Tensor]:
    """``code_perplexity``: perplexity of the mean onehot code, per group (fairseq's ``code_perplexity``)."""
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
