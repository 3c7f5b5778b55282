"""Streamed top-K of cross-entropy deviations with a ceiling carried over from the previous step.

The :class:`~simplexvq.scale.topk.RunningTopK` starts with no threshold: the first rows are merged densely
and each column's threshold only tightens as rows stream by, so about ``K (1 + ln(N / chunk))`` entries per column
are extracted and merged, one merge per chunk. Between training steps the K-th smallest deviation of a column
changes little, so :class:`CeilingTopK` starts from a *ceiling* per column, the ``3K+3``-th smallest deviation of
the previous step: every chunk only collects the entries below it (about ``3K+3`` per column in all), they are
merged once at the end, and the next ceiling comes out of the same merge. (With ``2K+2`` about 5% of the columns
had to be recomputed per step on fresh batches at M = 1024, K = 8; with ``3K+3`` about 0.2%.)

Exact whatever the ceiling. A column with at least K entries below its ceiling has its K smallest among them. A
column with fewer (the ceiling was too low, or it is the first step of that column) is recomputed from scratch
over all rows by the caller's ``recompute`` (only those columns' logits: a small product), so the result never
depends on the ceiling, only the time does. Ties may resolve to different rows than without a ceiling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from simplexvq.scale.backends.blockmax import BlockMaxima
from simplexvq.scale.backends.candidates import merge_scores, score_candidates
from simplexvq.scale.topk import RunningTopK

__all__ = ["CeilingTopK", "kept_per_column"]


def kept_per_column(k: int) -> int:
    """Entries kept per column while streaming: K plus a margin, whose largest becomes the next ceiling."""
    return 3 * k + 3


class CeilingTopK:
    """The K smallest deviations ``offsets[g, n] - scores[g, n, m]`` per column ``g M + m``, streamed over chunks.

    ``ceiling`` (G M,) from the previous call's :meth:`finish`, or ``None`` (first call: a running top-K).
    """

    def __init__(
        self, k: int, groups: int, size: int, ceiling: Tensor | None, *, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.k, self.groups, self.size = k, groups, size
        self.keep = kept_per_column(k)
        self.state = RunningTopK.empty(self.keep, groups * size, dtype=dtype, device=device)
        self.ceiling = None if ceiling is None else ceiling.to(device=device, dtype=dtype).view(groups, size)
        self.limit = self.ceiling  # what an entry must be below to be collected
        self.pool: list[tuple[Tensor, Tensor, Tensor]] = []
        self.pooled = 0
        self.budget = 2 * self.keep * groups * size  # entries collected before an intermediate merge

    @torch.no_grad()
    def add(self, scores: Tensor, offsets: Tensor, blocks: BlockMaxima, row_offset: int) -> None:
        """Stream in a chunk: ``scores`` (G, c, M), ``offsets`` (G, c), ``blocks`` the block maxima of ``scores``."""
        if self.limit is None:
            merge_scores(self.state, scores, offsets, blocks, row_offset)
            return
        entries = score_candidates(scores.contiguous(), offsets.contiguous(), blocks, self.limit, row_offset)
        self.state.rows_seen += scores.shape[1]
        self.pool.append(entries)
        self.pooled += entries[0].numel()
        if self.pooled > self.budget:  # a ceiling far too high: merge and tighten it with what was seen
            self._merge_pool()

    def _merge_pool(self) -> None:
        if self.pool:
            self.state.merge_entries(*(torch.cat(parts) for parts in zip(*self.pool, strict=True)))
        self.pool, self.pooled = [], 0
        self.limit = torch.minimum(self.ceiling, self.state.values.amax(dim=0).view(self.groups, self.size))

    @torch.no_grad()
    def finish(self, recompute: Callable[[Tensor, int], RunningTopK]) -> tuple[RunningTopK, Tensor | None]:
        """The exact top-K state (K, G M) and the ceiling for the next call (G M,).

        ``recompute(columns, keep)`` must return the running top-``keep`` over all rows of those columns only.
        The next ceiling is ``None`` when more than a quarter of the columns had to be recomputed: the deviations
        drift faster than a ceiling can follow (a learning rate far too high), and the next call is better off
        with a running top-K than with another recomputation.
        """
        state = self.state
        usable = True
        if self.ceiling is not None:
            self._merge_pool()
            filled = (state.rows >= 0).sum(dim=0)
            missing = (filled < min(self.k, state.rows_seen)).nonzero().squeeze(1)
            if missing.numel():
                redone = recompute(missing, self.keep)
                state.values[:, missing] = redone.values
                state.rows[:, missing] = redone.rows
            usable = 4 * missing.numel() <= filled.numel()
        largest = state.values.amax(dim=0)
        previous = self.ceiling.reshape(-1) if self.ceiling is not None else torch.full_like(largest, float("inf"))
        ceiling = torch.where(largest.isfinite(), largest, previous) if usable else None
        top = state.values.topk(min(self.k, self.keep), dim=0, largest=False, sorted=False)
        result = RunningTopK(values=top.values, rows=state.rows.gather(0, top.indices), rows_seen=state.rows_seen)
        return result, ceiling
