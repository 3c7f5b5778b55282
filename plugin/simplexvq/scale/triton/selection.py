"""Sync-free pieces around the kernels: the K <= N check, the cross-rank top-K selection, the selected entries.

Everything here has shapes fixed by (N, G, M, K, S) and reads nothing back to the host: counts stay tensors,
checks use :func:`torch._assert_async`, masks act as weights (never as boolean indices). A global search keeps
exactly two collectives, an ``all_reduce`` of the valid row count and an ``all_gather`` of the local top-K, both
called on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from simplexvq.scale.distributed import World

__all__ = ["Entries", "assert_k_fits", "select_global", "selected_entries", "valid_row_count"]


def valid_row_count(valid: Tensor | None, num_rows: int, device: torch.device) -> Tensor:
    """Number of rows taking part, as a 0-d int64 tensor on ``device`` (no host read)."""
    if valid is None:
        return torch.full((), num_rows, dtype=torch.int64, device=device)
    return valid.sum(dtype=torch.int64)


def assert_k_fits(k: int, count: Tensor, world: World | None) -> Tensor:
    """Check K against the (global) number of valid rows without a host read; returns the global count.

    With a world, the local count is summed over ranks (one ``all_reduce``, on every rank). The check runs on the
    device (:func:`torch._assert_async`): on the CPU it raises ``RuntimeError`` at once, on a GPU the failure
    surfaces at the next synchronisation.
    """
    if world is not None:
        count = count.clone()
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=world.group)
        message = (
            f"knn_loss: k={k} neighbours per code vector requested, but the batches of all {world.size} ranks hold "
            "fewer (unpadded) positions together; K must not exceed the global N: lower k or use larger batches"
        )
    else:
        message = (
            f"knn_loss: k={k} neighbours per code vector requested, but the batch holds fewer (unpadded) "
            "positions; K must not exceed N: lower k or use a larger batch"
        )
    torch._assert_async(count >= k, message)
    return count


def select_global(values: Tensor, k: int, world: World) -> tuple[Tensor, Tensor]:
    """Global top-K over the local candidates ``values`` (K, C) of every rank (``+inf`` = no candidate).

    Returns the mask (K, C) of this rank's candidates among the K smallest of their column over all ranks, and
    the sum of those K smallest values (identical on every rank). One ``all_gather``; the mask is built with a
    scatter-add of weights instead of boolean indexing, so nothing waits for the host.
    """
    values = values.detach().contiguous()
    buffers = [torch.empty_like(values) for _ in range(world.size)]
    dist.all_gather(buffers, values, group=world.group)
    per_rank, columns = values.shape
    gathered = torch.stack(buffers).reshape(world.size * per_rank, columns)
    top = gathered.topk(k, dim=0, largest=False, sorted=False)
    owner = top.indices.div(per_rank, rounding_mode="floor")
    slot = top.indices.remainder(per_rank)
    column = torch.arange(columns, device=values.device).expand(k, columns)
    mine = (owner == world.rank).to(torch.int32)
    hits = torch.zeros(per_rank * columns, dtype=torch.int32, device=values.device)
    hits.scatter_add_(0, (slot * columns + column).reshape(-1), mine.reshape(-1))
    return hits.view(per_rank, columns) > 0, top.values.sum()


@dataclass(frozen=True)
class Entries:
    """The (row, group, code) of each of the K x C top-K slots and its weight (1 if selected, else 0).

    Flattened to K C entries; unselected slots point at row 0 with weight 0, so gathers and scatter-adds over
    them have a fixed shape and change nothing.
    """

    row: Tensor
    group: Tensor
    code: Tensor
    weight: Tensor


def selected_entries(
    rows: Tensor, selected: Tensor, groups: int, vertices: Tensor | None, dtype: torch.dtype
) -> Entries:
    """The :class:`Entries` of top-K ``rows`` (K, C) with the selection mask ``selected`` (K, C)."""
    per_group = rows.shape[1] // groups
    column = torch.arange(rows.shape[1], device=rows.device)
    group = column.div(per_group, rounding_mode="floor")
    vertex = column - group * per_group
    code = vertex if vertices is None else vertices.reshape(-1)
    chosen = selected & (rows >= 0)
    return Entries(
        row=rows.clamp_min(0).reshape(-1),
        group=group.expand_as(rows).reshape(-1),
        code=code.expand_as(rows).reshape(-1),
        weight=chosen.to(dtype).reshape(-1),
    )
