"""The three kernels of :mod:`simplexvq.scale.triton.kernels` as PyTorch operators, one launch each.

Each operator is registered with :func:`torch.library.triton_op`, so ``torch.compile`` traces into it and a
dispatch mode sees one ``simplexvq::*`` op per launch. Under ``TRITON_INTERPRET=1`` the kernels are interpreted
functions, which :func:`torch.library.wrap_triton` does not accept: they are called directly (same result).

Layout: queries (N, G, D), keys (G, M, D), bias (G, M) or ``None``, values (G, M, DV), ``valid`` (N,) int8; the
per-row quantities (``lse``, statistics, backward coefficients) are (G, N) in the accumulation dtype (float64 for
float64 inputs, float32 otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton
from triton.runtime.jit import JITFunction

from simplexvq.scale.triton import kernels
from simplexvq.scale.triton.interpreter_compat import patch_interpreter

__all__ = [
    "Blocks",
    "accumulation_dtype",
    "block_sizes",
    "dot_precision",
    "knn_slots",
    "reduction_slices",
    "softmax_backward",
    "softmax_columns",
    "softmax_rows",
]

KNN_MODES = {None: 0, "ce": 1, "l2": 2}


@dataclass(frozen=True)
class Blocks:
    """Tile sizes: rows and keys per tile, padded widths of keys and values (powers of two, >= 16), and the
    launch options (warps per program, software-pipelining stages of the tile loops)."""

    rows: int
    columns: int
    dim: int
    value_dim: int
    num_warps: int = 4
    num_stages: int = 3


def _padded(width: int) -> int:
    return max(16, triton.next_power_of_2(max(width, 1)))


def knn_slots(k: int) -> int:
    """``BLOCK_K`` of the column pass: K rounded up to a power of two (at least 2)."""
    return max(2, triton.next_power_of_2(max(k, 1)))


def block_sizes(
    device: torch.device,
    dim: int,
    value_dim: int,
    dtype: torch.dtype = torch.float32,
    *,
    backward: bool = False,
) -> Blocks:
    """Tiles for a device, input dtype and kernel (the forward passes, or the backward pass, which holds more per
    row: ``q``, ``dO`` and ``dq``): small ones for the interpreter (CPU tensors); on a GPU a table keyed by dtype
    and padded width, the largest tiles that compile for sm_90 without register spills
    (``benchmarks/gpu/compile_check.py`` reports registers, spills and occupancy of each). float32 products need
    smaller tiles than float16 / bfloat16 tensor-core products, and float64's elementwise products hold a
    (rows, D, keys) block (a test path: it spills). The column pass's top-K state (keys x K slots) fits the same
    tiles up to K = 128 without spills."""
    padded, padded_values = _padded(dim), _padded(value_dim)
    if device.type != "cuda":
        return Blocks(16, 16, padded, padded_values)
    widest = max(padded, padded_values)
    table = _BACKWARD_TILES if backward else _FORWARD_TILES
    kind = "float64" if dtype == torch.float64 else "float32" if dtype == torch.float32 else "half"
    rows, columns, warps, stages = next(tiles for limit, tiles in table[kind] if widest <= limit)
    return Blocks(rows, columns, padded, padded_values, num_warps=warps, num_stages=stages)


# (widest padded width up to, (rows, keys, warps, stages)) per input kind, the first that fits is taken
_FORWARD_TILES = {
    "float64": [(1 << 30, (16, 16, 8, 1))],
    "float32": [(64, (32, 32, 4, 3)), (1 << 30, (16, 16, 4, 2))],
    "half": [(64, (64, 64, 8, 3)), (128, (32, 32, 8, 2)), (1 << 30, (32, 16, 8, 2))],
}
_BACKWARD_TILES = {
    "float64": [(1 << 30, (16, 16, 8, 1))],
    "float32": [(64, (32, 16, 4, 2)), (1 << 30, (16, 16, 8, 2))],
    "half": [(64, (64, 32, 8, 2)), (128, (32, 16, 8, 2)), (1 << 30, (16, 16, 8, 2))],
}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


DOT_PRECISIONS = ("ieee", "tf32")


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot`` for inputs of ``dtype``, by PyTorch's switch for float32
    matrix products, read on the host in the forward (the backward reuses it):
    ``torch.set_float32_matmul_precision("highest")`` (the default) gives exact IEEE float32 products,
    ``"high"`` and ``"medium"`` TF32 tensor-core products (``"medium"`` would allow bfloat16 products, which
    Triton's ``tl.dot`` does not offer for float32 operands: TF32 is the nearest). The switch is read as
    ``torch.backends.cuda.matmul.allow_tf32``, which that call sets (and which users may set directly); unlike
    :func:`torch.get_float32_matmul_precision` it is traceable by ``torch.compile``, which recompiles when it
    changes. Float16 / bfloat16 operands multiply on tensor cores whatever the switch, and float64 takes
    elementwise products: both report ``"ieee"``, which leaves their code unchanged. The value is a
    ``tl.constexpr`` of every kernel, so each precision is its own compiled variant."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launcher(kernel):
    if isinstance(kernel, JITFunction):
        return wrap_triton(kernel)
    patch_interpreter()
    return kernel


@triton_op("simplexvq::triton_softmax_rows", mutates_args={})
def softmax_rows(
    queries: Tensor,
    keys: Tensor,
    bias: Tensor | None,
    values: Tensor,
    valid: Tensor,
    compute_output: bool,
    dot_precision: str = "ieee",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row pass: ``(output (N or 0, G, DV), lse, indices (N, G) long, exp(entropy), max p, |p|^2)``."""
    num_rows, groups, dim = queries.shape
    size, value_dim = keys.shape[1], values.shape[2]
    accumulate = accumulation_dtype(queries.dtype)
    output = values.new_empty(num_rows if compute_output else 0, groups, value_dim)
    per_row = [queries.new_empty(groups, num_rows, dtype=accumulate) for _ in range(4)]
    indices = queries.new_empty(num_rows, groups, dtype=torch.long)
    if num_rows > 0:
        blocks = block_sizes(queries.device, dim, value_dim, queries.dtype)
        grid = (triton.cdiv(num_rows, blocks.rows), groups)
        _launcher(kernels.softmax_rows_kernel)[grid](
            queries,
            keys,
            queries if bias is None else bias,
            values,
            valid,
            output,
            per_row[0],
            indices,
            per_row[1],
            per_row[2],
            per_row[3],
            num_rows,
            groups,
            size,
            dim,
            value_dim,
            HAS_BIAS=bias is not None,
            ELEMENTWISE=queries.dtype == torch.float64,
            DOT_PRECISION=dot_precision,
            HAS_OUT=compute_output,
            BLOCK_N=blocks.rows,
            BLOCK_M=blocks.columns,
            BLOCK_D=blocks.dim,
            BLOCK_DV=blocks.value_dim,
            num_warps=blocks.num_warps,
            num_stages=blocks.num_stages,
        )
    lse, perplexity, max_prob, squared_norm = per_row
    return output, lse, indices, perplexity, max_prob, squared_norm


