"""Auxiliary losses of the smoothing methods (eq. 11-13), by name, and the KNN regularizer's choice of computation:
the dense :func:`simplexvq.functional.knn_loss`, or :func:`simplexvq.scale.knn_loss.knn_loss_scaled` when its
neighbours are searched across ranks, its top-K is streamed in chunks or it sums over a vertex subset."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.distributed as dist
from torch import Tensor

from simplexvq import functional as VQF
from simplexvq.scale.checks import KnnScope
from simplexvq.scale.knn_loss import knn_loss_scaled

# (log_probs of shape (N, G, M), K) -> scalar loss
RegularizerFn = Callable[[Tensor, int], Tensor]


def _perplexity(log_probs: Tensor, k: int) -> Tensor:
    return VQF.perplexity_loss(log_probs.exp())


def _knn(log_probs: Tensor, k: int, distance: VQF.KnnDistance) -> Tensor:
    return VQF.knn_loss(log_probs, k, distance)


REGULARIZERS: dict[str, RegularizerFn] = {
    "knn_ce": partial(_knn, distance="ce"),
    "knn_l2": partial(_knn, distance="l2"),
    "perplexity": _perplexity,
}


def knn_regularizer(
    log_probs: Tensor,
    k: int,
    distance: VQF.KnnDistance,
    *,
    scope: KnnScope = "local",
    chunk_size: int | None = None,
    vertices: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Eq. 13 on ``log_probs`` (N, G, M): the dense function for a local search over every vertex without chunks,
    else the computation at scale (same value and gradient; see :func:`~simplexvq.scale.knn_loss.knn_loss_scaled`
    for ``scope``, ``chunk_size``, ``vertices`` and ``group``)."""
    if scope == "local" and chunk_size is None and vertices is None:
        return VQF.knn_loss(log_probs, k, distance)
    return knn_loss_scaled(log_probs, k, distance, scope=scope, chunk_size=chunk_size, vertices=vertices, group=group)
