"""Eq. 13 on given log-probabilities at scale: the dense ``functional.knn_loss`` with ``scope``, ``chunk_size`` and
``vertices`` (:func:`knn_loss_scaled`); the KNN regularizer (:mod:`simplexvq.regularizers`) calls it when one of
them is set."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from simplexvq.scale.checks import (
    KnnDistance,
    KnnScope,
    check_chunk_size,
    check_k,
    check_k_fits,
    check_vertices,
)
from simplexvq.scale.deviation import deviation
from simplexvq.scale.distributed import global_row_count, select_global, with_scaled_gradient, world_of
from simplexvq.scale.topk import empty_slots_last, streamed_topk

__all__ = ["knn_loss_scaled", "selected_entries"]


def knn_loss_scaled(
    log_probs: Tensor,
    k: int,
    distance: KnnDistance = "ce",
    *,
    mask: Tensor | None = None,
    scope: KnnScope = "local",
    chunk_size: int | None = None,
    vertices: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Eq. 13 (:func:`simplexvq.functional.knn_loss`) on (N, M) or (N, G, M) log-probabilities at scale.

    ``mask`` (N,) bool marks the rows that take part (padding excluded), as in the dense function. Beyond it:

    * ``scope="global"``: the K nearest rows of each vertex are searched among the batches of all ranks of
      ``group`` (default: the world), not only the local one (the paper searches per GPU, ``"local"``). The value
      is the single-process loss on the concatenated batch, on every rank; the gradient is W times this rank's
      share (see :mod:`simplexvq.scale.distributed`), so that DDP's gradient averaging yields the single-process
      gradient. Every rank must call it (also with zero rows). Without an initialised process group, or with one
      rank, it is the local loss. K larger than the global number of rows is an error.
    * ``chunk_size``: stream the top-K over chunks of rows and compute the gradient in chunks with an analytic
      backward (no (N, G, M) temporary besides the gradient itself); same value and gradient as the dense
      computation. Under ``torch.compile`` the dense top-K is used whatever ``chunk_size`` says (same value and
      gradient; the streamed top-K extracts candidates with data-dependent sizes, which a traced graph cannot hold).
    * ``vertices``: (S,) or (G, S) code indices; only these vertices enter the sum, normalised by ``S K`` instead
      of ``M K`` (a random subset per step is an unbiased estimate of the full loss, section 5.3). Under
      ``scope="global"`` every rank must pass the same subset.
    """
    log_probs = _rows_of(log_probs, mask)
    k = check_k(k, "knn_loss")
    if distance not in ("ce", "l2"):
        raise ValueError(f"knn_loss: distance must be 'ce' or 'l2', got {distance!r}")
    chunk_size = check_chunk_size(chunk_size, "knn_loss")
    world = world_of(scope, group)
    num_rows, groups, codebook_size = log_probs.shape
    vertices = check_vertices(vertices, groups, codebook_size, "knn_loss")
    if vertices is not None:
        vertices = vertices.to(log_probs.device)
    columns = groups * (codebook_size if vertices is None else vertices.shape[1])
    if world is None:
        check_k_fits(k, num_rows, "knn_loss")
    else:
        check_k_fits(k, global_row_count(num_rows, world, log_probs.device), "knn_loss", world.size)
    normaliser = k * columns

    if chunk_size is None or torch.compiler.is_compiling():  # traced: the dense top-K (streaming reads sizes back)
        deviations = deviation(log_probs, distance, vertices).reshape(num_rows, columns)
        local_k = min(k, num_rows)
        top = deviations.topk(local_k, dim=0, largest=False, sorted=False).values  # (local K, C), differentiable
        if world is None:
            return top.sum() / normaliser
        padded = torch.cat([top.detach(), top.new_full((k - local_k, columns), float("nan"))])
        selected, total = select_global(padded, k, world)
        local_part = torch.where(selected[:local_k], top, torch.zeros_like(top)).sum() / normaliser
        return with_scaled_gradient(total / normaliser, local_part, world.size)

    def chunk_deviation(start: int, end: int) -> Tensor:
        return deviation(log_probs[start:end].detach(), distance, vertices).reshape(end - start, columns)

    state = streamed_topk(
        chunk_deviation, num_rows, k, columns, chunk_size, dtype=log_probs.dtype, device=log_probs.device
    )
    if world is None:
        selected, total, scale = state.rows >= 0, state.values.sum(), 1.0
    else:
        selected, total = select_global(empty_slots_last(state.values, state.rows), k, world)
        selected &= state.rows >= 0
        scale = float(world.size)
    return _SelectedDeviation.apply(
        log_probs, total / normaliser, state.rows, selected, vertices, distance, scale / normaliser, chunk_size
    )


