"""CPU search of the entries below a threshold from logits and block maxima (no deviation matrix, no full pass)."""

from __future__ import annotations

import torch
from torch import Tensor

from simplexvq.scale.backends.blockmax import BlockMaxima
from simplexvq.scale.topk import RunningTopK

__all__ = ["merge_scores", "score_candidates"]


@torch.no_grad()
def merge_scores(state: RunningTopK, scores: Tensor, offsets: Tensor, blocks: BlockMaxima, row_offset: int) -> None:
    """Merge into ``state`` the deviations ``offsets[g, n] - scores[g, n, m]`` of column ``g M + m`` and row
    ``row_offset + n``.

    ``scores`` (G, c, M), ``offsets`` (G, c), ``blocks`` the :class:`BlockMaxima` of ``scores``. For cross-entropy
    (``-log p = lse - logit``) this is :meth:`RunningTopK.update` without the (c, G M) deviation matrix and without
    a full comparison pass: no entry of a block of columns can fall below its threshold unless
    ``max(scores in the block) + max(thresholds of the block) > offset``, so only the (few) blocks passing that
    bound are gathered and compared exactly. Same result as ``state.update`` on
    ``(offsets[..., None] - scores).transpose(0, 1).reshape(c, G M)``.
    """
    groups, num_rows, size = scores.shape
    if num_rows == 0:
        return
    scores, offsets = scores.contiguous(), offsets.contiguous()
    threshold = state.values.amax(dim=0)
    if state.rows_seen < state.k or not bool(threshold.isfinite().all()):  # not full yet: the dense path
        deviations = (offsets.unsqueeze(-1) - scores).transpose(0, 1).reshape(num_rows, groups * size)
        state.update(deviations, row_offset)
        return
    state.rows_seen += num_rows
    state.merge_entries(*score_candidates(scores, offsets, blocks, threshold.view(groups, size), row_offset))


@torch.no_grad()
def score_candidates(
    scores: Tensor, offsets: Tensor, blocks: BlockMaxima, threshold: Tensor, row_offset: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(row, column, deviation) of every entry whose deviation ``offsets[g, n] - scores[g, n, m]`` is below
    ``threshold[g, m]``; column ``g M + m``, row ``row_offset + n``.

    ``scores`` (G, c, M) contiguous, ``offsets`` (G, c), ``threshold`` (G, M), ``blocks`` the block maxima of
    ``scores``. No entry of a block of columns can pass unless ``max(scores in the block) + max(thresholds of the
    block) > offset``, so only the blocks passing that bound are gathered (whole, as rows of an overlapping view)
    and compared exactly: neither the (c, G M) deviation matrix nor a full comparison pass is needed.
    """
    num_rows, size = scores.shape[1:]
    covered, width = blocks.covered, blocks.width
    limits = BlockMaxima.of(threshold, width)
    pieces = []
    if covered:
        bound = blocks.full + limits.full.unsqueeze(1) - offsets.unsqueeze(-1)  # (G, c, blocks)
        # rounding of the sums must not hide an entry: accept bounds within a few ulps of zero
        slack = blocks.full.abs() + limits.full.abs().unsqueeze(1) + offsets.abs().unsqueeze(-1)
        passing = (bound > slack * (-8 * torch.finfo(scores.dtype).eps)).reshape(-1).nonzero().squeeze(1)
        # flat (group, row) and block of each passing block, then its first column in scores and thresholds
        group_row = passing.div(covered // width, rounding_mode="floor")
        block_start = (passing - group_row * (covered // width)) * width
        column_start = group_row.div(num_rows, rounding_mode="floor") * size + block_start
        window = _windows(scores.reshape(-1), width).index_select(0, group_row * size + block_start)
        deviation = offsets.reshape(-1).index_select(0, group_row).unsqueeze(-1) - window  # (blocks, width)
        limit = _windows(threshold.reshape(-1), width).index_select(0, column_start)
        hit = (deviation < limit).reshape(-1).nonzero().squeeze(1)
        which = hit.div(width, rounding_mode="floor")
        pieces.append(
            (
                group_row[which].remainder(num_rows),
                column_start[which] + (hit - which * width),
                deviation.reshape(-1)[hit],
            )
        )
    if covered < size:  # the last M % width columns: compared directly
        deviation = offsets.unsqueeze(-1) - scores[..., covered:]  # (G, c, tail)
        group, row, offset = (deviation < threshold[:, covered:].unsqueeze(1)).nonzero(as_tuple=True)
        pieces.append((row, group * size + covered + offset, deviation[group, row, offset]))
    row, column, value = (torch.cat(parts) for parts in zip(*pieces, strict=True))
    return row + row_offset, column, value


def _windows(flat: Tensor, width: int) -> Tensor:
    """Every run of ``width`` consecutive elements of the 1-D ``flat``, as an overlapping (len - width + 1, width)
    view: ``index_select`` on it gathers blocks that start anywhere as whole rows."""
    return flat.as_strided((flat.numel() - width + 1, width), (1, 1))
