"""Auxiliary losses of the smoothing methods (eq. 11-13), by name."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor

from simplexvq import functional as VQF

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
