"""The papers' equations as pure functions.

Every function names the equation it implements. Equation numbers refer to Morita (2025), "Pushing Toward the
Simplex Vertices" (``shared/papers/knn-simplex-vertices-morita2025.md``) unless another source is named.
Modules in :mod:`simplexvq` only compose these functions, so each can be tested against a naive reference.

Shapes: ``N`` positions (tokens, latent pixels), ``G`` codebook groups, ``M`` entries per codebook, ``d`` the
dimension of one group's code vectors.
"""

from __future__ import annotations

import numbers
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

KnnDistance = Literal["ce", "l2"]
"""The deviation of eq. 13: cross-entropy or squared L2."""

__all__ = [
    "codebook_loss",
    "commitment_loss",
    "cosine_logits",
    "euclidean_logits",
    "gumbel_softmax",
    "knn_loss",
    "onehot_straight_through",
    "perplexity",
    "perplexity_loss",
    "rotation_trick",
    "sample_gumbel",
    "simvq_loss",
    "straight_through",
    "vq_loss",
]


# --------------------------------------------------------------------------------------------------------------
# Gradient estimators for hard quantization (section 2.1)
# --------------------------------------------------------------------------------------------------------------


def straight_through(q: Tensor, z: Tensor) -> Tensor:
    """Straight-through estimator, eq. 2: ``STE(q, z) = q + z - detach(z)``.

    The value is ``q``; the gradient reaching ``z`` is the upstream gradient unchanged (the identity Jacobian of
    eq. 1). ``q`` is not detached, exactly as written in eq. 2, so a learnable ``q`` also receives the upstream
    gradient. Pass ``q.detach()`` for the VQ-VAE form ``z + detach(q - z)``.
    """
    if q.shape != z.shape:
        raise ValueError(f"straight_through: q has shape {tuple(q.shape)} but z has {tuple(z.shape)}; they must match")
    return q + (z - z.detach())  # parenthesised so the value is exactly q, whatever the magnitudes


