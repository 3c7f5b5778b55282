"""The streamed softmax layer's contract: one request type that every backend takes, and the result it returns.

Every backend computes, for ``z`` (N, G, d), ``codebook`` (G, M, d) and ``temperature`` (G,), without ever holding
the (N, G, M) logits, the same values and gradients (ties of the top-K aside) as the dense computation
``log_pi = log_softmax(logits)``, ``quantized = einsum(pi, Q)``,
``knn_loss_scaled(log_pi, knn_k, knn_distance, scope=..., vertices=...)`` and the statistics of ``pi``, over the rows
with ``valid`` set (all rows without ``valid``). Rows with ``valid=False`` (padding) take no part in any loss,
statistic or neighbour search; their ``quantized`` rows are zero and their ``indices`` are -1.

A call is a :class:`StreamedRequest` (the inputs and every option, checked once when it is made) handed to a
backend's ``quantize(request)``; the result is a :class:`StreamedQuantization`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from simplexvq.scale.attention import LogitsKind
from simplexvq.scale.checks import (
    KnnDistance,
    KnnScope,
    check_choice,
    check_chunk_size,
    check_k,
    check_k_fits,
    check_request_tensors,
    check_vertex_shape,
    check_vertex_values,
)
from simplexvq.scale.distributed import World, global_row_count, world_of

__all__ = ["StreamedArguments", "StreamedQuantization", "StreamedRequest", "check_streamed_arguments", "expand_rows"]


@dataclass(frozen=True, kw_only=True)
class StreamedRequest:
    """One call of the streamed softmax layer: the inputs and the options, checked when the request is made.

    ``z`` (N, G, d), ``codebook`` (G, M, d), ``temperature`` (G,); ``distance`` the logits (``"cosine"`` or
    ``"euclid"``); ``knn_k`` the KNN regularizer's K (``None``: no regularizer) with ``knn_distance`` (``"ce"`` or
    ``"l2"``), ``scope`` (``"global"`` searches the batches of all ranks of ``group``, default the world; call on
    every rank, also with N = 0) and ``vertices`` (S,) or (G, S) a vertex subset (stored as (G, S) long on z's
    device); ``compute_output`` whether to return ``p Q``; ``chunk_size`` rows per chunk for the backends that
    chunk (``None``: about 4M elements per (chunk, G, M) buffer); ``valid`` (N,) bool, the rows that take part.

    The checks made here read nothing back from the device (shapes, names, types); the checks of values (vertex
    indices in range, K against the number of valid rows) are each backend's: on the host where it reads values
    back anyway, on the device where it is sync-free. A bad option raises ``ValueError`` naming it and the fix.
    """

    z: Tensor
    codebook: Tensor
    temperature: Tensor
    distance: LogitsKind = "cosine"
    knn_k: int | None = None
    knn_distance: KnnDistance = "ce"
    compute_output: bool = True
    chunk_size: int | None = None
    scope: KnnScope = "local"
    vertices: Tensor | None = None
    group: dist.ProcessGroup | None = None
    valid: Tensor | None = None

    def __post_init__(self) -> None:
        check_request_tensors(self.z, self.codebook, self.temperature, self.valid, "streamed_softmax_quantize")
        check_choice("streamed_softmax_quantize", "distance", self.distance, ("cosine", "euclid"))
        check_choice("streamed_softmax_quantize", "scope", self.scope, ("local", "global"))
        if not isinstance(self.compute_output, bool):
            raise ValueError(
                f"streamed_softmax_quantize: compute_output must be True or False, got {self.compute_output!r}"
            )
        object.__setattr__(self, "chunk_size", check_chunk_size(self.chunk_size, "streamed_softmax_quantize"))
        if self.knn_k is None:
            object.__setattr__(self, "vertices", None)
            return
        object.__setattr__(self, "knn_k", check_k(self.knn_k, "knn_loss"))
        check_choice("knn_loss", "distance", self.knn_distance, ("ce", "l2"))
        groups = self.codebook.shape[0]
        vertices = check_vertex_shape(self.vertices, groups, "knn_loss")
        if vertices is not None:
            vertices = vertices.to(device=self.z.device, dtype=torch.long)
        object.__setattr__(self, "vertices", vertices)

    @property
    def inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, codebook, temperature)``."""
        return self.z, self.codebook, self.temperature

    def options(self, *, chunk_size: bool = True) -> dict[str, Any]:
        """The options as keyword arguments (without ``chunk_size`` for functions that tile rows themselves)."""
        options = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)[3:]}
        if not chunk_size:
            del options["chunk_size"]
        return options

    def replace(self, **changes: Any) -> StreamedRequest:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)