def row_splits(device: torch.device, num_rows: int, programs: int, block_rows: int) -> tuple[int, int]:
    """(splits, rows per split) for a column pass of ``programs`` (key blocks x groups) programs.

    A small codebook has few key blocks, so the rows are split until about two programs per multiprocessor run
    (on the CPU: two splits, so that the tests exercise the reduction). Depends on shapes only.
    """
    tiles = max(1, triton.cdiv(num_rows, block_rows))
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2 * programs
    splits = max(1, min(tiles, triton.cdiv(target, programs)))
    rows_per_split = triton.cdiv(tiles, splits) * block_rows
    return max(1, triton.cdiv(num_rows, rows_per_split)), rows_per_split


@triton_op("simplexvq::triton_softmax_columns", mutates_args={})
def softmax_columns(
    queries: Tensor,
    keys: Tensor,
    bias: Tensor | None,
    valid: Tensor,
    lse: Tensor,
    squared_norm: Tensor,
    k: int,
    knn_distance: str,
    dot_precision: str = "ieee",
) -> tuple[Tensor, Tensor, Tensor]:
    """Column pass: ``(prob_sum (G, M), top values (k, G M), top rows (k, G M) long)``; ``k = 0``: sums only.

    Column ``g M + m`` of the top-K holds key m of group g: its k smallest deviations (``+inf`` / row ``-1`` where
    fewer than k valid rows exist), unsorted. The splits' partial sums and top-Ks are reduced here (a sum and one
    top-K over ``splits * k`` candidates per column).
    """
    num_rows, groups, dim = queries.shape
    size = keys.shape[1]
    blocks = block_sizes(queries.device, dim, 1, queries.dtype)
    programs = triton.cdiv(size, blocks.columns)
    splits, rows_per_split = row_splits(queries.device, num_rows, programs * groups, blocks.rows)
    prob_sums = lse.new_empty(splits, groups, size)
    top_values = lse.new_empty(splits, k, groups * size)
    top_rows = queries.new_empty(splits, k, groups * size, dtype=torch.long)
    _launcher(kernels.softmax_columns_kernel)[(programs, groups, splits)](
        queries,
        keys,
        lse if bias is None else bias,
        valid,
        lse,
        squared_norm,
        prob_sums,
        top_values if k > 0 else prob_sums,
        top_rows if k > 0 else indices_placeholder(queries),
        num_rows,
        groups,
        size,
        dim,
        k,
        rows_per_split,
        HAS_BIAS=bias is not None,
        ELEMENTWISE=queries.dtype == torch.float64,
        DOT_PRECISION=dot_precision,
        KNN=KNN_MODES[knn_distance if k > 0 else None],
        BLOCK_N=blocks.rows,
        BLOCK_M=blocks.columns,
        BLOCK_D=blocks.dim,
        BLOCK_K=knn_slots(k),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    candidates = top_values.reshape(splits * k, groups * size)
    best = candidates.topk(k, dim=0, largest=False, sorted=False)
    rows = top_rows.reshape(splits * k, groups * size).gather(0, best.indices)
    return prob_sums.sum(dim=0), best.values, rows


def indices_placeholder(like: Tensor) -> Tensor:
    """A one-element long tensor for an unused pointer argument (never read or written)."""
    return like.new_empty(1, dtype=torch.long)


def reduction_slices(device: torch.device, row_programs: int) -> int:
    """How many copies of the key gradients the backward's programs add into (program ``i`` into copy
    ``i % slices``): more copies, fewer programs contending for one address. On the CPU two, so that the tests
    exercise the reduction; on a GPU up to 4 (each copy is G M (D + DV + 1) accumulators). Depends on shapes only."""
    if device.type != "cuda":
        return max(1, min(2, row_programs))
    return max(1, min(4, row_programs))


@triton_op("simplexvq::triton_softmax_backward", mutates_args={})
def softmax_backward(
    queries: Tensor,
    keys: Tensor,
    bias: Tensor | None,
    values: Tensor,
    grad_output: Tensor | None,
    valid: Tensor,
    lse: Tensor,
    row: Tensor,
    quad: Tensor | None,
    dot_precision: str = "ieee",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward pass for the logits' gradient ``ds = p * (dO . v - row + quad * p)``: gradients of the queries
    (N, G, D; queries' dtype), per row (G, N) ``sum_m ds[n, m] (l[n, m] - lse[n])`` (the dense part of the
    gradient of a common scale of the logits, times that scale, summed as one term per entry so that nothing
    cancels; see :mod:`simplexvq.scale.triton.function`), and of the keys (G, M, D), the bias (G, M; zeros without
    a bias) and the values (G, M, DV; zeros without ``grad_output``) in the accumulation dtype."""
    num_rows, groups, dim = queries.shape
    size, value_dim = keys.shape[1], values.shape[2]
    blocks = block_sizes(queries.device, dim, value_dim, queries.dtype, backward=True)
    row_programs = triton.cdiv(num_rows, blocks.rows)
    slices = reduction_slices(queries.device, row_programs)
    grad_queries = torch.empty_like(queries)
    grad_scale = lse.new_empty(groups, num_rows)
    grad_keys = lse.new_zeros(slices, groups, size, dim)
    grad_bias = lse.new_zeros(slices, groups, size)
    grad_values = lse.new_zeros(slices, groups, size, value_dim)
    if num_rows > 0:
        _launcher(kernels.softmax_backward_kernel)[(row_programs, groups)](
            queries,
            keys,
            grad_bias if bias is None else bias,
            values,
            values if grad_output is None else grad_output,
            valid,
            lse,
            row,
            row if quad is None else quad,
            grad_queries,
            grad_scale,
            grad_keys,
            grad_bias,
            grad_values,
            num_rows,
            groups,
            size,
            dim,
            value_dim,
            slices,
            HAS_BIAS=bias is not None,
            ELEMENTWISE=queries.dtype == torch.float64,
            DOT_PRECISION=dot_precision,
            HAS_GRAD_OUT=grad_output is not None,
            HAS_QUAD=quad is not None,
            BLOCK_N=blocks.rows,
            BLOCK_M=blocks.columns,
            BLOCK_D=blocks.dim,
            BLOCK_DV=blocks.value_dim,
            num_warps=blocks.num_warps,
            num_stages=blocks.num_stages,
        )
    return grad_queries, grad_scale, grad_keys.sum(dim=0), grad_bias.sum(dim=0), grad_values.sum(dim=0)
