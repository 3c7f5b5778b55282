"""The reference backend of the streamed softmax layer: portable PyTorch, written to be read, the yardstick.

Two passes over chunks of rows, each holding one chunk's (c, G, M) logits at a time:

1. Without gradients: the logits of the chunk (:func:`simplexvq.functional.cosine_logits` /
   :func:`~simplexvq.functional.euclidean_logits`), its log-softmax, the hard codes, the statistics, and the
   chunk's deviations merged into the top-K of every (group, vertex) column with one ``topk`` over the K kept rows
   and the chunk's rows. Then the selection: the local top-K, or the global one across ranks
   (:func:`~simplexvq.scale.distributed.select_global`).
2. With gradients, each chunk under activation checkpointing: the output ``p Q`` and the sum of the chunk's
   selected deviations, recomputed from the logits. Autograd differentiates these plain expressions, so the
   gradients are those of the dense path by construction (no hand-written formula); the checkpoint keeps the
   backward's memory at one chunk.

Every shape depends on (N, G, M, K, d) only; the chunk loop is a Python loop, so the number of kernels grows with
N / chunk_size. Padded rows (``valid=False``) are zeroed on entry and weighted out of every sum, their deviations
are NaN (never selected: see :func:`~simplexvq.scale.topk.empty_slots_last`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from simplexvq import functional as VQF
from simplexvq.scale.attention import LogitsKind
from simplexvq.scale.backends.base import StreamedBackend
from simplexvq.scale.checks import KnnDistance
from simplexvq.scale.deviation import deviation
from simplexvq.scale.distributed import select_global, with_scaled_gradient
from simplexvq.scale.streamed import StreamedQuantization, StreamedRequest, check_streamed_arguments
from simplexvq.scale.topk import default_chunk_size, empty_slots_last

__all__ = ["ReferenceBackend", "reference_quantize", "reference_streamed_softmax_quantize"]


def _logits(distance: LogitsKind, z: Tensor, codebook: Tensor, temperature: Tensor) -> Tensor:
    if distance == "cosine":
        return VQF.cosine_logits(z, codebook, temperature)
    return VQF.euclidean_logits(z, codebook, temperature)


def reference_streamed_softmax_quantize(
    z: Tensor, codebook: Tensor, temperature: Tensor, **options: Any
) -> StreamedQuantization:
    """Softmax smoothing of ``z`` (N, G, d) with ``codebook`` (G, M, d), streamed over chunks of rows (the contract
    of :mod:`simplexvq.scale.streamed`); ``options`` are the fields of
    :class:`~simplexvq.scale.streamed.StreamedRequest`. ``chunk_size`` defaults to about 4M elements per
    (chunk, G, M) buffer; ``scope="global"`` joins collectives (call it on every rank, also with N = 0)."""
    return reference_quantize(StreamedRequest(z=z, codebook=codebook, temperature=temperature, **options))


def reference_quantize(request: StreamedRequest) -> StreamedQuantization:
    """:func:`reference_streamed_softmax_quantize` of a request made (and checked) already."""
    args = check_streamed_arguments(request)
    z, codebook, temperature = request.inputs
    distance, knn_distance, compute_output = request.distance, request.knn_distance, request.compute_output
    valid = request.valid
    num_rows, groups, _ = z.shape
    codebook_size = codebook.shape[1]
    chunk = request.chunk_size or default_chunk_size(groups * codebook_size)
    spans = [(start, min(start + chunk, num_rows)) for start in range(0, num_rows, chunk)]
    if valid is None:
        valid = torch.ones(num_rows, dtype=torch.bool, device=z.device)
    z = torch.where(valid[:, None, None], z, z.new_zeros(()))  # padding may hold anything, even NaN
    k, vertices = request.knn_k, request.vertices
    columns = groups * (codebook_size if vertices is None else vertices.shape[1])

    # Pass 1: codes, statistics, top-K per column.
    indices = torch.empty(num_rows, groups, dtype=torch.long, device=z.device)
    prob_sum = z.new_zeros(groups, codebook_size)
    perplexity_sum = z.new_zeros(groups)
    max_prob_sum = z.new_zeros(groups)
    if k is not None:
        top_values = z.new_full((k, columns), float("inf"))
        top_rows = torch.full((k, columns), -1, dtype=torch.long, device=z.device)
    with torch.no_grad():
        for start, end in spans:
            log_p = torch.log_softmax(_logits(distance, z[start:end], codebook, temperature), dim=-1)
            p = log_p.exp()
            weight = valid[start:end].to(z.dtype)
            indices[start:end] = torch.where(valid[start:end, None], log_p.argmax(dim=-1), -1)
            prob_sum += torch.einsum("n,ngm->gm", weight, p)
            perplexity_sum += torch.einsum("n,ng->g", weight, (-(p * log_p).sum(dim=-1)).exp())
            max_prob_sum += torch.einsum("n,ng->g", weight, p.amax(dim=-1))
            if k is not None:
                chunk_deviation = deviation(log_p, knn_distance, vertices).reshape(end - start, columns)
                chunk_rows = torch.arange(start, end, device=z.device).unsqueeze(1).expand(-1, columns)
                chunk_rows = torch.where(valid[start:end, None], chunk_rows, -1)
                all_values = torch.cat([top_values, chunk_deviation])
                all_rows = torch.cat([top_rows, chunk_rows])
                top = empty_slots_last(all_values, all_rows).topk(k, dim=0, largest=False, sorted=False)
                top_values, top_rows = all_values.gather(0, top.indices), all_rows.gather(0, top.indices)
        count = valid.sum().to(z.dtype)
        stats = {
            "prob_perplexity": VQF.perplexity(prob_sum / count),
            "individual_perplexity": perplexity_sum / count,
            "max_prob": max_prob_sum / count,
        }
        if k is not None:
            scale = 1.0
            if args.world is None:
                selected = top_rows >= 0
                total = torch.where(selected, top_values, top_values.new_zeros(())).sum()
            else:
                selected, total = select_global(empty_slots_last(top_values, top_rows), k, args.world)
                selected &= top_rows >= 0
                scale = float(args.world.size)

    # Pass 2: the differentiable output and selected deviations, one checkpointed chunk at a time.
    if not (compute_output or k is not None):
        return StreamedQuantization(quantized=None, knn_loss=None, indices=indices, stats=stats)
    # Without rows (a rank of a global search) the loss still depends on every input, with zero gradients, so
    # that data-parallel gradient hooks fire on every rank.
    outputs, selected_sum = [], 0.0 * (z.sum() + codebook.sum() + temperature.sum())
    for start, end in spans:
        weights = None
        if k is not None:  # how often each (row of the chunk, column) is selected: 0 or 1
            with torch.no_grad():
                in_chunk = selected & (top_rows >= start) & (top_rows < end)
                local_rows = (top_rows - start).clamp(0, end - start - 1)
                weights = z.new_zeros(end - start, columns).scatter_add_(0, local_rows, in_chunk.to(z.dtype))
        output, part = checkpoint(
            _chunk_terms,
            z[start:end],
            codebook,
            temperature,
            weights,
            distance,
            knn_distance,
            vertices,
            compute_output,
            use_reentrant=False,
        )
        outputs.append(output)
        selected_sum = selected_sum + part
    quantized = None
    if compute_output:
        quantized = torch.cat(outputs) if outputs else z.new_zeros(z.shape)
        quantized = torch.where(valid[:, None, None], quantized, quantized.new_zeros(()))
    loss = None
    if k is not None:
        normaliser = k * columns
        loss = with_scaled_gradient(total / normaliser, selected_sum / normaliser, scale)
    return StreamedQuantization(quantized=quantized, knn_loss=loss, indices=indices, stats=stats)


def _chunk_terms(
    z: Tensor,
    codebook: Tensor,
    temperature: Tensor,
    weights: Tensor | None,
    distance: LogitsKind,
    knn_distance: KnnDistance,
    vertices: Tensor | None,
    compute_output: bool,
) -> tuple[Tensor, Tensor]:
    """A chunk's smoothed output ``p Q`` (c, G, d) (empty unless asked for) and ``sum(weights * D)``, the sum of its
    selected deviations (zero without ``weights``)."""
    log_p = torch.log_softmax(_logits(distance, z, codebook, temperature), dim=-1)
    output = torch.einsum("ngm,gmd->ngd", log_p.exp(), codebook) if compute_output else z.new_zeros(0)
    if weights is None:
        return output, z.new_zeros(())
    chunk_deviation = deviation(log_p, knn_distance, vertices).reshape(weights.shape)
    return output, (weights * chunk_deviation).sum()


class ReferenceBackend(StreamedBackend):
    """:func:`reference_streamed_softmax_quantize`; no state between calls."""

    name = "reference"

    def quantize(self, request: StreamedRequest) -> StreamedQuantization:  # noqa: D102
        return reference_quantize(request)
