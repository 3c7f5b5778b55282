"""The four kernels of :mod:`simplexvq.scale.triton.kernels` as PyTorch operators, one launch each.

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
from torch import Tensor
from torch.library import triton_op, wrap_triton

import triton
from simplexvq.scale.triton import kernels
from simplexvq.scale.triton.interpreter_compat import patch_interpreter
from triton.runtime.jit import JITFunction

__all__ = [
    "Blocks",
    "accumulation_dtype",
    "block_sizes",
    "softmax_columns",
    "softmax_columns_backward",
    "softmax_rows",
    "softmax_rows_backward",
]

KNN_MODES = {None: 0, "ce": 1, "l2": 2}


@dataclass(frozen=True)
class Blocks:
    """Tile sizes: rows and keys per tile, padded widths of keys and values (powers of two, >= 16)."""

    rows: int
    columns: int
    dim: int
    value_dim: int
    num_warps: int = 4


def _padded(width: int) -> int:
    return max(16, triton.next_power_of_2(max(width, 1)))


def block_sizes(device: torch.device, dim: int, value_dim: int) -> Blocks:
    """Tiles for a device: small ones for the interpreter (CPU tensors), register-sized ones for a GPU."""
    padded, padded_values = _padded(dim), _padded(value_dim)
    if device.type != "cuda":
        return Blocks(16, 16, padded, padded_values)
    widest = max(padded, padded_values)
    if widest <= 64:
        return Blocks(64, 64, padded, padded_values)
    if widest <= 128:
        return Blocks(64, 32, padded, padded_values)
    return Blocks(32, 32, padded, padded_values, num_warps=8)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launcher(kernel):
    if isinstance(kernel, JITFunction):
        return wrap_triton(kernel)
    patch_interpreter()
    return kernel


@triton_op("simplexvq::triton_softmax_rows", mutates_args={})
def softmax_rows(
    queries: Tensor, keys: Tensor, bias: Tensor | None, values: Tensor, valid: Tensor, compute_output: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row pass: ``(output (N or 0, G, DV), lse, indices (N, G) long, exp(entropy), max p, |p|^2)``."""
    num_rows, groups, dim = queries.shape
    size, value_dim = keys.shape[1], values.shape[2]
    accumulate = accumulation_dtype(queries.dtype)
    output = values.new_empty(num_rows if compute_output else 0, groups, value_dim)
    per_row = [queries.new_empty(groups, num_rows, dtype=accumulate) for _ in range(4)]
    indices = queries.new_empty(num_rows, groups, dtype=torch.long)
    if num_rows > 0:
        blocks = block_sizes(queries.device, dim, value_dim)
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
            HAS_OUT=compute_output,
            BLOCK_N=blocks.rows,
            BLOCK_M=blocks.columns,
            BLOCK_D=blocks.dim,
            BLOCK_DV=blocks.value_dim,
            num_warps=blocks.num_warps,
        )
    lse, perplexity, max_prob, squared_norm = per_row
    return output, lse, indices, perplexity, max_prob, squared_norm


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
) -> tuple[Tensor, Tensor, Tensor]:
    """Column pass: ``(prob_sum (G, M), top values (k, G M), top rows (k, G M) long)``; ``k = 0``: sums only.

    Column ``g M + m`` of the top-K holds key m of group g: its k smallest deviations (``+inf`` / row ``-1`` where
    fewer than k valid rows exist), unsorted.
    """
    num_rows, groups, dim = queries.shape
    size = keys.shape[1]
    blocks = block_sizes(queries.device, dim, 1)
    prob_sum = lse.new_empty(groups, size)
    top_values = lse.new_empty(k, groups * size)
    top_rows = queries.new_empty(k, groups * size, dtype=torch.long)
    grid = (triton.cdiv(size, blocks.columns), groups)
    _launcher(kernels.softmax_columns_kernel)[grid](
        queries,
        keys,
        lse if bias is None else bias,
        valid,
        lse,
        squared_norm,
        prob_sum,
        top_values if k > 0 else prob_sum,
        top_rows if k > 0 else indices_placeholder(queries),
        num_rows,
        groups,
        size,
        dim,
        k,
        HAS_BIAS=bias is not None,
        KNN=KNN_MODES[knn_distance if k > 0 else None],
        BLOCK_N=blocks.rows,
        BLOCK_M=blocks.columns,
        BLOCK_D=blocks.dim,
        BLOCK_K=max(2, triton.next_power_of_2(max(k, 1))),
        num_warps=blocks.num_warps,
    )
    return prob_sum, top_values, top_rows


