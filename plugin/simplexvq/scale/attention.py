"""Softmax smoothing as attention: queries from the inputs, keys from the code vectors, values the code vectors.

The smoothed output ``Q p = softmax(logits(z, Q) / tau) Q`` is an attention with queries z, keys Q and values Q
(section 3, appendix A.1). :func:`soft_quantize` evaluates it with
``torch.nn.functional.scaled_dot_product_attention`` (the output only; nothing for the KNN regularizer or the
statistics). The factors of the logits are written once, :func:`query_part` and :func:`key_part` (without the
temperature); the streamed backends take them as :func:`attention_queries` / :func:`attention_keys` (the bias as
an extra width, the temperature folded into the queries) or :func:`temperature_free_form` (bias and temperature
apart, for fused kernels that scale per group).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LogitsKind = Literal["cosine", "euclid"]

__all__ = [
    "LogitsKind",
    "attention_keys",
    "attention_queries",
    "key_part",
    "query_part",
    "soft_quantize",
    "temperature_free_form",
]


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


def query_part(kind: LogitsKind, z: Tensor) -> Tensor:
    """The rows' factor of the logits without the temperature: ``z_hat`` (cosine) or ``2 z`` (Euclidean)."""
    return F.normalize(z, dim=-1) if kind == "cosine" else 2.0 * z


def key_part(kind: LogitsKind, codebook: Tensor) -> tuple[Tensor, Tensor | None]:
    """The code vectors' factor of the logits without the temperature, and their bias: ``(c_hat, None)`` (cosine)
    or ``(c, -|c|^2)`` (Euclidean), so that ``query_part . key + bias`` times ``1 / tau`` is the logits up to a
    per-row constant (``-|z|^2 / tau`` for Euclidean logits, which changes neither the softmax nor anything
    computed from it: ``-log p``, entropy, argmax)."""
    if kind == "cosine":
        return F.normalize(codebook, dim=-1), None
    return codebook, -codebook.pow(2).sum(dim=-1)


def temperature_free_form(
    kind: LogitsKind, z: Tensor, codebook: Tensor, temperature: Tensor
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """Queries ``q0`` (N, G, D), keys (G, M, D), bias ``b0`` (G, M) or ``None`` and scale ``s = 1 / tau`` (G,)
    with ``s (q0 . k + b0)`` the logits up to a per-row constant: the attention form with the temperature apart."""
    keys, bias = key_part(kind, codebook)
    return query_part(kind, z), keys, bias, temperature.reciprocal()


def attention_keys(kind: LogitsKind, codebook: Tensor) -> Tensor:
    """Attention keys (G, M, d'): unit code vectors (cosine) or ``[c, |c|^2]`` (Euclidean): :func:`key_part` with
    the bias carried as an extra width."""
    keys, bias = key_part(kind, codebook)
    return keys if bias is None else torch.cat([keys, -bias.unsqueeze(-1)], dim=-1)


def attention_queries(kind: LogitsKind, z: Tensor, temperature: Tensor) -> Tensor:
    """Attention queries (c, G, d') with the temperature folded in: ``z_hat / tau`` or ``[2 z, -1] / tau``
    (:func:`query_part`, with the width that meets the bias of :func:`attention_keys`)."""
    queries = query_part(kind, z)
    if kind != "cosine":
        queries = torch.cat([queries, -torch.ones_like(z[..., :1])], dim=-1)
    return queries / temperature[:, None]
