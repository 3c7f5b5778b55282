"""The CPU backend of the streamed softmax layer: CPU speed tricks around one chunked autograd function.

Forward: per chunk of rows, the logits as one ``bmm`` into a reused buffer, the softmax, the output, the hard codes
(a fast first-index argmax from block maxima, :mod:`~simplexvq.scale.backends.blockmax`), the statistics and the
KNN top-K. For the CE regularizer over every vertex the top-K starts from a per-vertex ceiling carried over from
the previous step (:mod:`~simplexvq.scale.backends.ceiling`), held by :class:`CpuBackend` between calls; the
candidates below it are found from block maxima without a deviation matrix
(:mod:`~simplexvq.scale.backends.candidates`). Backward: per chunk, the logits are recomputed and the analytic
softmax/KNN gradient is backpropagated to z, Q and tau. Peak memory ``O(chunk * G * M + K * G * M)``; the work is
that of the dense path plus one recomputation of the logits. Fast on the CPU; on a GPU its data-dependent
candidate extraction reads sizes back from the device (``nonzero``), so it is not the GPU path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from simplexvq import functional as VQF
from simplexvq.scale.attention import LogitsKind, attention_keys, attention_queries
from simplexvq.scale.backends.base import StreamedBackend
from simplexvq.scale.backends.blockmax import BlockMaxima
from simplexvq.scale.backends.ceiling import CeilingTopK
from simplexvq.scale.checks import KnnDistance
from simplexvq.scale.deviation import vertex_columns
from simplexvq.scale.distributed import World, select_global
from simplexvq.scale.knn_loss import selected_entries
from simplexvq.scale.streamed import StreamedQuantization, StreamedRequest, check_streamed_arguments, expand_rows
from simplexvq.scale.topk import RunningTopK, default_chunk_size, empty_slots_last

__all__ = ["CpuBackend", "cpu_quantize", "cpu_streamed_softmax_quantize"]


def cpu_streamed_softmax_quantize(
    z: Tensor, codebook: Tensor, temperature: Tensor, *, knn_hint: Tensor | None = None, **options: Any
) -> StreamedQuantization:
    """Softmax smoothing of ``z`` (N, G, d) with ``codebook`` (G, M, d), streamed over chunks of rows (the contract
    of :mod:`simplexvq.scale.streamed`); ``options`` are the fields of
    :class:`~simplexvq.scale.streamed.StreamedRequest`.

    ``chunk_size`` defaults to about 4M elements per (chunk, G, M) buffer. ``scope="global"`` joins collectives:
    call it on every rank, also with N = 0. ``knn_hint``: the previous call's ``result.knn_hint`` (same codebook
    shape); it makes the KNN-CE search faster and never changes its result (ties aside). ``valid`` (N,) bool: the
    rows to use; the others are left out before the computation (compacted) and put back as zeros / -1.
    """
    request = StreamedRequest(z=z, codebook=codebook, temperature=temperature, **options)
    return cpu_quantize(request, knn_hint)


def cpu_quantize(request: StreamedRequest, knn_hint: Tensor | None = None) -> StreamedQuantization:
    """:func:`cpu_streamed_softmax_quantize` of a request made (and checked) already."""
    args = check_streamed_arguments(request)
    z, codebook, temperature = request.inputs
    valid, compute_output = request.valid, request.compute_output
    groups, codebook_size = codebook.shape[:2]
    if knn_hint is not None:
        knn_hint = knn_hint.detach()
        if knn_hint.shape != (groups * codebook_size,):
            raise ValueError(
                f"streamed_softmax_quantize: knn_hint must have shape (G * M,) = ({groups * codebook_size},), got "
                f"{tuple(knn_hint.shape)}: pass the knn_hint of a previous call with the same codebook shape"
            )
    rows = z if valid is None else z[valid]
    spec = _Spec(
        logits=request.distance,
        k=request.knn_k,
        distance=request.knn_distance,
        compute_output=compute_output,
        chunk_size=request.chunk_size or default_chunk_size(groups * codebook_size),
        world=args.world,
    )
    quantized, loss, indices, prob_sum, perplexity_sum, max_prob_sum, next_hint = _StreamedSoftmax.apply(
        rows, codebook, temperature, request.vertices, knn_hint, spec
    )
    num_rows = rows.shape[0]
    stats = {
        "prob_perplexity": VQF.perplexity(prob_sum / num_rows),
        "individual_perplexity": perplexity_sum / num_rows,
        "max_prob": max_prob_sum / num_rows,
    }
    result = StreamedQuantization(
        quantized=quantized if compute_output else None,
        knn_loss=loss if request.knn_k is not None else None,
        indices=indices,
        stats=stats,
        knn_hint=next_hint if next_hint.numel() else None,
    )
    return result if valid is None else expand_rows(result, valid)


class CpuBackend(StreamedBackend):
    """:func:`cpu_streamed_softmax_quantize`, carrying the KNN-CE ceiling (``knn_hint``) from one call to the next.

    The ceiling speeds up the search and never changes its result, so it is plain state of this object (not in a
    ``state_dict``, not broadcast by DDP); it follows the input's device and dtype.
    """

    name = "cpu"

    def __init__(self) -> None:
        self.knn_hint: Tensor | None = None

    def quantize(self, request: StreamedRequest) -> StreamedQuantization:  # noqa: D102
        z, codebook = request.z, request.codebook
        hint = None if self.knn_hint is None else self.knn_hint.to(device=z.device, dtype=z.dtype)
        if hint is not None and hint.shape != (codebook.shape[0] * codebook.shape[1],):
            hint = None  # a different codebook shape: start without a ceiling
        result = cpu_quantize(request, hint)
        self.knn_hint = result.knn_hint
        return result


@dataclass(frozen=True)
class _Spec:
    logits: LogitsKind
    k: int | None
    distance: KnnDistance
    compute_output: bool
    chunk_size: int
    world: World | None


class _Workspace:
    """Two reused (G, chunk, M) buffers: one allocation per call instead of several per chunk (fresh buffers of
    this size are page-faulted in on every chunk, which costs as much as a pass over them)."""

    def __init__(self, groups: int, rows: int, size: int, like: Tensor) -> None:
        self.groups, self.size = groups, size
        self.buffers = [like.new_empty(groups * rows * size) for _ in range(2)]

    def get(self, which: int, rows: int) -> Tensor:
        return self.buffers[which][: self.groups * rows * self.size].view(self.groups, rows, self.size)


def _chunk_deviation(
    spec: _Spec, logits: Tensor, shifted: Tensor, inverse: Tensor, lse: Tensor, vertices: Tensor | None
) -> Tensor:
    """Deviations (c, G * S) of a chunk from its (G, c, M) logits and ``shifted`` (``p = shifted * inverse``)."""

    def columns(x: Tensor) -> Tensor:  # (G, c, M) -> (c, G, S)
        x = x.transpose(0, 1)
        return x if vertices is None else vertex_columns(x, vertices)

    if spec.distance == "ce":  # -log p_m = lse - l_m
        out = lse.t().unsqueeze(-1) - columns(logits)
    else:  # 1 - 2 p_m + |p|^2
        squared_norm = (torch.einsum("gcm,gcm->gc", shifted, shifted) * inverse.square()).t()
        out = (1.0 + squared_norm).unsqueeze(-1) - (2.0 * inverse.t()).unsqueeze(-1) * columns(shifted)
    return out.reshape(out.shape[0], -1)


class _StreamedSoftmax(torch.autograd.Function):
    """Forward: per chunk, logits -> softmax -> (output, top-K merge, codes, statistics). Backward: per chunk,
    recompute the logits under autograd, form the logits' gradient analytically, backpropagate it to z, Q, tau.

    With ``p = softmax(l)``, upstream ``dO`` for ``O = p V`` and KNN weight ``w`` (``scale / (K G S)`` times the
    upstream gradient of the loss), the gradient of a row's logits is::

        output : p * (dO V^T - <dO, O>)
        CE     : w (c_n p - 1_S)                                      (D = -log p_m)
        L2     : p * (2 w c_n p + 2 w sum_S p_m - 2 w c_n |p|^2) - 2 w p * 1_S   (D = 1 - 2 p_m + |p|^2)

    where ``1_S`` marks the row's selected vertices and ``c_n`` counts them; ``V = Q`` gets ``p^T dO`` besides.
    Row-constant terms are folded into one (G, c) vector and ``p = e / s`` is never normalised in place, so a
    chunk costs a few passes over its (G, c, M) buffers besides the matrix products. Chunks are laid out
    group-major, (G, c, M), so that every product is one ``bmm`` into a reused buffer.
    """

    @staticmethod
    def forward(ctx, z, codebook, temperature, vertices, hint, spec):  # noqa: D102
        num_rows, groups, dim = z.shape
        codebook_size = codebook.shape[1]
        columns = groups * (codebook_size if vertices is None else vertices.shape[1])
        quantized = z.new_empty(num_rows, groups, dim) if spec.compute_output else z.new_empty(0, groups, dim)
        indices = torch.empty(num_rows, groups, dtype=torch.long, device=z.device)
        prob_sum = z.new_zeros(groups, codebook_size)
        perplexity_sum = z.new_zeros(groups)
        max_prob_sum = z.new_zeros(groups)
        state = search = None
        with_ceiling = spec.k is not None and spec.distance == "ce" and vertices is None
        if with_ceiling:  # candidates from block maxima below a ceiling carried over from the previous step
            search = CeilingTopK(spec.k, groups, codebook_size, hint, dtype=z.dtype, device=z.device)
            lse_rows = z.new_empty(groups, num_rows)
        elif spec.k is not None:
            state = RunningTopK.empty(spec.k, columns, dtype=z.dtype, device=z.device)
        keys = attention_keys(spec.logits, codebook)
        keys_t = keys.transpose(1, 2)  # (G, d', M)
        workspace = _Workspace(groups, min(spec.chunk_size, num_rows), codebook_size, z)
        for start in range(0, num_rows, spec.chunk_size):
            end = min(start + spec.chunk_size, num_rows)
            queries = attention_queries(spec.logits, z[start:end], temperature).transpose(0, 1)  # (G, c, d')
            logits = torch.bmm(queries, keys_t, out=workspace.get(0, end - start))  # (G, c, M)
            blocks = BlockMaxima.of(logits)
            top = blocks.top
            indices[start:end] = blocks.argmax().t()
            shifted = torch.sub(logits, top.unsqueeze(-1), out=workspace.get(1, end - start)).exp_()
            total = shifted.sum(dim=-1)
            inverse = total.reciprocal()  # = max p
            lse = top + total.log()
            prob_sum += torch.bmm(inverse.unsqueeze(1), shifted).squeeze(1)
            entropy = lse - torch.einsum("gcm,gcm->gc", shifted, logits) * inverse  # -sum p log p
            perplexity_sum += entropy.exp().sum(dim=1)
            max_prob_sum += inverse.sum(dim=1)
            if spec.compute_output:
                output = torch.bmm(shifted, codebook) * inverse.unsqueeze(-1)  # (G, c, d)
                quantized[start:end] = output.transpose(0, 1)
            if search is not None:
                lse_rows[:, start:end] = lse
                search.add(logits, lse, blocks, start)
            elif state is not None:
                state.update(_chunk_deviation(spec, logits, shifted, inverse, lse, vertices), start)
        del workspace
        next_hint = z.new_empty(0)
        if search is not None:

            def recompute(missing: Tensor, keep: int) -> RunningTopK:
                return _recomputed_topk(spec, z, temperature, keys, lse_rows, missing, keep)

            state, ceiling = search.finish(recompute)
            if ceiling is not None:
                next_hint = ceiling

        loss = z.new_zeros(())
        rows = selected = None
        scale = 1.0
        if state is not None:
            if spec.world is None:
                selected, total_top = state.rows >= 0, state.values.sum()
            else:
                candidates = empty_slots_last(state.values, state.rows)
                selected, total_top = select_global(candidates, spec.k, spec.world)
                selected &= state.rows >= 0
                scale = float(spec.world.size)
            loss = total_top / (spec.k * columns)
            rows = state.rows
        ctx.scale = scale / (spec.k * columns) if spec.k is not None else 0.0
        ctx.spec = spec
        ctx.save_for_backward(z, codebook, temperature, quantized, vertices, rows, selected)
        ctx.mark_non_differentiable(indices, prob_sum, perplexity_sum, max_prob_sum, next_hint)
        ctx.set_materialize_grads(False)
        return quantized, loss, indices, prob_sum, perplexity_sum, max_prob_sum, next_hint

    @staticmethod
    def backward(ctx, grad_quantized, grad_loss, *unused):  # noqa: D102
        z, codebook, temperature, quantized, vertices, rows, selected = ctx.saved_tensors
        spec: _Spec = ctx.spec
        if not spec.compute_output:
            grad_quantized = None
        if spec.k is None:
            grad_loss = None
        if grad_quantized is None and grad_loss is None:
            return None, None, None, None, None, None
        num_rows, groups, _ = z.shape
        codebook_size = codebook.shape[1]
        if grad_loss is not None:
            entry_row, entry_group, entry_code = selected_entries(rows, selected, groups, vertices)
            bounds = torch.arange(0, num_rows + spec.chunk_size, spec.chunk_size, device=z.device).clamp_max(num_rows)
            cuts = torch.searchsorted(entry_row, bounds).tolist()
            weight = grad_loss * ctx.scale
        need_z, need_codebook, need_temperature = ctx.needs_input_grad[:3]
        grad_z = torch.zeros_like(z) if need_z else None
        grad_codebook = torch.zeros_like(codebook) if need_codebook else None
        grad_temperature = torch.zeros_like(temperature) if need_temperature else None
        codebook_leaf = codebook.detach().requires_grad_(need_codebook)
        with torch.enable_grad():
            keys_graph = attention_keys(spec.logits, codebook_leaf)
        keys = keys_graph.detach()
        keys_t = keys.transpose(1, 2)
        codebook_t = codebook.detach().transpose(1, 2)
        grad_keys = torch.zeros_like(keys) if need_codebook else None
        temperature_leaf = temperature.detach().requires_grad_(need_temperature)
        workspace = _Workspace(groups, min(spec.chunk_size, num_rows), codebook_size, z)

        for chunk, start in enumerate(range(0, num_rows, spec.chunk_size)):
            end = min(start + spec.chunk_size, num_rows)
            has_entries = grad_loss is not None and cuts[chunk + 1] > cuts[chunk]
            if grad_quantized is None and not has_entries:
                continue
            z_chunk = z[start:end].detach().requires_grad_(need_z)
            with torch.enable_grad():
                queries = attention_queries(spec.logits, z_chunk, temperature_leaf)
            chunk_queries = queries.detach().transpose(0, 1)  # (G, c, d')
            shifted = torch.bmm(chunk_queries, keys_t, out=workspace.get(0, end - start))  # the logits, then:
            shifted.sub_(shifted.amax(dim=-1, keepdim=True)).exp_()  # e = exp(l - max l)
            inverse = shifted.sum(dim=-1).reciprocal()  # (G, c)
            # grad_logits = shifted * (inner - row[..., None]), with p = shifted * inverse
            row = torch.zeros_like(inverse)
            if grad_quantized is not None:
                upstream = grad_quantized[start:end].transpose(0, 1) * inverse.unsqueeze(-1)  # (G, c, d)
                inner = torch.bmm(upstream, codebook_t, out=workspace.get(1, end - start))
                row += torch.einsum("gcd,gcd->gc", upstream, quantized[start:end].transpose(0, 1))
                if grad_codebook is not None:
                    grad_codebook += torch.bmm(shifted.transpose(1, 2), upstream)
            else:
                inner = workspace.get(1, end - start).zero_()
            if has_entries:
                span = slice(cuts[chunk], cuts[chunk + 1])
                sparse = _add_knn_gradient(
                    spec.distance,
                    inner,
                    row,
                    shifted,
                    inverse,
                    (entry_group[span], entry_row[span] - start, entry_code[span]),
                    weight,
                )
            inner.sub_(row.unsqueeze(-1)).mul_(shifted)
            if has_entries:
                inner.index_put_(sparse[0], sparse[1], accumulate=True)
            grad_queries = torch.bmm(inner, keys).transpose(0, 1)  # (c, G, d')
            if grad_keys is not None:
                grad_keys += torch.bmm(inner.transpose(1, 2), chunk_queries)
            wanted = [x for x in (z_chunk, temperature_leaf) if x.requires_grad]
            if wanted:
                grads = iter(torch.autograd.grad(queries, wanted, grad_queries))
                if grad_z is not None:
                    grad_z[start:end] = next(grads)
                if grad_temperature is not None:
                    grad_temperature += next(grads)
        del workspace
        if grad_codebook is not None:
            (grad_from_keys,) = torch.autograd.grad(keys_graph, codebook_leaf, grad_keys)
            grad_codebook += grad_from_keys
        return grad_z, grad_codebook, grad_temperature, None, None, None


def _recomputed_topk(
    spec: _Spec,
    z: Tensor,
    temperature: Tensor,
    keys: Tensor,
    lse_rows: Tensor,
    columns: Tensor,
    keep: int,
) -> RunningTopK:
    """The running top-``keep`` of the CE deviations ``lse - logit`` of ``columns`` (flat ``g M + m``) over all rows,
    from those columns' logits only (a (chunk, len(columns)) product per chunk)."""
    num_rows = z.shape[0]
    size = keys.shape[1]
    group = columns.div(size, rounding_mode="floor")
    code = columns - group * size
    per_group = [(g, (group == g).nonzero().squeeze(1)) for g in group.unique().tolist()]
    keys_of = {g: keys[g].index_select(0, code[where]).t() for g, where in per_group}

    def chunk_deviation(start: int, end: int) -> Tensor:
        queries = attention_queries(spec.logits, z[start:end], temperature)  # (c, G, d')
        out = z.new_empty(end - start, columns.numel())
        for g, where in per_group:
            out[:, where] = lse_rows[g, start:end].unsqueeze(-1) - queries[:, g] @ keys_of[g]
        return out

    state = RunningTopK.empty(keep, columns.numel(), dtype=z.dtype, device=z.device)
    every = torch.arange(columns.numel(), device=z.device)
    chunk_size = default_chunk_size(columns.numel())
    for start in range(0, num_rows, chunk_size):  # few columns: one dense top-K per chunk
        end = min(start + chunk_size, num_rows)
        rows = torch.arange(start, end, device=z.device).unsqueeze(1)
        state.merge_dense(every, chunk_deviation(start, end), rows)
    state.rows_seen = num_rows
    return state