def indices_placeholder(like: Tensor) -> Tensor:
    """A one-element long tensor for an unused pointer argument (never read or written)."""
    return like.new_empty(1, dtype=torch.long)


@triton_op("simplexvq::triton_softmax_rows_backward", mutates_args={})
def softmax_rows_backward(
    queries: Tensor,
    keys: Tensor,
    bias: Tensor | None,
    values: Tensor,
    grad_output: Tensor | None,
    valid: Tensor,
    lse: Tensor,
    row: Tensor,
    quad: Tensor | None,
) -> Tensor:
    """Gradient of the queries (N, G, D) for the logits' gradient ``p * (dO . v - row + quad * p)``."""
    num_rows, groups, dim = queries.shape
    size, value_dim = keys.shape[1], values.shape[2]
    grad_queries = torch.empty_like(queries)
    if num_rows > 0:
        blocks = block_sizes(queries.device, dim, value_dim)
        grid = (triton.cdiv(num_rows, blocks.rows), groups)
        _launcher(kernels.softmax_rows_backward_kernel)[grid](
            queries,
            keys,
            queries if bias is None else bias,
            values,
            values if grad_output is None else grad_output,
            valid,
            lse,
            row,
            row if quad is None else quad,
            grad_queries,
            num_rows,
            groups,
            size,
            dim,
            value_dim,
            HAS_BIAS=bias is not None,
            HAS_GRAD_OUT=grad_output is not None,
            HAS_QUAD=quad is not None,
            BLOCK_N=blocks.rows,
            BLOCK_M=blocks.columns,
            BLOCK_D=blocks.dim,
            BLOCK_DV=blocks.value_dim,
            num_warps=blocks.num_warps,
        )
    return grad_queries


@triton_op("simplexvq::triton_softmax_columns_backward", mutates_args={})
def softmax_columns_backward(
    queries: Tensor,
    keys: Tensor,
    bias: Tensor | None,
    values: Tensor,
    grad_output: Tensor | None,
    valid: Tensor,
    lse: Tensor,
    row: Tensor,
    quad: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the keys (G, M, D), the bias (G, M; zeros without a bias) and the values (G, M, DV)."""
    num_rows, groups, dim = queries.shape
    size, value_dim = keys.shape[1], values.shape[2]
    grad_keys = torch.empty_like(keys)
    grad_bias = keys.new_zeros(groups, size) if bias is None else torch.empty_like(bias)
    grad_values = torch.zeros_like(values) if grad_output is None else torch.empty_like(values)
    blocks = block_sizes(queries.device, dim, value_dim)
    grid = (triton.cdiv(size, blocks.columns), groups)
    _launcher(kernels.softmax_columns_backward_kernel)[grid](
        queries,
        keys,
        grad_bias if bias is None else bias,
        values,
        values if grad_output is None else grad_output,
        valid,
        lse,
        row,
        row if quad is None else quad,
        grad_keys,
        grad_bias,
        grad_values,
        num_rows,
        groups,
        size,
        dim,
        value_dim,
        HAS_BIAS=bias is not None,
        HAS_GRAD_OUT=grad_output is not None,
        HAS_QUAD=quad is not None,
        BLOCK_N=blocks.rows,
        BLOCK_M=blocks.columns,
        BLOCK_D=blocks.dim,
        BLOCK_DV=blocks.value_dim,
        num_warps=blocks.num_warps,
    )
    return grad_keys, grad_bias, grad_values
