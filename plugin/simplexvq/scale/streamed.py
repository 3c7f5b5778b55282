"""The streamed softmax layer's contract: what every backend computes, and the checks of its arguments.

Every backend computes, for ``z`` (N, G, d), ``codebook`` (G, M, d) and ``temperature`` (G,), without ever holding
the (N, G, M) logits, the same values and gradients (ties of the top-K aside) as the dense computation
``log_pi = log_softmax(logits)``, ``quantized = einsum(pi, Q)``,
``knn_loss(log_pi, knn_k, knn_distance, scope=..., vertices=...)`` and the statistics of ``pi``, over the rows
with ``valid`` set (all rows without ``valid``). Rows with ``valid=False`` (padding) take no part in any loss,
statistic or neighbour search; their ``quantized`` rows are zero and their ``indices`` are -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from simplexvq.scale.checks import KnnDistance, KnnScope, check_chunk_size, check_k, check_k_fits, check_vertices
from simplexvq.scale.distributed import World, global_row_count, world_of

__all__ = ["StreamedArguments", "StreamedQuantization", "check_streamed_arguments", "expand_rows"]


@dataclass
class StreamedQuantization:
    """Result of a streamed softmax quantization of ``N`` rows.

    ``quantized`` (N, G, d) the smoothed output ``p Q`` (``None`` unless asked for); ``knn_loss`` eq. 13 (``None``
    without ``knn_k``); ``indices`` (N, G) the hard codes ``argmax p``; ``stats`` per group (G,):
    ``prob_perplexity``, ``individual_perplexity``, ``max_prob`` (as :func:`simplexvq.stats.probability_stats`;
    NaN without rows); ``knn_hint`` (G M,) the per-vertex ceiling to pass to the next call of the CPU backend as
    ``knn_hint`` (only for the CE regularizer over every vertex; ``None`` otherwise and for other backends; see
    :mod:`simplexvq.scale.backends.ceiling`).
    """

    quantized: Tensor | None
    knn_loss: Tensor | None
    indices: Tensor
    stats: dict[str, Tensor]
    knn_hint: Tensor | None = None


@dataclass(frozen=True)
class StreamedArguments:
    """The checked arguments of a streamed call: ``k`` (``None``: no regularizer), ``vertices`` (G, S) on the
    input's device or ``None``, ``world`` (``None``: local search), ``chunk_size`` (``None``: the default)."""

    k: int | None
    vertices: Tensor | None
    world: World | None
    chunk_size: int | None


def check_streamed_arguments(
    z: Tensor,
    codebook: Tensor,
    *,
    distance: str,
    knn_k: int | None,
    knn_distance: KnnDistance,
    chunk_size: int | None,
    scope: KnnScope,
    vertices: Tensor | None,
    group: dist.ProcessGroup | None,
    valid: Tensor | None,
    function: str,
) -> StreamedArguments:
    """Raise ``ValueError`` naming the problem and the fix; join the row count's ``all_reduce`` for a global
    search. Counting the valid rows reads a value back from the device (these checks serve the backends that
    compact rows; a sync-free backend checks on the device), except under ``torch.compile`` where K against the
    number of valid rows is a device-side assertion."""
    if z.dim() != 3 or codebook.dim() != 3 or z.shape[1:] != (codebook.shape[0], codebook.shape[2]):
        raise ValueError(
            f"{function}: z must be (N, G, d) and codebook (G, M, d), got {tuple(z.shape)} and {tuple(codebook.shape)}"
        )
    if distance not in ("cosine", "euclid"):
        raise ValueError(f"{function}: distance must be 'cosine' or 'euclid', got {distance!r}")
    if valid is not None and (valid.dtype != torch.bool or valid.shape != z.shape[:1]):
        raise ValueError(
            f"{function}: valid must be a bool tensor of shape (N,) = ({z.shape[0]},) marking the rows to use, got "
            f"{valid.dtype} of shape {tuple(valid.shape)}"
        )
    groups, codebook_size = codebook.shape[:2]
    chunk_size = check_chunk_size(chunk_size, function)
    if knn_k is None:
        return StreamedArguments(k=None, vertices=None, world=None, chunk_size=chunk_size)
    knn_k = check_k(knn_k, "knn_loss")
    if knn_distance not in ("ce", "l2"):
        raise ValueError(f"knn_loss: distance must be 'ce' or 'l2', got {knn_distance!r}")
    vertices = check_vertices(vertices, groups, codebook_size, "knn_loss")
    if vertices is not None:
        vertices = vertices.to(z.device)
    world = world_of(scope, group)
    if valid is not None and world is None and torch.compiler.is_compiling():  # traced: checked on the device
        torch._assert_async(
            valid.sum() >= knn_k,
            f"knn_loss: k={knn_k} neighbours per code vector requested, but the batch holds fewer (unpadded) "
            "positions; K must not exceed N: lower k or use a larger batch",
        )
        return StreamedArguments(k=knn_k, vertices=vertices, world=world, chunk_size=chunk_size)
    num_rows = z.shape[0] if valid is None else int(valid.sum())
    if world is None:
        check_k_fits(knn_k, num_rows, "knn_loss")
    else:
        check_k_fits(knn_k, global_row_count(num_rows, world, z.device), "knn_loss", world.size)
    return StreamedArguments(k=knn_k, vertices=vertices, world=world, chunk_size=chunk_size)


def expand_rows(result: StreamedQuantization, valid: Tensor) -> StreamedQuantization:
    """The result of a call on the rows ``valid`` selects, put back in place among all ``len(valid)`` rows: zero
    ``quantized`` rows and ``-1`` indices where ``valid`` is False (the losses and statistics are unchanged)."""
    num_rows = valid.shape[0]
    indices = result.indices.new_full((num_rows, result.indices.shape[1]), -1)
    indices[valid] = result.indices
    quantized = None
    if result.quantized is not None:
        quantized = result.quantized.new_zeros(num_rows, *result.quantized.shape[1:])
        quantized = quantized.index_put((valid.nonzero().squeeze(1),), result.quantized)
    return StreamedQuantization(
        quantized=quantized, knn_loss=result.knn_loss, indices=indices, stats=result.stats, knn_hint=result.knn_hint
    )
