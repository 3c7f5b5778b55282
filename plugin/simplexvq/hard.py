"""Hard quantization (section 2.1): nearest code vector, gradient estimator and its losses (eq. 2-4, 10)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from simplexvq import functional as VQF
from simplexvq.config import Distance


@dataclass
class Nearest:
    """The nearest code vector of every input under the chosen distance, in the space the losses live in.

    For the cosine distance both ``inputs`` and ``codes`` are L2-normalised (the lookup and the losses of
    cosine VQ happen on the unit sphere); for the Euclidean distance they are the raw vectors.
    """

    inputs: Tensor  # (N, G, d)
    codes: Tensor  # (N, G, d), q_iota(z)
    indices: Tensor  # (N, G)


def nearest_codes(z: Tensor, codebook: Tensor, distance: Distance) -> Nearest:
    """``iota(z) = argmin_m D(z, q_m)`` per group; ``z``: (N, G, d), ``codebook``: (G, M, d)."""
    if distance == "cosine":
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(codebook, dim=-1)
        scores = torch.einsum("ngd,gmd->ngm", z.detach(), codebook.detach())
    else:
        unit = torch.ones(codebook.shape[0], device=z.device, dtype=z.dtype)
        scores = VQF.euclidean_logits(z.detach(), codebook.detach(), unit)
    indices = scores.argmax(dim=-1)
    groups = torch.arange(codebook.shape[0], device=z.device)
    return Nearest(inputs=z, codes=codebook[groups, indices], indices=indices)


EstimatorFn = Callable[[Tensor, Tensor], Tensor]


def ste_estimator(z: Tensor, q: Tensor) -> Tensor:
    """Eq. 2, ``q + z - detach(z)``: the codebook also receives the task gradient."""
    return VQF.straight_through(q, z)


def rotation_estimator(z: Tensor, q: Tensor) -> Tensor:
    """Eq. 3, the rotation trick."""
    return VQF.rotation_trick(z, q)


def simvq_estimator(z: Tensor, q: Tensor) -> Tensor:
    """SimVQ's straight-through ``z + detach(q - z)``: the linear map learns from its loss only."""
    return VQF.straight_through(q.detach(), z)


ESTIMATORS: dict[str, EstimatorFn] = {
    "ste": ste_estimator,
    "rotation": rotation_estimator,
    "simvq": simvq_estimator,
}


def hard_losses(method: str, z: Tensor, q: Tensor, beta: float) -> dict[str, Tensor]:
    """Weighted commitment and codebook terms; ``z``, ``q``: (N, D) with the groups concatenated.

    ``ste`` / ``rotation``: eq. 10, squared norms summed over features, averaged over positions.
    ``simvq``: the same two terms averaged over elements (SimVQ's loss, :func:`simplexvq.functional.simvq_loss`).
    """
    scale = 1.0 / z.shape[-1] if method == "simvq" else 1.0
    return {
        "commitment": beta * scale * VQF.commitment_loss(z, q),
        "codebook": scale * VQF.codebook_loss(z, q),
    }
