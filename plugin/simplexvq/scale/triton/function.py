"""The thin autograd function over the fused kernels: (queries, keys, bias, values) -> output, KNN loss, codes, stats.

Forward: the row pass, the column pass, then (for the KNN regularizer) the vertex subset, the local or global
selection and the loss, all on fixed shapes. Backward, with ``p = softmax(l)``, upstream ``dO`` for ``O = p v``,
``w = dL * scale / (K C)`` (``scale`` = number of ranks for a global search, see :mod:`simplexvq.knn`) and, per
row, ``c_n`` selected vertices of selected mass ``s_n``, the gradient of the logits is::

    ds = p * (dO . v - row + quad * p) + sparse at the selected (row, code) entries
    CE : row = <dO, O> - w c_n,                          quad = 0,       sparse = -w
    L2 : row = <dO, O> - 2 w (s_n - c_n |p|^2),           quad = 2 w c_n, sparse = -2 w p_nm

The dense part runs in the two backward kernels (``dq``; ``dk``, ``db``, ``dv``); the sparse part touches only
the K C selected entries and is added with fixed-shape gathers and ``index_add_``. The queries, keys and bias
are differentiable functions of ``z``, the codebook and the temperature, so autograd carries the gradients on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from simplexvq.scale.checks import KnnDistance
from simplexvq.scale.distributed import World
from simplexvq.scale.triton import launch
from simplexvq.scale.triton.selection import select_global, selected_entries

__all__ = ["FusedSoftmax", "FusedSpec"]


@dataclass(frozen=True)
class FusedSpec:
    """What one call computes: KNN size (``None``: no regularizer), its deviation, the output, the world."""

    k: int | None
    knn_distance: KnnDistance
    compute_output: bool
    world: World | None


def _subset_columns(vertices: Tensor, size: int) -> Tensor:
    """Flat columns ``g M + vertices[g, s]`` of a vertex subset (G, S), in (group, vertex) order."""
    offsets = torch.arange(vertices.shape[0], device=vertices.device).unsqueeze(1) * size
    return (offsets + vertices).reshape(-1)


class FusedSoftmax(torch.autograd.Function):
    """Softmax smoothing + KNN regularizer + codes + statistics with the fused Triton kernels (see module doc)."""

    @staticmethod
    def forward(ctx, queries, keys, bias, values, valid, vertices, spec: FusedSpec):  # noqa: D102
        queries, keys, values = queries.contiguous(), keys.contiguous(), values.contiguous()
        bias = None if bias is None else bias.contiguous()
        output, lse, indices, perplexity, max_prob, squared_norm = launch.softmax_rows(
            queries, keys, bias, values, valid, spec.compute_output
        )
        k = spec.k or 0
        prob_sum, top_values, top_rows = launch.softmax_columns(
            queries, keys, bias, valid, lse, squared_norm, k, spec.knn_distance
        )
        groups, size = keys.shape[:2]
        loss = lse.new_zeros(())
        entries = None
        if spec.k is not None:
            if vertices is not None:
                columns = _subset_columns(vertices, size)
                top_values, top_rows = top_values.index_select(1, columns), top_rows.index_select(1, columns)
            num_columns = top_values.shape[1]
            if spec.world is None:
                selected = top_rows >= 0
                total = torch.where(selected, top_values, torch.zeros_like(top_values)).sum()
                scale = 1.0
            else:
                selected, total = select_global(top_values, spec.k, spec.world)
                scale = float(spec.world.size)
            loss = total / (spec.k * num_columns)
            entries = selected_entries(top_rows, selected, groups, vertices, lse.dtype)
            ctx.weight_scale = scale / (spec.k * num_columns)
        ctx.spec = spec
        saved = [queries, keys, bias, values, output, valid, lse, squared_norm]
        if entries is not None:
            saved += [entries.row, entries.group, entries.code, entries.weight]
        ctx.save_for_backward(*saved)
        outputs = (
            output,
            loss.to(queries.dtype),
            indices,
            prob_sum,
            perplexity.sum(dim=1),
            max_prob.sum(dim=1),
        )
        ctx.mark_non_differentiable(*outputs[2:])
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    def backward(ctx, grad_output, grad_loss, *unused):  # noqa: D102
        spec: FusedSpec = ctx.spec
        queries, keys, bias, values, output, valid, lse, squared_norm, *entries = ctx.saved_tensors
        if not spec.compute_output:
            grad_output = None
        if spec.k is None:
            grad_loss = None
        if grad_output is None and grad_loss is None:
            return None, None, None, None, None, None, None
        num_rows, groups, _ = queries.shape
        size = keys.shape[1]
        accumulate = lse.dtype
        if grad_output is not None:
            grad_output = grad_output.contiguous()
            row = torch.einsum("ngd,ngd->gn", grad_output.to(accumulate), output.to(accumulate)).contiguous()
        else:
            row = lse.new_zeros(groups, num_rows)
        quad = sparse = None
        if grad_loss is not None and num_rows > 0:  # without rows nothing is selected
            entry_row, entry_group, entry_code, entry_weight = entries
            weight = grad_loss.to(accumulate) * ctx.weight_scale
            flat = entry_group * num_rows + entry_row  # position in the (G, N) per-row tensors
            counts = lse.new_zeros(groups * num_rows).index_add_(0, flat, entry_weight).view(groups, num_rows)
            if spec.knn_distance == "ce":
                row = row - weight * counts
                sparse = -weight * entry_weight
            else:
                picked_queries = queries[entry_row, entry_group].to(accumulate)
                logit = torch.einsum("ed,ed->e", picked_queries, keys[entry_group, entry_code].to(accumulate))
                if bias is not None:
                    logit = logit + bias[entry_group, entry_code].to(accumulate)
                prob = torch.exp(logit - lse[entry_group, entry_row]) * entry_weight
                mass = lse.new_zeros(groups * num_rows).index_add_(0, flat, prob).view(groups, num_rows)
                row = row - 2.0 * weight * (mass - counts * squared_norm)
                quad = (2.0 * weight * counts).contiguous()
                sparse = -2.0 * weight * prob
            row = row.contiguous()
        grad_queries = launch.softmax_rows_backward(queries, keys, bias, values, grad_output, valid, lse, row, quad)
        grad_keys, grad_bias, grad_values = launch.softmax_columns_backward(
            queries, keys, bias, values, grad_output, valid, lse, row, quad
        )
        if sparse is not None:  # the -w (CE) or -2 w p (L2) at the selected entries, added densely
            dim = queries.shape[2]
            to_queries = sparse.unsqueeze(1) * keys[entry_group, entry_code].to(accumulate)
            to_keys = sparse.unsqueeze(1) * queries[entry_row, entry_group].to(accumulate)
            grad_queries = (
                grad_queries.reshape(-1, dim)
                .to(accumulate)
                .index_add_(0, entry_row * groups + entry_group, to_queries)
                .view(num_rows, groups, dim)
                .to(queries.dtype)
            )
            grad_keys = (
                grad_keys.reshape(-1, dim)
                .to(accumulate)
                .index_add_(0, entry_group * size + entry_code, to_keys)
                .view(groups, size, dim)
                .to(keys.dtype)
            )
            grad_bias = grad_bias.reshape(-1).to(accumulate).index_add_(0, entry_group * size + entry_code, sparse)
            grad_bias = grad_bias.view(groups, size)
        return (
            grad_queries,
            grad_keys,
            grad_bias.to(bias.dtype) if bias is not None else None,
            grad_values if grad_output is not None else None,
            None,
            None,
            None,
        )
