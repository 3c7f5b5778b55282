"""A stand-in for ``simplexvq.scale.triton`` with the contract's signature and shapes, for tests without the kernels.

It computes the dense path with fixed shapes only (no ``nonzero``, no boolean-mask indexing, nothing read back):
so a dispatch mode counting the ops of the quantizer's sync-free path sees the quantizer's own ops and a kernel
that syncs as little as the fused one must. ``calls`` counts its calls; ``fail_with`` makes it raise (a kernel that
does not compile); ``available`` is what ``triton_available`` reports.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from simplexvq import functional as VQF
from simplexvq.scale.deviation import deviation
from simplexvq.scale.distributed import select_global, with_scaled_gradient, world_of
from simplexvq.scale.streamed import StreamedQuantization


def real_triton_kernels():
    """The real kernel module if it is importable and can run on CPU tensors here (interpreted), else ``None``: the
    tests that run a case with the fake run it with the real kernels too where they can."""
    import importlib
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        module = importlib.import_module("simplexvq.scale.triton")
    except ImportError:
        return None
    return module if module.triton_available()[0] else None


calls = 0
fail_with: Exception | None = None
fail_backward_with: Exception | None = None  # raised by the backward pass (a backward kernel that does not compile)
available: tuple[bool, str] = (True, "")


def triton_available() -> tuple[bool, str]:
    return available


def triton_streamed_softmax_quantize(
    z: Tensor,
    codebook: Tensor,
    temperature: Tensor,
    *,
    distance: str = "cosine",
    knn_k: int | None = None,
    knn_distance: str = "ce",
    compute_output: bool = True,
    scope: str = "local",
    vertices: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    valid: Tensor | None = None,
) -> StreamedQuantization:
    global calls
    calls += 1
    if fail_with is not None:
        raise fail_with
    num_rows, groups, _ = z.shape
    if valid is None:
        valid = torch.ones(num_rows, dtype=torch.bool, device=z.device)
    z = torch.where(valid[:, None, None], z, z.new_zeros(()))
    logits = (VQF.cosine_logits if distance == "cosine" else VQF.euclidean_logits)(z, codebook, temperature)
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    weight = valid.to(z.dtype)
    count = weight.sum()
    with torch.no_grad():
        stats = {
            "prob_perplexity": VQF.perplexity(torch.einsum("n,ngm->gm", weight, p) / count),
            "individual_perplexity": torch.einsum("n,ng->g", weight, (-(p * log_p).sum(-1)).exp()) / count,
            "max_prob": torch.einsum("n,ng->g", weight, p.amax(-1)) / count,
        }
    indices = torch.where(valid[:, None], logits.argmax(dim=-1), -1)
    quantized = None
    if compute_output:
        quantized = torch.where(valid[:, None, None], torch.einsum("ngm,gmd->ngd", p, codebook), z.new_zeros(()))
    loss = None
    if knn_k is not None:
        if vertices is not None and vertices.dim() == 1:
            vertices = vertices.unsqueeze(0).expand(groups, -1)
        deviations = deviation(log_p, knn_distance, vertices).reshape(num_rows, -1)
        deviations = torch.where(valid[:, None], deviations, deviations.new_full((), float("nan")))
        columns = deviations.shape[1]
        local_k = min(knn_k, num_rows)
        top = deviations.topk(local_k, dim=0, largest=False, sorted=False).values
        world = world_of(scope, group)
        if world is None:
            loss = top.sum() / (knn_k * columns)
        else:
            padded = torch.cat([top.detach(), top.new_full((knn_k - local_k, columns), float("nan"))])
            selected, total = select_global(padded, knn_k, world)
            local_part = torch.where(selected[:local_k], top, torch.zeros_like(top)).sum()
            loss = with_scaled_gradient(total / (knn_k * columns), local_part / (knn_k * columns), world.size)
    if fail_backward_with is not None:
        quantized = None if quantized is None else _FailingBackward.apply(quantized)
        loss = None if loss is None else _FailingBackward.apply(loss)
    return StreamedQuantization(quantized=quantized, knn_loss=loss, indices=indices, stats=stats)


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward raises ``fail_backward_with``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        raise fail_backward_with
