"""Codebook parameterisations: every one returns the (G, M, d) matrix of code vectors.

Each module has ``reset_parameters()`` so that a quantizer built on the meta device (``torch.device("meta")``,
then ``to_empty``) can be initialised in place, as fairseq2 and FSDP do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Codebook(nn.Module):
    """Plain learnable code vectors, one (M, d) matrix per group, drawn from N(0, init_std^2)."""

    def __init__(self, groups: int, codebook_size: int, group_dim: int, init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(groups, codebook_size, group_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.normal_(0.0, self.init_std)

    def forward(self) -> Tensor:
        return self.weight


class SimVQCodebook(nn.Module):
    """SimVQ (Zhu et al. 2024): code vectors ``C W^T + b`` with a frozen random basis C and a learnable linear map.

    C is drawn once from N(0, init_std^2) and stored as a buffer (saved in checkpoints, never trained); each group
    has its own ``nn.Linear(d, d)`` (with bias, PyTorch's default initialisation, as in the official code).
    """

    def __init__(self, groups: int, codebook_size: int, group_dim: int, init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.register_buffer("basis", torch.empty(groups, codebook_size, group_dim))
        self.weight = nn.Parameter(torch.empty(groups, group_dim, group_dim))
        self.bias = nn.Parameter(torch.empty(groups, group_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.basis.normal_(0.0, self.init_std)
        group_dim = self.weight.shape[-1]
        for group in range(self.weight.shape[0]):  # nn.Linear's default initialisation, per group
            nn.init.kaiming_uniform_(self.weight[group], a=math.sqrt(5))
        bound = 1.0 / math.sqrt(group_dim)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self) -> Tensor:
        return torch.einsum("gmd,ged->gme", self.basis, self.weight) + self.bias[:, None, :]
