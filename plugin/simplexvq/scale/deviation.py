"""The deviations ``D(e_m, p)`` of eq. 13 between a simplex vertex and a row of probabilities."""

from __future__ import annotations

from torch import Tensor

from simplexvq.scale.checks import KnnDistance

__all__ = ["deviation", "vertex_columns"]


def deviation(log_probs: Tensor, distance: KnnDistance, vertices: Tensor | None = None) -> Tensor:
    """``D(e_m, p_n)`` for every row and vertex column: (N, G, M) log-probabilities -> (N, G, S).

    ``"ce"``: ``-log p_m``; ``"l2"``: ``|e_m - p|^2 = 1 - 2 p_m + |p|^2``. ``vertices`` (G, S) keeps those columns.
    """
    if distance == "ce":
        picked = log_probs if vertices is None else vertex_columns(log_probs, vertices)
        return -picked
    probs = log_probs.exp()
    squared_norm = probs.pow(2).sum(dim=-1, keepdim=True)
    picked = probs if vertices is None else vertex_columns(probs, vertices)
    return 1.0 - 2.0 * picked + squared_norm


def vertex_columns(x: Tensor, vertices: Tensor) -> Tensor:
    """``x[n, g, vertices[g, s]]``: (N, G, M) -> (N, G, S)."""
    return x.gather(-1, vertices.unsqueeze(0).expand(x.shape[0], -1, -1))
