"""Global neighbours across ranks: the cross-rank selection of eq. 13's top-K.

Each rank keeps its local top-K per column, the K x C candidate deviations of all W ranks are all-gathered (one
``all_reduce`` of the row count and one ``all_gather``, called on every rank, also on ranks without rows), and
every rank keeps those of its own candidates that are in the global top-K. The global top-K of a column is always
among the union of the local top-Ks, so this is exact.

Reconciling the reported value with DDP's gradient averaging. Every rank returns the *global* loss (the
single-process loss on the concatenated batch, identical on all ranks), but with the gradient of
``W * (its own selected terms)``: DDP (or Accelerate, FSDP) averages gradients over the W ranks, and the average
of ``W * grad(local part)`` is the sum of the local parts' gradients, i.e. the gradient of the global loss. Input
gradients seen on one rank are therefore W times the single-process input gradients of that rank's rows; every
parameter gradient is exact after DDP's averaging. Code that sums (instead of averaging) gradients over ranks must
divide by W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from simplexvq.scale.checks import SCOPES

__all__ = ["World", "global_row_count", "select_among_gathered", "select_global", "with_scaled_gradient", "world_of"]


@dataclass(frozen=True)
class World:
    """This rank's place in the process group of a global KNN."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None


def world_of(scope: str, group: dist.ProcessGroup | None = None) -> World | None:
    """The process group to search globally, or ``None`` for a local search.

    ``scope="global"`` without an initialised process group, or with a single rank, is a local search.
    """
    if scope not in SCOPES:
        raise ValueError(f"knn: scope must be 'local' or 'global', got {scope!r}")
    if scope == "local" or not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size(group)
    if size == 1:
        return None
    return World(rank=dist.get_rank(group), size=size, group=group)


def global_row_count(num_rows: int, world: World, device: torch.device) -> int:
    """Sum of the row counts of all ranks (one ``all_reduce``; every rank must call it)."""
    count = torch.tensor([num_rows], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=world.group)
    return int(count.item())


def select_among_gathered(gathered: Tensor, k: int, rank: int) -> tuple[Tensor, Tensor]:
    """Global top-K from the candidates of all ranks, ``gathered`` (W, K, C) (NaN = no candidate: it ranks after
    every deviation, ``+inf`` included; see :func:`empty_slots_last`).

    Returns the mask (K, C) of ``rank``'s candidates that are among the K smallest of their column over all ranks,
    and the sum of those K smallest values over every column (identical on every rank). Pure; ties are broken by
    ``torch.topk`` on the same tensor on every rank, so the ranks agree.
    """
    world_size, per_rank, columns = gathered.shape
    top = gathered.reshape(world_size * per_rank, columns).topk(k, dim=0, largest=False, sorted=False)
    owner = top.indices.div(per_rank, rounding_mode="floor")
    slot = top.indices.remainder(per_rank)
    selected = torch.zeros(per_rank, columns, dtype=torch.bool, device=gathered.device)
    mine = owner == rank
    column = torch.arange(columns, device=gathered.device).expand(k, columns)
    selected[slot[mine], column[mine]] = True
    return selected, top.values.sum()


def select_global(values: Tensor, k: int, world: World) -> tuple[Tensor, Tensor]:
    """All-gather the local candidates ``values`` (K, C) and select the global top-K (see
    :func:`select_among_gathered`). One ``all_gather``; every rank must call it."""
    values = values.detach().contiguous()
    buffers = [torch.empty_like(values) for _ in range(world.size)]
    dist.all_gather(buffers, values, group=world.group)
    return select_among_gathered(torch.stack(buffers), k, world.rank)


def with_scaled_gradient(value: Tensor, local_part: Tensor, scale: float) -> Tensor:
    """A tensor whose value is ``value`` (detached) and whose gradient is that of ``scale * local_part``."""
    scaled = scale * local_part
    return value.detach() + (scaled - scaled.detach())
