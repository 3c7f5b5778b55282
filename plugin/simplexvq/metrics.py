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
    * ``dead_codes``: number of entries never used;
    * ``num_positions``: unpadded positions counted; ``counts``: (G, M) how often each code was used.

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
        """Forget everything seen; accumulators are float64 (exact counts up to 2**53)."""
        g, m = self.groups, self.codebook_size
        self._counts = torch.zeros(g, m, dtype=torch.float64, device=self.device)
        self._sample_usage_sum, self._num_samples, self._perplexity_sum, self._perplexity_count = torch.zeros(
            4, g, dtype=torch.float64, device=self.device
        ).unbind()

    @torch.no_grad()
    def update(self, indices: Tensor, probs: Tensor | None = None) -> None:
        """Add a batch of codes ``indices`` (B, ..., G) and optionally their probabilities (B, ..., G, M).

        Padding is per group: a ``-1`` in group g only removes that position from group g's statistics.
        """
        g, m = self.groups, self.codebook_size
        if indices.dim() < 2 or indices.shape[-1] != g:
            raise ValueError(
                f"CodebookUsageMeter.update: indices must have shape (B, ..., G={g}), got {tuple(indices.shape)}"
            )
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"CodebookUsageMeter.update: indices must be integer codes, got {indices.dtype}")
        if probs is not None and probs.shape != (*indices.shape, m):
            raise ValueError(
                f"CodebookUsageMeter.update: probs must have shape {(*indices.shape, m)}, got {tuple(probs.shape)}"
            )
        if (indices >= m).any():
            raise ValueError(f"CodebookUsageMeter.update: an index is >= codebook_size={m}")
        if indices.numel() == 0:
            return
        batch = indices.shape[0]
        per_sample = indices.to(self.device, torch.long).reshape(batch, -1, g)  # (B, T, G)
        valid = per_sample >= 0
        flat = (
            torch.arange(batch, device=self.device)[:, None, None] * (g * m)
            + torch.arange(g, device=self.device)[None, None, :] * m
            + per_sample.clamp_min(0)
        )[valid]
        histogram = torch.bincount(flat, minlength=batch * g * m).reshape(batch, g, m)
        self._counts += histogram.sum(dim=0).double()
        present = valid.any(dim=1)  # (B, G): the sample has an unpadded position in group g
        used_per_sample = (histogram > 0).sum(dim=-1).double() / m  # (B, G)
        self._sample_usage_sum += (used_per_sample * present).sum(dim=0)
        self._num_samples += present.sum(dim=0)
        if probs is not None:
            position_perplexity = perplexity(probs.to(self.device, torch.float64)).reshape(batch, -1, g)
            self._perplexity_sum += torch.where(valid, position_perplexity, 0.0).sum(dim=(0, 1))
            self._perplexity_count += valid.sum(dim=(0, 1))

    @torch.no_grad()
    def compute(self) -> dict[str, Tensor]:
        """Statistics over everything seen (on all ranks); does not reset the meter. NaN where undefined."""
        g, m = self.groups, self.codebook_size
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
        counts = packed[: g * m].reshape(g, m)
        sample_usage_sum, num_samples, perplexity_sum, perplexity_count = packed[g * m :].reshape(4, g)
        total = counts.sum(dim=-1)
        nan = torch.full((g,), float("nan"), dtype=torch.float64, device=self.device)
        return {
            "usage": (counts > 0).double().mean(dim=-1),
            "per_sample_usage": torch.where(num_samples > 0, sample_usage_sum / num_samples.clamp_min(1), nan),
            "perplexity": torch.where(total > 0, perplexity(counts / total.clamp_min(1)[:, None]), nan),
            "individual_perplexity": torch.where(
                perplexity_count > 0, perplexity_sum / perplexity_count.clamp_min(1), nan
            ),
            "dead_codes": (counts == 0).sum(dim=-1),
            "num_positions": total,
            "counts": counts,
        }