def rotation_trick(z: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """Rotation-trick estimator (Fifty et al. 2025), eq. 3-4 and footnote 1.

    ``RE(q, z) = detach(|q| / |z| * R) z`` with ``R = I - 2 r r^T + 2 q_hat z_hat^T`` and
    ``r = normalize(q_hat + z_hat)``. The value equals ``q``; the Jacobian with respect to ``z`` is the scaled
    rotation ``|q| / |z| * R`` (eq. 4); ``q`` receives no gradient through this path.

    ``R z`` is applied without building the ``d x d`` matrix: ``R z = z - 2 r (r.z) + 2 q_hat (z_hat.z)``.
    ``z`` must be non-zero along the last dimension (a zero vector has no direction to rotate).
    """
    if q.shape != z.shape:
        raise ValueError(f"rotation_trick: z has shape {tuple(z.shape)} but q has {tuple(q.shape)}; they must match")
    with torch.no_grad():
        z_norm = z.norm(dim=-1, keepdim=True)
        q_norm = q.norm(dim=-1, keepdim=True)
        z_hat = z / z_norm.clamp_min(eps)
        q_hat = q / q_norm.clamp_min(eps)
        r = q_hat + z_hat
        r_hat = r / r.norm(dim=-1, keepdim=True).clamp_min(eps)
        scale = q_norm / z_norm.clamp_min(eps)
    rotated = (
        z - 2.0 * r_hat * (r_hat * z).sum(dim=-1, keepdim=True) + 2.0 * q_hat * (z_hat * z).sum(dim=-1, keepdim=True)
    )
    estimate = scale * rotated
    # Value exactly q (the rotation is only exact up to rounding, badly so for nearly antipodal z and q);
    # gradient that of the scaled rotation.
    return q.detach() + (estimate - estimate.detach())


# --------------------------------------------------------------------------------------------------------------
# Logits (appendix A.1) and smoothing (section 2.2)
# --------------------------------------------------------------------------------------------------------------


def cosine_logits(z: Tensor, codebook: Tensor, temperature: Tensor, eps: float = 1e-12) -> Tensor:
    """Appendix A.1: cosine similarity of L2-normalised inputs and code vectors, divided by a temperature.

    ``z``: (N, G, d); ``codebook``: (G, M, d); ``temperature``: (G,), shared by all entries of a group's codebook
    so that all logits have the same amplitude. Returns logits of shape (N, G, M).
    """
    z_hat = F.normalize(z, dim=-1, eps=eps)
    q_hat = F.normalize(codebook, dim=-1, eps=eps)
    return torch.einsum("ngd,gmd->ngm", z_hat, q_hat) / temperature[:, None]


def euclidean_logits(z: Tensor, codebook: Tensor, temperature: Tensor) -> Tensor:
    """Negative squared Euclidean distances divided by a temperature: ``-|z - q_m|^2 / tau``.

    Same shapes as :func:`cosine_logits`. Expanded as ``-(|z|^2 - 2 z.q + |q|^2)`` so no (N, G, M, d) tensor is
    built.
    """
    squared_distance = (
        z.pow(2).sum(-1, keepdim=True) - 2.0 * torch.einsum("ngd,gmd->ngm", z, codebook) + codebook.pow(2).sum(-1)[None]
    )
    return -squared_distance / temperature[:, None]


def sample_gumbel(like: Tensor) -> Tensor:
    """Standard Gumbel noise ``g = -log(-log u)``, ``u ~ Uniform(0, 1)`` (section 2.2, above eq. 6).

    Drawn as ``-log(E)`` with ``E ~ Exponential(1)`` (``E = -log u``), which never produces ``log 0``.
    """
    return -torch.empty_like(like).exponential_().log()


def gumbel_softmax(
    log_pi: Tensor,
    temperature: float | Tensor,
    *,
    hard: bool = False,
    gumbels: Tensor | None = None,
    dim: int = -1,
) -> Tensor:
    """Gumbel-softmax sample, eq. 7; with ``hard=True`` the onehot sample with straight-through, eq. 6 and 8.

    ``p_m = softmax((g_m + log pi_m) / tau)``. With ``hard``, the forward value is the onehot vector
    ``e_argmax(g + log pi)`` (eq. 6) and the gradient is that of ``p``: ``STE(e, p) = e + p - detach(p)`` (eq. 8).
    ``log_pi`` may be unnormalised logits: a constant shift per row cancels in the softmax and the argmax.
    ``gumbels`` supplies the noise (for tests); by default it is drawn with :func:`sample_gumbel`.
    """
    if gumbels is None:
        gumbels = sample_gumbel(log_pi)
    p = torch.softmax((log_pi + gumbels) / temperature, dim=dim)
    return onehot_straight_through(p, dim=dim) if hard else p


def onehot_straight_through(p: Tensor, dim: int = -1) -> Tensor:
    """Eq. 8: ``STE(e_argmax(p), p) = e + p - detach(p)``; the value is onehot, the gradient is that of ``p``."""
    onehot = torch.zeros_like(p).scatter_(dim, p.argmax(dim=dim, keepdim=True), 1.0)
    return onehot + (p - p.detach())  # parenthesised so the value is exactly onehot


# --------------------------------------------------------------------------------------------------------------
# Regularizers (sections 2.3 and 3)
# --------------------------------------------------------------------------------------------------------------


def _as_groups(x: Tensor, name: str, function: str) -> Tensor:
    """View (N, M) as (N, 1, M); accept (N, G, M); reject anything else with a message naming the shape."""
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() == 3:
        return x
    raise ValueError(
        f"{function}: {name} must have shape (N, M) or (N, G, M), got {tuple(x.shape)}; "
        "flatten batch and time/space dimensions into N first"
    )


def _select_rows(x: Tensor, mask: Tensor | None, function: str) -> Tensor:
    if mask is None:
        return x
    if mask.shape != x.shape[:1] or mask.dtype != torch.bool:
        raise ValueError(
            f"{function}: mask must be a bool tensor of shape ({x.shape[0]},) marking the positions to keep, "
            f"got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    return x[mask]


def knn_loss(
    log_probs: Tensor,
    k: int,
    distance: KnnDistance = "ce",
    *,
    mask: Tensor | None = None,
) -> Tensor:
    """KNN regularizer, eq. 13: ``(MK)^-1 sum_m sum_k D(e_m, p^(m,k))``, averaged over groups.

    ``p^(m,k)`` is the k-th nearest smoothed quantizer (row of ``exp(log_probs)``) to the simplex vertex ``e_m``
    under the deviation ``D``:

    * ``"ce"``: cross-entropy ``D(e_m, p) = -log p_m``; the K nearest are the K largest ``log p_{n,m}`` over n.
    * ``"l2"``: squared L2 distance ``D(e_m, p) = |e_m - p|^2 = 1 - 2 p_m + |p|^2``.

    ``log_probs``: (N, M) or (N, G, M) log-probabilities (each group's codebook is treated independently).
    ``mask``: optional bool (N,) marking the rows that take part (padding excluded).

    ``k`` larger than the number of rows is an error (we do not silently clamp, because a smaller K changes the
    loss the user asked for).

    This is the dense computation; :func:`simplexvq.scale.knn_loss.knn_loss_scaled` gives the same loss with
    neighbours searched across ranks, a streamed top-K and vertex subsets, and the KNN regularizer
    (:mod:`simplexvq.regularizers`) picks between the two.
    """
    log_probs = _as_groups(log_probs, "log_probs", "knn_loss")
    log_probs = _select_rows(log_probs, mask, "knn_loss")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"knn_loss: k must be a positive integer, got {k!r}")
    k = int(k)
    if distance not in ("ce", "l2"):
        raise ValueError(f"knn_loss: distance must be 'ce' or 'l2', got {distance!r}")
    num_rows = log_probs.shape[0]
    if k > num_rows:
        raise ValueError(
            f"knn_loss: k={k} neighbours per code vector requested, but the batch holds only N={num_rows} "
            "(unpadded) positions; K must not exceed N: lower k or use a larger batch"
        )
    if distance == "ce":
        deviation = -log_probs
    elif distance == "l2":
        probs = log_probs.exp()
        deviation = 1.0 - 2.0 * probs + probs.pow(2).sum(dim=-1, keepdim=True)
    else:
        raise ValueError(f"knn_loss: distance must be 'ce' or 'l2', got {distance!r}")
    nearest = deviation.topk(k, dim=0, largest=False, sorted=False).values  # (K, G, M)
    return nearest.mean()


def perplexity(probs: Tensor, dim: int = -1) -> Tensor:
    """Perplexity ``exp(-sum_m p_m log p_m)`` of distributions along ``dim`` (``0 log 0 = 0``)."""
    tiny = torch.finfo(probs.dtype).tiny
    entropy = -(probs * probs.clamp_min(tiny).log()).sum(dim=dim)
    return entropy.exp()


def perplexity_loss(probs: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Diversity loss of wav2vec 2.0, eq. 11-12 in the form ``(M - ppl) / M``, averaged over groups.

    ``ppl_g = exp(H(pi_bar_g))`` with ``pi_bar_g = N^-1 sum_i pi_{i,g}`` (eq. 12). Eq. 11 writes the normalised
    perplexity ``ppl / M``, to be maximised; the form minimised here is the one fairseq's wav2vec 2.0 code uses
    (``(GV - sum_g ppl_g) / GV``, equal to the group average of ``(M - ppl_g) / M``).

    ``probs``: (N, M) or (N, G, M) assignment probabilities; ``mask``: optional bool (N,) rows to keep.
    """
    probs = _as_groups(probs, "probs", "perplexity_loss")
    probs = _select_rows(probs, mask, "perplexity_loss")
    if probs.shape[0] == 0:
        raise ValueError("perplexity_loss: no positions to average over (empty batch or everything masked)")
    codebook_size = probs.shape[-1]
    mean_probs = probs.mean(dim=0)  # (G, M), eq. 12
    return ((codebook_size - perplexity(mean_probs)) / codebook_size).mean()


def commitment_loss(z: Tensor, q: Tensor) -> Tensor:
    """Commitment term of eq. 10: ``N^-1 sum_i |z_i - detach(q_i)|^2`` (squared norm over the last dim)."""
    return (z - q.detach()).pow(2).sum(dim=-1).mean()


def codebook_loss(z: Tensor, q: Tensor) -> Tensor:
    """Codebook term of eq. 10: ``N^-1 sum_i |detach(z_i) - q_i|^2`` (squared norm over the last dim)."""
    return (z.detach() - q).pow(2).sum(dim=-1).mean()


def vq_loss(z: Tensor, q: Tensor, beta: float = 1.0) -> Tensor:
    """Eq. 10: ``beta * commitment + codebook``; ``beta`` defaults to 1.0 as in appendix A.2."""
    return beta * commitment_loss(z, q) + codebook_loss(z, q)


def simvq_loss(z: Tensor, q: Tensor, beta: float = 0.25) -> Tensor:
    """SimVQ's loss (Zhu et al. 2024, official code with ``legacy=False``).

    ``beta * mean((detach(q) - z)^2) + mean((q - detach(z))^2)``: eq. 10's two terms, averaged over elements
    rather than summed over the feature dimension, with SimVQ's default ``beta = 0.25``.
    """
    return beta * (q.detach() - z).pow(2).mean() + (q - z.detach()).pow(2).mean()
