"""Logits of the smoothing methods: cosine (appendix A.1) or Euclidean, over a learnable per-group temperature."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from simplexvq import functional as VQF
from simplexvq.config import Distance


class CodeLogits(nn.Module):
    """``logits[n, g, m] = similarity(z[n, g], q[g, m]) / tau_g``, with tau learnable and shared by a group's codebook.

    The temperature is stored as its logarithm (so it stays positive) and clamped below at ``min_temperature``.
    """

    def __init__(
        self,
        groups: int,
        distance: Distance,
        init_temperature: float,
        *,
        learnable: bool = True,
        min_temperature: float = 1e-3,
    ) -> None:
        super().__init__()
        self.distance = distance
        self.init_temperature = init_temperature
        self.min_temperature = min_temperature
        log_temperature = torch.empty(groups)
        if learnable:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.log_temperature.fill_(math.log(self.init_temperature))

    @property
    def temperature(self) -> Tensor:
        """Current temperature per group, shape (G,)."""
        return self.log_temperature.exp().clamp_min(self.min_temperature)

    def forward(self, z: Tensor, codebook: Tensor) -> Tensor:
        """``z``: (N, G, d); ``codebook``: (G, M, d); returns (N, G, M)."""
        if self.distance == "cosine":
            return VQF.cosine_logits(z, codebook, self.temperature)
        return VQF.euclidean_logits(z, codebook, self.temperature)
