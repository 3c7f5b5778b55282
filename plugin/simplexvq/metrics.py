"""Codebook-usage meter over a whole evaluation set, correct under distributed evaluation."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from simplexvq.functional import perplexity


class CodebookUsageMeter:
    """Accumulates hard-code counts per group over many batches and reports usage statistics.

    Call :meth:`update` with each batch's code indices (``QuantizerOutput.indices``: (B, ..., G), first dimension
    the samples, i.e. images or utterances; ``-1`` marks padding). :meth:`compute` returns, per group (G,):

    * ``usage``: fraction of codebook entries used at least once over everything seen (the paper's "Code Use");
    * ``per_sample_usage``: fraction of the codebook used within one sample, averaged over samples;
    * ``perplexity``: perplexity of the mean onehot code (the code distribution over the whole set);
    * ``individual_perplexity``: mean perplexity of each position's assignment probabilities (needs ``probs``
      in :meth:`update`; NaN when none were given);
    * ``dead_codes``: number of entries never used.

    Under ``torch.distributed``, :meth:`compute` sums the accumulators over ranks with one ``all_reduce`` that
    every rank must call (as every collective). Pass ``device`` where the collective backend needs it (CUDA for
    NCCL).
    """

    def __init__(self, groups: int, codebook_size: int, device: torch.device | str | None = None) -> None:
        self.groups = groups
        self.codebook_size = codebook_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        g, m = self.groups, self.codebook_size
        self._counts = torch.zeros(g, m, dtype=torch.float64, device=self.device)
        self._sample_usage_sum = torch.zeros(g, dtype=torch.float64, device=self.device)
        self._num_samples = torch.zeros(1, dtype=torch.float64, device=self.device)
        self._perplexity_sum = torch.zeros(g, dtype=torch.float64, device=self.device)
        self._perplexity_count = torch.zeros(1, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, indices: Tensor, probs: Tensor | None = None) -> None:
        """Add a batch of codes ``indices`` (B, ..., G) and optionally their probabilities (B, ..., G, M)."""
        g, m = self.groups, self.codebook_size
        if indices.dim() < 2 or indices.shape[-1] != g:
            raise ValueError(
                f"CodebookUsageMeter.update: indices must have shape (B, ..., G={g}), got {tuple(indices.shape)}"
            )
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"CodebookUsageMeter.update: indices must be integer codes, got {indices.dtype}")
        per_sample = indices.to(self.device, torch.long).reshape(indices.shape[0], -1, g)  # (B, T, G)
        valid = per_sample >= 0
        if (per_sample >= m).any():
            raise ValueError(f"CodebookUsageMeter.update: an index is >= codebook_size={m}")
        batch = per_sample.shape[0]
        flat = (
            torch.arange(batch, device=self.device)[:, None, None] * (g * m)
            + torch.arange(g, device=self.device)[None, None, :] * m
            + per_sample.clamp_min(0)
        )[valid]
        histogram = torch.bincount(flat, minlength=batch * g * m).reshape(batch, g, m)
        self._counts += histogram.sum(dim=0).double()
        samples_present = valid.any(dim=2).any(dim=1)  # samples with at least one unpadded position
        used_per_sample = (histogram > 0).sum(dim=-1).double() / m  # (B, G)
        self._sample_usage_sum += used_per_sample[samples_present].sum(dim=0)
        self._num_samples += samples_present.sum()
        if probs is not None:
            if probs.shape != (*indices.shape, m):
                raise ValueError(
                    f"CodebookUsageMeter.update: probs must have shape {(*indices.shape, m)}, got {tuple(probs.shape)}"
                )
            position_perplexity = perplexity(probs.to(self.device, torch.float64)).reshape(batch, -1, g)
            self._perplexity_sum += position_perplexity[valid.all(dim=-1)].sum(dim=0)
            self._perplexity_count += valid.all(dim=-1).sum()

    @torch.no_grad()
    def compute(self) -> dict[str, Tensor]:
        """Statistics over everything seen (on all ranks); does not reset the meter."""
        packed = torch.cat(
            [
                self._counts.reshape(-1),
                self._sample_usage_sum,
                self._num_samples,
                self._perplexity_sum,
                self._perplexity_count,
            ]
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        g, m = self.groups, self.codebook_size
        counts, rest = packed[: g * m].reshape(g, m), packed[g * m :]
        sample_usage_sum, num_samples = rest[:g], rest[g]
        perplexity_sum, perplexity_count = rest[g + 1 : 2 * g + 1], rest[2 * g + 1]
        total = counts.sum(dim=-1, keepdim=True)
        nan = torch.full((g,), float("nan"), dtype=torch.float64, device=self.device)
        return {
            "usage": (counts > 0).double().mean(dim=-1),
            "per_sample_usage": sample_usage_sum / num_samples if num_samples > 0 else nan,
            "perplexity": perplexity(counts / total.clamp_min(1.0)) if total.sum() > 0 else nan,
            "individual_perplexity": perplexity_sum / perplexity_count if perplexity_count > 0 else nan,
            "dead_codes": (counts == 0).sum(dim=-1),
            "num_positions": total.squeeze(-1),
        }
