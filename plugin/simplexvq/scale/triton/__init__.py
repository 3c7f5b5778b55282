"""The GPU backend of the streamed softmax quantizer: fused, sync-free Triton kernels.

Three layers, as in flash attention: raw kernels (:mod:`.kernels`), one PyTorch operator per launch
(:mod:`.launch`, registered with :func:`torch.library.triton_op`), a thin autograd function (:mod:`.function`)
and the documented public function below. Three launches per training step (two forward, one backward) whatever
N is, no N x M buffer, no host read: padding is a mask used as weights, checks run on the device
(:func:`torch._assert_async`), and a global search adds exactly one ``all_reduce`` and one ``all_gather``.

On CPU tensors the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is
imported): slow, for tests. Triton itself is imported only when the kernels are first used, so
:func:`triton_available` answers also where it is not installed.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from simplexvq import knn
from simplexvq.efficient import LogitsKind, StreamedQuantization
from simplexvq.functional import perplexity

__all__ = ["triton_available", "triton_streamed_softmax_quantize"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _attention_form(kind: LogitsKind, z: Tensor, codebook: Tensor, temperature: Tensor) -> tuple[Tensor, ...]:
    """Queries (N, G, D), keys (G, M, D) and bias (G, M) or ``None`` with ``q . k + b`` = the logits up to a
    per-row constant (``|z|^2 / tau`` for Euclidean logits, which changes neither p nor ``lse - l`` nor argmax)."""
    tau = temperature[:, None]
    if kind == "cosine":
        return F.normalize(z, dim=-1) / tau, F.normalize(codebook, dim=-1), None
    return 2.0 * z / tau, codebook, -codebook.pow(2).sum(dim=-1) / tau


def _check_vertices(vertices: Tensor | None, groups: int, size: int, device: torch.device) -> Tensor | None:
    """A vertex subset, (S,) or (G, S), as (G, S) long on ``device``. Shapes are checked at once (``ValueError``),
    values on the device without a host read (``RuntimeError`` on the CPU, a device assertion on a GPU)."""
    if vertices is None:
        return None
    if not isinstance(vertices, Tensor) or vertices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"knn_loss: vertices must be an integer tensor of code indices, got {vertices!r}")
    if vertices.dim() == 1:
        vertices = vertices.unsqueeze(0).expand(groups, -1)
    if vertices.dim() != 2 or vertices.shape[0] != groups or vertices.shape[1] == 0:
        raise ValueError(
            f"knn_loss: vertices must have shape (S,) or (G={groups}, S) with S >= 1, got {tuple(vertices.shape)}"
        )
    vertices = vertices.to(device=device, dtype=torch.long)
    torch._assert_async(((vertices >= 0) & (vertices < size)).all(), f"knn_loss: vertices must lie in [0, M={size})")
    ordered = vertices.sort(dim=-1).values
    torch._assert_async(
        (ordered[:, 1:] != ordered[:, :-1]).all(),
        "knn_loss: vertices must not repeat within a group (a repeated vertex counts twice)",
    )
    return vertices


def _check_inputs(z: Tensor, codebook: Tensor, temperature: Tensor, valid: Tensor | None, distance: str) -> None:
    function = "triton_streamed_softmax_quantize"
    if z.dim() != 3 or codebook.dim() != 3 or z.shape[1:] != (codebook.shape[0], codebook.shape[2]):
        raise ValueError(
            f"{function}: z must be (N, G, d) and codebook (G, M, d), got {tuple(z.shape)} and {tuple(codebook.shape)}"
        )
    if distance not in ("cosine", "euclid"):
        raise ValueError(f"{function}: distance must be 'cosine' or 'euclid', got {distance!r}")
    if z.dtype not in _DTYPES or codebook.dtype != z.dtype or temperature.dtype != z.dtype:
        raise ValueError(
            f"{function}: z, codebook and temperature must share one dtype among float16, bfloat16, float32 and "
            f"float64, got {z.dtype}, {codebook.dtype} and {temperature.dtype}: cast them to one dtype first"
        )
    if codebook.device != z.device or temperature.device != z.device:
        raise ValueError(
            f"{function}: z, codebook and temperature must be on one device, got {z.device}, {codebook.device} and "
            f"{temperature.device}: move them to one device first"
        )
    if z.dtype == torch.bfloat16 and z.device.type == "cpu":
        raise ValueError(
            f"{function}: bfloat16 CPU tensors cannot run: Triton's interpreter misreads bfloat16 memory; use float16, "
            "float32 or float64 on the CPU (bfloat16 runs on CUDA tensors)"
        )
    if temperature.shape != (codebook.shape[0],):
        raise ValueError(
            f"{function}: temperature must have shape (G,) = ({codebook.shape[0]},), got {tuple(temperature.shape)}"
        )
    if valid is not None and (valid.dtype != torch.bool or valid.shape != z.shape[:1] or valid.device != z.device):
        raise ValueError(
            f"{function}: valid must be a bool tensor of shape (N,) = ({z.shape[0]},) on {z.device} marking the rows "
            f"that take part, got {valid.dtype} of shape {tuple(valid.shape)} on {valid.device}"
        )


def triton_streamed_softmax_quantize(
    z: Tensor,
    codebook: Tensor,
    temperature: Tensor,
    *,
    distance: LogitsKind = "cosine",
    knn_k: int | None = None,
    knn_distance: knn.KnnDistance = "ce",
    compute_output: bool = True,
    scope: knn.KnnScope = "local",
    vertices: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    valid: Tensor | None = None,
) -> StreamedQuantization:
    """Softmax smoothing of ``z`` (N, G, d) with ``codebook`` (G, M, d) by the fused Triton kernels.

    Same values and gradients (to z, codebook and temperature) as
    :func:`simplexvq.efficient.streamed_softmax_quantize` and the dense path, ties aside; ``knn_hint`` of the
    result is ``None``. ``valid`` (N,) bool marks the rows that take part: the others (padding) enter no loss,
    statistic or neighbour search, get zero ``quantized`` rows and index -1, and are never compacted away, so the
    call keeps fixed shapes and never waits for the host. Statistics average over the valid rows (NaN without
    any). K larger than the number of valid rows (over all ranks for ``scope="global"``) fails on the device
    (``RuntimeError`` on the CPU; a device-side assertion on a GPU); without ``valid`` a local K > N is a
    ``ValueError`` at once. Inputs in float16 / bfloat16 accumulate in float32; float32 products are IEEE or TF32
    as :func:`torch.get_float32_matmul_precision` says ("highest": IEEE); float64 is exact.
    ``scope="global"`` joins two collectives: call it on every rank, also with N = 0.
    """
    _check_inputs(z, codebook, temperature, valid, distance)
    from simplexvq.scale.triton.function import FusedSpec, fused_softmax
    from simplexvq.scale.triton.launch import accumulation_dtype
    from simplexvq.scale.triton.selection import assert_k_fits, valid_row_count

    num_rows = z.shape[0]
    groups, size = codebook.shape[:2]
    world = None
    if knn_k is not None:
        knn_k = knn.check_k(knn_k, "knn_loss")
        if knn_distance not in ("ce", "l2"):
            raise ValueError(f"knn_loss: distance must be 'ce' or 'l2', got {knn_distance!r}")
        vertices = _check_vertices(vertices, groups, size, z.device)
        world = knn.world_of(scope, group)
    else:
        vertices = None
    count = valid_row_count(valid, num_rows, z.device)
    if knn_k is not None:
        if world is None and valid is None:
            knn.check_k_fits(knn_k, num_rows, "knn_loss")
        else:
            assert_k_fits(knn_k, count, world)
    if valid is not None:  # padding may hold anything (NaN included): neither values nor gradients may see it
        z = torch.where(valid[:, None, None], z, torch.zeros_like(z))
    mask = torch.ones(num_rows, dtype=torch.int8, device=z.device) if valid is None else valid.to(torch.int8)
    spec = FusedSpec(k=knn_k, knn_distance=knn_distance, compute_output=compute_output, world=world)
    quantized, loss, indices, prob_sum, perplexity_sum, max_prob_sum = fused_softmax(
        distance, z, codebook, temperature, mask, vertices, spec
    )
    rows = count.to(accumulation_dtype(z.dtype))
    stats = {
        "prob_perplexity": perplexity(prob_sum / rows),
        "individual_perplexity": perplexity_sum / rows,
        "max_prob": max_prob_sum / rows,
    }
    return StreamedQuantization(
        quantized=quantized if compute_output else None,
        knn_loss=loss if knn_k is not None else None,
        indices=indices,
        stats={name: value.to(z.dtype) for name, value in stats.items()},
        knn_hint=None,
    )
