"""Smoothed quantization (section 2.2): from logits to weights on the simplex that mix the code vectors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from simplexvq import functional as VQF


@dataclass
class Smoothed:
    """Weights used to mix code vectors (``quantized = weights @ Q``) and the sample to regularise, if any.

    ``sample_log_probs`` is the log of the (soft) Gumbel sample ``p`` for the Gumbel methods, else ``None``
    (for softmax, ``p = pi``).
    """

    weights: Tensor
    sample_log_probs: Tensor | None


SmoothingFn = Callable[[Tensor, float], Smoothed]


def softmax_smoothing(log_pi: Tensor, gumbel_temperature: float) -> Smoothed:
    """``p = pi = softmax(logits)`` (section 3: no Gumbel sampling needed with the KNN regularizer)."""
    return Smoothed(weights=log_pi.exp(), sample_log_probs=None)


def soft_gumbel_smoothing(log_pi: Tensor, gumbel_temperature: float) -> Smoothed:
    """Soft Gumbel-softmax sample, eq. 7."""
    p = VQF.gumbel_softmax(log_pi, gumbel_temperature)
    return Smoothed(weights=p, sample_log_probs=p.clamp_min(torch.finfo(p.dtype).tiny).log())


def hard_gumbel_smoothing(log_pi: Tensor, gumbel_temperature: float) -> Smoothed:
    """Onehot Gumbel sample with the straight-through gradient of the soft sample, eq. 6-8."""
    p = VQF.gumbel_softmax(log_pi, gumbel_temperature)
    return Smoothed(
        weights=VQF.onehot_straight_through(p),
        sample_log_probs=p.clamp_min(torch.finfo(p.dtype).tiny).log(),
    )


SMOOTHINGS: dict[str, SmoothingFn] = {
    "softmax": softmax_smoothing,
    "soft_gumbel": soft_gumbel_smoothing,
    "hard_gumbel": hard_gumbel_smoothing,
}
