"""The typed result of a quantizer's forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class QuantizerOutput:
    """What every quantizer returns.

    * ``quantized``: same shape as the input; zeros at padded positions.
    * ``indices``: (..., G) code index per group (the argmax of the assignment probabilities for smoothing
      methods, the nearest code for hard ones); ``-1`` at padded positions.
    * ``loss``: the total auxiliary loss, the sum of ``losses`` (add it to the task loss, eq. 9).
    * ``losses``: each named term, already weighted, e.g. ``{"knn_ce": ...}`` or
      ``{"commitment": ..., "codebook": ...}``; empty when the method has none.
    * ``stats``: detached per-group statistics of shape (G,): ``code_perplexity`` (hard codes); for smoothing
      methods also ``prob_perplexity`` (perplexity of the mean assignment probability), ``individual_perplexity``
      (mean perplexity of each position's probabilities), ``max_prob`` (mean largest probability: how onehot the
      smoothing is) and ``temperature``.
    * ``probs``: assignment probabilities ``pi`` of shape (..., G, M), only when asked for (they are large).
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)
    probs: Tensor | None = None
