"""The documented public function of the fused kernels, and whether they can run here.

Three layers below it, as in flash attention: raw kernels (:mod:`.kernels`), one PyTorch operator per launch
(:mod:`.launch`, registered with :func:`torch.library.triton_op`) and a thin autograd function (:mod:`.function`).
Three launches per training step (two forward, one backward) whatever N is, no N x M buffer, no host read: padding
is a mask used as weights, checks of values run on the device (:func:`torch._assert_async`), and a global search
adds exactly one ``all_reduce`` and one ``all_gather``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from simplexvq.functional import perplexity
from simplexvq.scale.checks import check_k_fits, check_kernel_inputs, check_vertex_values_on_device
from simplexvq.scale.distributed import world_of
from simplexvq.scale.streamed import StreamedQuantization, StreamedRequest

__all__ = ["quantize_request", "triton_available", "triton_streamed_softmax_quantize"]

FUNCTION = "triton_streamed_softmax_quantize"


def triton_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the kernels can run for tensors on ``device`` (default: CUDA if present, else the CPU), and if
    not, a message naming why."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return False, f"triton is not importable ({error}): install triton (it comes with CUDA builds of torch)"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not interpret else "cpu"
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device is available to run the Triton kernels"
        if interpret:
            return False, "TRITON_INTERPRET=1 is set: the kernels are interpreted and run on CPU tensors only"
        return True, ""
    if kind == "cpu":
        if interpret:
            return True, ""
        return False, (
            "Triton kernels run on CPU tensors only in Triton's interpreter: set TRITON_INTERPRET=1 before triton "
            "is imported (slow, for tests), or use CUDA tensors"
        )
    return False, f"the Triton kernels support CUDA (or CPU tensors in the interpreter), not {kind!r} tensors"


def triton_streamed_softmax_quantize(
    z: Tensor, codebook: Tensor, temperature: Tensor, **options: Any
) -> StreamedQuantization:
    """Softmax smoothing of ``z`` (N, G, d) with ``codebook`` (G, M, d) by the fused Triton kernels; ``options``
    are the fields of :class:`~simplexvq.scale.streamed.StreamedRequest` (``chunk_size`` is accepted and unused:
    the kernels tile rows themselves).

    Same values and gradients (to z, codebook and temperature) as the reference backend and the dense path, ties
    aside; ``knn_hint`` of the result is ``None``. ``valid`` (N,) bool marks the rows that take part: the others
    (padding) enter no loss, statistic or neighbour search, get zero ``quantized`` rows and index -1, and are never
    compacted away, so the call keeps fixed shapes and never waits for the host. Statistics average over the valid
    rows (NaN without any). K larger than the number of valid rows (over all ranks for ``scope="global"``) fails on
    the device (``RuntimeError`` on the CPU; a device-side assertion on a GPU); without ``valid`` a local K > N is a
    ``ValueError`` at once. Inputs in float16 / bfloat16 accumulate in float32; float32 products are IEEE or TF32
    as :func:`torch.get_float32_matmul_precision` says ("highest": IEEE); float64 is exact.
    ``scope="global"`` joins two collectives: call it on every rank, also with N = 0.
    """
    return quantize_request(StreamedRequest(z=z, codebook=codebook, temperature=temperature, **options))


def quantize_request(request: StreamedRequest) -> StreamedQuantization:
    """:func:`triton_streamed_softmax_quantize` of a request made (and checked) already."""
    from simplexvq.scale.triton.function import FusedSpec, fused_softmax
    from simplexvq.scale.triton.launch import accumulation_dtype
    from simplexvq.scale.triton.selection import assert_k_fits, valid_row_count

    z, codebook, temperature = request.inputs
    check_kernel_inputs(z, codebook, temperature, FUNCTION)
    knn_k, valid, vertices = request.knn_k, request.valid, request.vertices
    num_rows = z.shape[0]
    world = None
    if knn_k is not None:
        check_vertex_values_on_device(vertices, codebook.shape[1], "knn_loss")
        world = world_of(request.scope, request.group)
    count = valid_row_count(valid, num_rows, z.device)
    if knn_k is not None:
        if world is None and valid is None:
            check_k_fits(knn_k, num_rows, "knn_loss")
        else:
            assert_k_fits(knn_k, count, world)
    if valid is not None:  # padding may hold anything (NaN included): neither values nor gradients may see it
        z = torch.where(valid[:, None, None], z, torch.zeros_like(z))
    mask = torch.ones(num_rows, dtype=torch.int8, device=z.device) if valid is None else valid.to(torch.int8)
    spec = FusedSpec(k=knn_k, knn_distance=request.knn_distance, compute_output=request.compute_output, world=world)
    quantized, loss, indices, prob_sum, perplexity_sum, max_prob_sum = fused_softmax(
        request.distance, z, codebook, temperature, mask, vertices, spec
    )
    rows = count.to(accumulation_dtype(z.dtype))
    stats = {
        "prob_perplexity": perplexity(prob_sum / rows),
        "individual_perplexity": perplexity_sum / rows,
        "max_prob": max_prob_sum / rows,
    }
    return StreamedQuantization(
        quantized=quantized if request.compute_output else None,
        knn_loss=loss if knn_k is not None else None,
        indices=indices,
        stats={name: value.to(z.dtype) for name, value in stats.items()},
        knn_hint=None,
    )