def _add_knn_gradient(
    distance: str,
    inner: Tensor,
    row: Tensor,
    shifted: Tensor,
    inverse: Tensor,
    entries: tuple[Tensor, Tensor, Tensor],
    weight: Tensor,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """Fold the KNN term's gradient w.r.t. a chunk's (G, c, M) logits into ``inner`` and ``row`` (in place), where
    the final gradient is ``shifted * (inner - row)`` plus the returned sparse part ``(indices, values)`` at the
    selected entries ``(group, row, code)`` (see :class:`_StreamedSoftmax`; ``p = shifted * inverse``)."""
    index_group, index_row, _ = entries
    counts = torch.zeros_like(inverse).index_put_(
        (index_group, index_row), torch.ones_like(index_row, dtype=inverse.dtype), accumulate=True
    )
    if distance == "ce":  # w (c p - 1_S): c p folds into the row term
        row -= weight * counts * inverse
        return entries, (-weight).expand(index_row.shape)
    picked = shifted[entries] * inverse[index_group, index_row]
    selected_mass = torch.zeros_like(inverse).index_put_((index_group, index_row), picked, accumulate=True)
    squared_norm = torch.einsum("gcm,gcm->gc", shifted, shifted) * inverse.square()
    row -= 2.0 * weight * (selected_mass - counts * squared_norm) * inverse
    touched = (counts > 0).nonzero(as_tuple=True)  # 2 w c p * p: only rows with a selection
    inner[touched] += (2.0 * weight * counts * inverse.square())[touched].unsqueeze(-1) * shifted[touched]
    return entries, -2.0 * weight * picked