def _rows_of(log_probs: Tensor, mask: Tensor | None) -> Tensor:
    """(N, M) as (N, 1, M), (N, G, M) as it is, restricted to the rows ``mask`` keeps."""
    if log_probs.dim() not in (2, 3):
        raise ValueError(
            f"knn_loss: log_probs must have shape (N, M) or (N, G, M), got {tuple(log_probs.shape)}; "
            "flatten batch and time/space dimensions into N first"
        )
    if log_probs.dim() == 2:
        log_probs = log_probs.unsqueeze(1)
    if mask is None:
        return log_probs
    if mask.shape != log_probs.shape[:1] or mask.dtype != torch.bool:
        raise ValueError(
            f"knn_loss: mask must be a bool tensor of shape ({log_probs.shape[0]},) marking the positions to keep, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    return log_probs[mask]


def selected_entries(rows: Tensor, selected: Tensor, groups: int, vertices: Tensor | None) -> tuple[Tensor, ...]:
    """(row, group, code) of every selected candidate, sorted by row; ``rows``/``selected`` are (K, G * S)."""
    per_group = rows.shape[1] // groups
    slot, column = selected.nonzero(as_tuple=True)
    group = column.div(per_group, rounding_mode="floor")
    vertex = column.remainder(per_group)
    code = vertex if vertices is None else vertices[group, vertex]
    row = rows[slot, column]
    order = row.argsort()
    return row[order], group[order], code[order]


class _SelectedDeviation(torch.autograd.Function):
    """Eq. 13 restricted to the selected (row, group, vertex) entries, with a chunked analytic backward.

    Inputs: log-probabilities (N, G, M), the value to report, the running top-K rows and the selection mask
    (K, G * S), the vertex subset, the distance, the gradient weight ``scale / (K G S)`` and the chunk size.
    Backward, with ``w`` the weight times the upstream gradient:

    * CE: ``d/d log p_{n,m} = -w`` at every selected entry;
    * L2: ``D = 1 - 2 p_m + |p|^2``, so ``d/d log p_{n,j} = w (2 c_n p_j^2 - 2 p_j [j selected in row n])``
      with ``c_n`` the number of selections in row n.
    """

    @staticmethod
    def forward(ctx, log_probs, value, rows, selected, vertices, distance, weight, chunk_size):  # noqa: D102
        ctx.save_for_backward(log_probs, rows, selected, vertices)
        ctx.distance, ctx.weight, ctx.chunk_size = distance, weight, chunk_size
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        log_probs, rows, selected, vertices = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            num_rows, groups, _ = log_probs.shape
            w = grad_output * ctx.weight
            row, group, code = selected_entries(rows, selected, groups, vertices)
            grad = torch.zeros_like(log_probs)
            if ctx.distance == "ce":
                grad.index_put_((row, group, code), (-w).expand(row.shape), accumulate=True)
            else:
                counts = torch.zeros(num_rows, groups, dtype=log_probs.dtype, device=log_probs.device)
                counts.index_put_((row, group), torch.ones_like(row, dtype=log_probs.dtype), accumulate=True)
                touched = counts.sum(dim=-1) > 0
                for start in range(0, num_rows, ctx.chunk_size):
                    end = min(start + ctx.chunk_size, num_rows)
                    if not bool(touched[start:end].any()):
                        continue
                    lp = log_probs[start:end]
                    grad[start:end] = (2.0 * w) * counts[start:end, :, None] * (2.0 * lp).exp()
                picked = log_probs[row, group, code].exp()
                grad.index_put_((row, group, code), -2.0 * w * picked, accumulate=True)
        return grad, None, None, None, None, None, None, None