@dataclass
class StreamedQuantization:
    """Result of a streamed softmax quantization of ``N`` rows.

    ``quantized`` (N, G, d) the smoothed output ``p Q`` (``None`` unless asked for); ``knn_loss`` eq. 13 (``None``
    without ``knn_k``); ``indices`` (N, G) the hard codes ``argmax p``; ``stats`` per group (G,):
    ``prob_perplexity``, ``individual_perplexity``, ``max_prob`` (as :func:`simplexvq.stats.probability_stats`;
    NaN without rows); ``knn_hint`` (G M,) the per-vertex ceiling to pass to the next call of the CPU backend as
    ``knn_hint`` (only for the CE regularizer over every vertex; ``None`` otherwise and for other backends; see
    :mod:`simplexvq.scale.backends.ceiling`).
    """

    quantized: Tensor | None
    knn_loss: Tensor | None
    indices: Tensor
    stats: dict[str, Tensor]
    knn_hint: Tensor | None = None


@dataclass(frozen=True)
class StreamedArguments:
    """What a host-side backend needs beyond the request: ``world`` (``None``: local search)."""

    world: World | None


def check_streamed_arguments(request: StreamedRequest) -> StreamedArguments:
    """The value checks of a host-side backend (vertex indices, K against the number of valid rows), raising
    ``ValueError`` naming the problem and the fix; joins the row count's ``all_reduce`` for a global search.
    Counting the valid rows reads a value back from the device (these checks serve the backends that compact
    rows; a sync-free backend checks on the device), except under ``torch.compile`` where K against the number of
    valid rows is a device-side assertion."""
    knn_k, valid, z = request.knn_k, request.valid, request.z
    if knn_k is None:
        return StreamedArguments(world=None)
    check_vertex_values(request.vertices, request.codebook.shape[1], "knn_loss")
    world = world_of(request.scope, request.group)
    if valid is not None and world is None and torch.compiler.is_compiling():  # traced: checked on the device
        torch._assert_async(
            valid.sum() >= knn_k,
            f"knn_loss: k={knn_k} neighbours per code vector requested, but the batch holds fewer (unpadded) "
            "positions; K must not exceed N: lower k or use a larger batch",
        )
        return StreamedArguments(world=world)
    num_rows = z.shape[0] if valid is None else int(valid.sum())
    if world is None:
        check_k_fits(knn_k, num_rows, "knn_loss")
    else:
        check_k_fits(knn_k, global_row_count(num_rows, world, z.device), "knn_loss", world.size)
    return StreamedArguments(world=world)


def expand_rows(result: StreamedQuantization, valid: Tensor) -> StreamedQuantization:
    """The result of a call on the rows ``valid`` selects, put back in place among all ``len(valid)`` rows: zero
    ``quantized`` rows and ``-1`` indices where ``valid`` is False (the losses and statistics are unchanged)."""
    num_rows = valid.shape[0]
    indices = result.indices.new_full((num_rows, result.indices.shape[1]), -1)
    indices[valid] = result.indices
    quantized = None
    if result.quantized is not None:
        quantized = result.quantized.new_zeros(num_rows, *result.quantized.shape[1:])
        quantized = quantized.index_put((valid.nonzero().squeeze(1),), result.quantized)
    return StreamedQuantization(
        quantized=quantized, knn_loss=result.knn_loss, indices=indices, stats=result.stats, knn_hint=result.knn_hint
    )
