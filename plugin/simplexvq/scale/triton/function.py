"""The thin autograd function over the fused kernels: (queries, keys, bias, values) -> output, KNN loss, codes, stats.

Forward: the row pass, the column pass, then (for the KNN regularizer) the vertex subset, the local or global
selection and the loss, all on fixed shapes. Backward, with ``p = softmax(l)``, upstream ``dO`` for ``O = p v``,
``w = dL * scale / (K C)`` (``scale`` = number of ranks for a global search, see
:mod:`simplexvq.scale.knn_loss`) and, per row, ``c_n`` selected vertices of selected mass ``s_n``, the gradient
of the logits is::

    ds = p * (dO . v - row + quad * p) + sparse at the selected (row, code) entries
    CE : row = <dO, O> - w c_n,                          quad = 0,       sparse = -w
    L2 : row = <dO, O> - 2 w (s_n - c_n |p|^2),           quad = 2 w c_n, sparse = -2 w p_nm

The dense part runs in the backward kernel (``dq``, ``dk``, ``db``, ``dv`` in one pass); the sparse part touches only
the K C selected entries and is added with fixed-shape gathers and ``index_add_``.

The temperature enters as a separate per-group scale ``s = 1 / tau`` of the logits, ``l = s (q0 . k + b0)``
(:func:`temperature_free_form`), so that its gradient is one sum without cancellation::

    dL/ds = sum_{n,m} ds[n, m] (q0 . k + b0) = (1 / s) sum_{n,m} ds[n, m] (l[n, m] - lse[n])

(the shift by ``lse`` is free because every row of ``ds`` sums to zero: the loss and the output depend on the
logits only through the softmax). Differentiating ``q = s q0`` and ``b = s b0`` instead gives
``sum ds (q . k) + sum ds b``, two large sums that cancel for Euclidean logits (``2 z . c / tau`` against
``|c|^2 / tau``); ``l - lse = log p`` is small where ``ds`` is not. The kernels accumulate the sum per row;
``q0``, the keys and ``b0`` are differentiable functions of ``z`` and the codebook, ``s`` of the temperature, so
autograd carries the gradients on.

Precision: float32 inputs multiply exactly (IEEE) or in TF32 by :func:`torch.get_float32_matmul_precision`
(:func:`simplexvq.scale.triton.launch.dot_precision`, read on the host in the forward, reused by the backward);
float16 / bfloat16 inputs multiply in their dtype on tensor cores; every kernel accumulates products, softmax
statistics and gradients in float32 (float64 for float64 inputs) and stores results in the inputs' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from simplexvq.scale.attention import temperature_free_form
from simplexvq.scale.checks import KnnDistance
from simplexvq.scale.distributed import World
from simplexvq.scale.triton import launch
from simplexvq.scale.triton.selection import select_global, selected_entries

__all__ = ["FusedSoftmax", "FusedSpec", "fused_softmax"]


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


def fused_softmax(
    kind: str, z: Tensor, codebook: Tensor, temperature: Tensor, valid: Tensor, vertices: Tensor | None, spec: FusedSpec
) -> tuple[Tensor, ...]:
    """:class:`FusedSoftmax` on the logits of ``kind`` (``cosine`` / ``euclid``) between ``z`` and ``codebook``
    over ``temperature``, with the code vectors as values: (output, loss, indices, column sums of p, row sums of
    exp(entropy) and of max p)."""
    queries, keys, bias, scale = temperature_free_form(kind, z, codebook, temperature)
    return FusedSoftmax.apply(queries, keys, bias, codebook, scale, valid, vertices, spec)


class FusedSoftmax(torch.autograd.Function):
    """Softmax smoothing + KNN regularizer + codes + statistics with the fused Triton kernels (see module doc).

    Inputs: unscaled queries ``q0`` (N, G, D), keys (G, M, D), unscaled bias ``b0`` (G, M) or ``None``, values
    (G, M, DV), the logits' scale ``s`` (G,), ``valid`` (N,) int8, a vertex subset (G, S) or ``None``, the spec.
    """

    @staticmethod
    def forward(ctx, unscaled_queries, keys, unscaled_bias, values, scale, valid, vertices, spec: FusedSpec):  # noqa: D102
        precision = launch.dot_precision(unscaled_queries.dtype)
        queries = (unscaled_queries * scale[:, None]).contiguous()
        keys, values = keys.contiguous(), values.contiguous()
        bias = None if unscaled_bias is None else (unscaled_bias * scale[:, None]).contiguous()
        output, lse, indices, perplexity, max_prob, squared_norm = launch.softmax_rows(
            queries, keys, bias, values, valid, spec.compute_output, precision
        )
        k = spec.k or 0
        prob_sum, top_values, top_rows = launch.softmax_columns(
            queries, keys, bias, valid, lse, squared_norm, k, spec.knn_distance, precision
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
                ranks = 1.0
            else:
                selected, total = select_global(top_values, spec.k, spec.world)
                ranks = float(spec.world.size)
            loss = total / (spec.k * num_columns)
            entries = selected_entries(top_rows, selected, groups, vertices, lse.dtype)
            ctx.weight_scale = ranks / (spec.k * num_columns)
        ctx.spec = spec
        ctx.precision = precision
        saved = [queries, keys, bias, values, scale, output, valid, lse, squared_norm]
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
        queries, keys, bias, values, scale, output, valid, lse, squared_norm, *entries = ctx.saved_tensors
        if not spec.compute_output:
            grad_output = None
        if spec.k is None:
            grad_loss = None
        if grad_output is None and grad_loss is None:
            return None, None, None, None, None, None, None, None
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
            picked_queries = queries[entry_row, entry_group].to(accumulate)
            logit = torch.einsum("ed,ed->e", picked_queries, keys[entry_group, entry_code].to(accumulate))
            if bias is not None:
                logit = logit + bias[entry_group, entry_code].to(accumulate)
            log_prob = logit - lse[entry_group, entry_row]
            if spec.knn_distance == "ce":
                row = row - weight * counts
                sparse = -weight * entry_weight
            else:
                prob = torch.exp(log_prob) * entry_weight
                mass = lse.new_zeros(groups * num_rows).index_add_(0, flat, prob).view(groups, num_rows)
                row = row - 2.0 * weight * (mass - counts * squared_norm)
                quad = (2.0 * weight * counts).contiguous()
                sparse = -2.0 * weight * prob
            row = row.contiguous()
        grad_queries, scaled_grad_scale, grad_keys, grad_bias, grad_values = launch.softmax_backward(
            queries, keys, bias, values, grad_output, valid, lse, row, quad, ctx.precision
        )
        scaled_grad_scale = scaled_grad_scale.sum(dim=1)
        if sparse is not None:  # the -w (CE) or -2 w p (L2) at the selected entries, added densely
            scaled_grad_scale = scaled_grad_scale.index_add(0, entry_group, sparse * log_prob)
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
            )
            grad_bias = grad_bias.reshape(-1).to(accumulate).index_add_(0, entry_group * size + entry_code, sparse)
            grad_bias = grad_bias.view(groups, size)
        grad_scale = scaled_grad_scale / scale.to(accumulate)
        return (
            (grad_queries * scale[:, None]).to(queries.dtype),
            grad_keys.to(keys.dtype),
            (grad_bias * scale[:, None].to(accumulate)).to(bias.dtype) if bias is not None else None,
            grad_values.to(values.dtype) if grad_output is not None else None,
            grad_scale.to(scale.dtype),
            None,
            None,
            None,
        )
