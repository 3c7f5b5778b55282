"""Softmax smoothing as attention: queries from the inputs, keys from the code vectors, values the code vectors.

The smoothed output ``Q p = softmax(logits(z, Q) / tau) Q`` is an attention with queries z, keys Q and values Q
(section 3, appendix A.1). :func:`soft_quantize` evaluates it with
``torch.nn.functional.scaled_dot_product_attention`` (the output only; nothing for the KNN regularizer or the
statistics); :func:`attention_queries` and :func:`attention_keys` give the streamed backends the same factors, and
:func:`attention_form` the factors with the Euclidean bias kept apart (for fused kernels that add it per key).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LogitsKind = Literal["cosine", "euclid"]

__all__ = ["LogitsKind", "attention_form", "attention_keys", "attention_queries", "soft_quantize"]


def soft_quantize(z: Tensor, codebook: Tensor, temperature: Tensor, distance: LogitsKind = "cosine") -> Tensor:
    """``softmax(logits / tau) Q`` per group as attention: ``z`` (N, G, d), ``codebook`` (G, M, d), ``temperature``
    (G,) -> (N, G, d), equal to the dense ``einsum(softmax(logits), Q)`` with the logits of appendix A.1
    (``"cosine"``) or ``-|z - q|^2 / tau`` (``"euclid"``); gradients reach z, Q and tau.
    """
    if distance not in ("cosine", "euclid"):
        raise ValueError(f"soft_quantize: distance must be 'cosine' or 'euclid', got {distance!r}")
    query = attention_queries(distance, z, temperature).transpose(0, 1)  # (G, N, d')
    key = attention_keys(distance, codebook)
    value = codebook if distance == "cosine" else F.pad(codebook, (0, 1))  # fused CPU kernels: equal widths
    # 4-D (batch, heads, length, width) inputs select the fused (flash / memory-efficient) kernels.
    out = F.scaled_dot_product_attention(query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), scale=1.0)
    return out.squeeze(0)[..., : codebook.shape[-1]].transpose(0, 1)


def attention_keys(kind: LogitsKind, codebook: Tensor) -> Tensor:
    """Attention keys (G, M, d'): unit code vectors (cosine) or ``[c, |c|^2]`` (Euclidean)."""
    if kind == "cosine":
        return F.normalize(codebook, dim=-1)
    return torch.cat([codebook, codebook.pow(2).sum(dim=-1, keepdim=True)], dim=-1)


def attention_queries(kind: LogitsKind, z: Tensor, temperature: Tensor) -> Tensor:
    """Attention queries (c, G, d') with the temperature folded in: ``z_hat / tau`` or ``[2 z, -1] / tau``.

    ``queries . keys`` are the logits up to a constant per row (``|z|^2 / tau`` for Euclidean logits), which
    changes neither the softmax nor anything computed from it (``-log p``, entropy, argmax).
    """
    if kind == "cosine":
        scaled = F.normalize(z, dim=-1)
    else:
        scaled = torch.cat([2.0 * z, -torch.ones_like(z[..., :1])], dim=-1)
    return scaled / temperature[:, None]


def attention_form(
    kind: LogitsKind, z: Tensor, codebook: Tensor, temperature: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Queries (N, G, D), keys (G, M, D) and bias (G, M) or ``None`` with ``q . k + b`` the logits up to a per-row
    constant: :func:`attention_queries` and :func:`attention_keys` with the Euclidean bias ``-|c|^2 / tau`` (their
    last column's product) kept apart instead of carried as an extra width."""
    keys = attention_keys(kind, codebook)
    if kind == "cosine":
        return attention_queries(kind, z, temperature), keys, None
    tau = temperature[:, None]
    return 2.0 * z / tau, codebook, -keys[..., -1] / tau
