"""Raw Triton kernels of the fused softmax quantizer: two forward passes and one backward pass.

Notation (one group ``g`` at a time; every kernel's second grid axis is the group): queries ``q`` (N, G, D),
keys ``k`` (G, M, D), an optional per-key bias ``b`` (G, M), values ``v`` (G, M, DV). The logits are
``l[n, m] = q_n . k_m + b_m`` and ``p = softmax_m(l)``. Rows with ``VALID[n] == 0`` (padding) are loaded as
zeros and masked out of every sum, statistic and neighbour search; nothing of size N x M is ever stored.

* :func:`softmax_rows_kernel` (row-parallel, as flash attention's forward): loops over tiles of keys with an
  online log-sum-exp; writes ``lse``, the output ``p v``, the first argmax, ``exp(entropy)``, ``max p`` and
  ``|p|^2`` per row. Two products per tile.
* :func:`softmax_columns_kernel` (column-parallel): loops over tiles of rows, recomputes the logits with ``lse``
  and accumulates each key's column sum of ``p`` and keeps its ``NUM_K`` smallest deviations (cross-entropy
  ``lse - l`` or L2 ``1 - 2 p_m + |p|^2``) with their rows in registers. The rows may be split over a third
  grid axis (partial results reduced by the caller) so that a small codebook still fills the GPU. One product.
* :func:`softmax_backward_kernel` (row-parallel): the gradient of the logits ``ds = p * (dO . v - row + quad * p)``
  (``row``, ``quad``: per-row coefficients prepared by the caller, see :mod:`simplexvq.scale.triton.function`)
  recomputed once per tile and contracted into ``dq`` (registers), ``dk``, ``db``, ``dv`` (atomic adds) and the
  temperature's per-row term. Five products per tile.

Eight GEMM-equivalents (products of N x M x D) per training step in all, against six for the dense floor
(logits, output; their three gradients; the KNN column pass's logits).

Conventions of the Triton tutorials so that the kernels compile on GPUs and not only in the interpreter:
power-of-two block shapes, ``tl.dot`` operands of at least 16 per side (the caller pads ``D``), masks on every
tail, accumulation in the dtype of ``LSE`` (float32, or float64 for float64 inputs), explicit casts on stores.
Float64 inputs take ``ELEMENTWISE`` products instead of ``tl.dot`` (see :func:`_matmul`): exact, slow, for tests.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _matmul(a, b, ELEMENTWISE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``a @ b`` accumulated in float32 by ``tl.dot`` with ``input_precision=DOT_PRECISION`` (``"ieee"``: exact
    float32 products; ``"tf32"``: tensor-core products of float32 operands rounded to TF32; float16 / bfloat16
    operands always multiply exactly on tensor cores), or, with ``ELEMENTWISE``, as a broadcast product and sum in
    the operands' dtype: the float64 path, because Triton's GPU compiler cannot lower a float64 ``tl.dot`` with
    these layouts."""
    if ELEMENTWISE:
        out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION, out_dtype=tl.float32)
    return out


@triton.jit
def softmax_rows_kernel(
    Q,
    K,
    BIAS,
    V,
    VALID,
    OUT,
    LSE,
    INDICES,
    PERPLEXITY,
    MAX_PROB,
    SQUARED_NORM,
    N,
    G,
    M,
    D,
    DV,
    HAS_BIAS: tl.constexpr,
    ELEMENTWISE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """Row pass of the forward: one program per (block of rows, group)."""
    acc_ty = LSE.dtype.element_ty
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    rows64 = rows.to(tl.int64)
    valid = (tl.load(VALID + rows64, mask=in_range, other=0) != 0) & in_range
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q = tl.load(Q + (rows64[:, None] * G + g) * D + dims[None, :], mask=valid[:, None] & dim_ok[None, :], other=0.0)
    value_dims = tl.arange(0, BLOCK_DV)
    value_dim_ok = value_dims < DV

    running_max = tl.full([BLOCK_N], float("-inf"), acc_ty)
    total = tl.zeros([BLOCK_N], acc_ty)  # sum exp(l - running_max)
    centred = tl.zeros([BLOCK_N], acc_ty)  # sum exp(l - running_max) (l - running_max), for the entropy
    squares = tl.zeros([BLOCK_N], acc_ty)  # sum exp(l - running_max)^2, for |p|^2
    best = tl.full([BLOCK_N], float("-inf"), acc_ty)
    best_index = tl.zeros([BLOCK_N], tl.int32)
    output = tl.zeros([BLOCK_N, BLOCK_DV], acc_ty)
    for start in range(0, M, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        cols64 = cols.to(tl.int64)
        keys = tl.load(
            K + (g * M + cols64[:, None]) * D + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0
        )
        logits = _matmul(q, tl.trans(keys), ELEMENTWISE, DOT_PRECISION)
        if HAS_BIAS:
            bias = tl.load(BIAS + g * M + cols64, mask=col_ok, other=0.0).to(acc_ty)
            logits += bias[None, :]
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        tile_max = tl.max(logits, 1)
        tile_arg = tl.min(tl.where(logits == tile_max[:, None], cols[None, :], M), 1)  # first index on ties
        better = tile_max > best  # strict: an earlier tile keeps a tie
        best_index = tl.where(better, tile_arg, best_index)
        best = tl.where(better, tile_max, best)
        new_max = tl.maximum(running_max, tile_max)
        alpha = tl.exp(running_max - new_max)
        exps = tl.exp(logits - new_max[:, None])
        shift = (tl.where(total > 0, running_max, new_max) - new_max) * total  # no -inf * 0 on the first tile
        tile_centred = exps * tl.where(col_ok[None, :], logits - new_max[:, None], 0.0)  # no 0 * inf
        centred = alpha * (centred + shift) + tl.sum(tile_centred, 1)
        squares = squares * alpha * alpha + tl.sum(exps * exps, 1)
        total = total * alpha + tl.sum(exps, 1)
        if HAS_OUT:
            values = tl.load(
                V + (g * M + cols64[:, None]) * DV + value_dims[None, :],
                mask=col_ok[:, None] & value_dim_ok[None, :],
                other=0.0,
            )
            product = _matmul(exps.to(values.dtype), values, ELEMENTWISE, DOT_PRECISION)
            output = output * alpha[:, None] + product
        running_max = new_max

    log_total = tl.log(total)
    at = g * N + rows64
    tl.store(LSE + at, tl.where(valid, running_max + log_total, 0.0).to(acc_ty), mask=in_range)
    tl.store(INDICES + rows64 * G + g, tl.where(valid, best_index, -1).to(tl.int64), mask=in_range)
    entropy = log_total - centred / total
    tl.store(PERPLEXITY + at, tl.where(valid, tl.exp(entropy), 0.0).to(acc_ty), mask=in_range)
    tl.store(MAX_PROB + at, tl.where(valid, 1.0 / total, 0.0).to(acc_ty), mask=in_range)
    tl.store(SQUARED_NORM + at, tl.where(valid, squares / (total * total), 0.0).to(acc_ty), mask=in_range)
    if HAS_OUT:
        result = tl.where(valid[:, None], output / total[:, None], 0.0)
        tl.store(
            OUT + (rows64[:, None] * G + g) * DV + value_dims[None, :],
            result.to(OUT.dtype.element_ty),
            mask=in_range[:, None] & value_dim_ok[None, :],
        )


@triton.jit
def softmax_columns_kernel(
    Q,
    K,
    BIAS,
    VALID,
    LSE,
    SQUARED_NORM,
    PROB_SUM,
    TOP_VALUES,
    TOP_ROWS,
    N,
    G,
    M,
    D,
    NUM_K,
    ROWS_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    ELEMENTWISE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KNN: tl.constexpr,  # 0: column sums only, 1: cross-entropy top-K, 2: L2 top-K
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Column pass of the forward: one program per (block of keys, group, split of the rows).

    Each split of ``ROWS_PER_SPLIT`` rows writes its own partial column sums and top-K (the caller reduces them),
    so that a small codebook still fills the GPU.

    The top-K state of a key is ``NUM_K`` (value, row) slots (``+inf`` / ``-1`` while empty; slots from ``NUM_K``
    to ``BLOCK_K`` hold ``-inf`` so that they are never the worst slot). A tile of rows is merged by repeatedly
    moving its smallest remaining deviation into the worst slot while it is smaller; the number of rounds is the
    largest count of tile entries below their key's current worst slot (capped at ``NUM_K``), which is small once
    the state has seen a few tiles.
    """
    acc_ty = LSE.dtype.element_ty
    g = tl.program_id(1)
    split = tl.program_id(2)
    row_start = split * ROWS_PER_SPLIT
    row_stop = tl.minimum(row_start + ROWS_PER_SPLIT, N)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    cols64 = cols.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    keys = tl.load(K + (g * M + cols64[:, None]) * D + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(BIAS + g * M + cols64, mask=col_ok, other=0.0).to(acc_ty)
    prob_sum = tl.zeros([BLOCK_M], acc_ty)
    slots = tl.arange(0, BLOCK_K)
    slot_ok = slots < NUM_K
    top = tl.where(slot_ok[None, :], float("inf"), float("-inf")) + tl.zeros([BLOCK_M, BLOCK_K], acc_ty)
    top_rows = tl.full([BLOCK_M, BLOCK_K], -1, tl.int32)
    positions = tl.arange(0, BLOCK_N)
    for start in range(row_start, row_stop, BLOCK_N):
        rows = start + positions
        in_range = rows < row_stop
        rows64 = rows.to(tl.int64)
        valid = (tl.load(VALID + rows64, mask=in_range, other=0) != 0) & in_range
        q = tl.load(Q + (rows64[:, None] * G + g) * D + dims[None, :], mask=valid[:, None] & dim_ok[None, :], other=0.0)
        lse = tl.load(LSE + g * N + rows64, mask=valid, other=0.0)
        logits = _matmul(keys, tl.trans(q), ELEMENTWISE, DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if HAS_BIAS:
            logits += bias[:, None]
        prob = tl.exp(tl.where(valid[None, :] & col_ok[:, None], logits - lse[None, :], float("-inf")))
        prob_sum += tl.sum(prob, 1)
        if KNN != 0:
            if KNN == 1:
                deviation = lse[None, :] - logits
            else:
                squared_norm = tl.load(SQUARED_NORM + g * N + rows64, mask=valid, other=0.0)
                deviation = 1.0 - 2.0 * prob + squared_norm[None, :]
            deviation = tl.where(valid[None, :] & col_ok[:, None], deviation, float("inf"))
            worst = tl.max(top, 1)
            below = tl.sum((deviation < worst[:, None]).to(tl.int32), 1)
            rounds = tl.minimum(tl.max(below, 0), NUM_K)
            step = 0
            while step < rounds:
                smallest = tl.min(deviation, 1)
                at = tl.min(tl.where(deviation == smallest[:, None], positions[None, :], BLOCK_N), 1)
                worst = tl.max(top, 1)
                worst_slot = tl.min(tl.where(top == worst[:, None], slots[None, :], BLOCK_K), 1)
                take = smallest < worst
                replace = take[:, None] & (slots[None, :] == worst_slot[:, None])
                top = tl.where(replace, smallest[:, None], top)
                top_rows = tl.where(replace, (start + at)[:, None], top_rows)
                deviation = tl.where(take[:, None] & (positions[None, :] == at[:, None]), float("inf"), deviation)
                step += 1
    columns = G * M
    tl.store(PROB_SUM + split * columns + g * M + cols64, prob_sum.to(PROB_SUM.dtype.element_ty), mask=col_ok)
    if KNN != 0:
        at = (split * NUM_K + slots[None, :].to(tl.int64)) * columns + g * M + cols64[:, None]
        keep = col_ok[:, None] & slot_ok[None, :]
        tl.store(TOP_VALUES + at, top.to(TOP_VALUES.dtype.element_ty), mask=keep)
        tl.store(TOP_ROWS + at, top_rows.to(tl.int64), mask=keep)


@triton.jit
def softmax_backward_kernel(
    Q,
    K,
    BIAS,
    V,
    GRAD_OUT,
    VALID,
    LSE,
    ROW,
    QUAD,
    GRAD_Q,
    GRAD_SCALE,
    GRAD_K,
    GRAD_BIAS,
    GRAD_V,
    N,
    G,
    M,
    D,
    DV,
    SLICES,
    HAS_BIAS: tl.constexpr,
    ELEMENTWISE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_GRAD_OUT: tl.constexpr,
    HAS_QUAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """The whole backward in one pass: one program per (block of rows, group) loops over tiles of keys and
    recomputes each logits tile once. With ``ds = p * (dO . v - row + quad * p)``:

    * ``dq = ds k`` accumulates in registers and is stored once (the program owns its rows);
    * per row ``sum_m ds (l - lse)``, the temperature's term (see :mod:`simplexvq.scale.triton.function`);
    * ``dk = ds^T q``, ``db = sum_n ds`` and ``dv = p^T dO`` of the tile are added with ``tl.atomic_add`` into
      slice ``row block % SLICES`` of (SLICES, G, M, .) float32 / float64 buffers, which the caller sums (more
      slices, fewer programs adding to one address).

    Five products per tile (``q k^T``, ``dO v^T``, ``p^T dO``, ``ds k``, ``ds^T q``): with the forward's three,
    eight GEMM-equivalents per training step (flash attention 2's backward recomputes the logits once, too).
    """
    acc_ty = LSE.dtype.element_ty
    block = tl.program_id(0)
    g = tl.program_id(1)
    rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < N
    rows64 = rows.to(tl.int64)
    valid = (tl.load(VALID + rows64, mask=in_range, other=0) != 0) & in_range
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    value_dims = tl.arange(0, BLOCK_DV)
    value_dim_ok = value_dims < DV
    q = tl.load(Q + (rows64[:, None] * G + g) * D + dims[None, :], mask=valid[:, None] & dim_ok[None, :], other=0.0)
    at = g * N + rows64
    lse = tl.load(LSE + at, mask=valid, other=0.0)
    row = tl.load(ROW + at, mask=valid, other=0.0)
    if HAS_QUAD:
        quad = tl.load(QUAD + at, mask=valid, other=0.0)
    if HAS_GRAD_OUT:
        grad_out = tl.load(
            GRAD_OUT + (rows64[:, None] * G + g) * DV + value_dims[None, :],
            mask=valid[:, None] & value_dim_ok[None, :],
            other=0.0,
        )
    key_base = ((block % SLICES).to(tl.int64) * G + g) * M  # first key of this group in this program's slice
    grad_q = tl.zeros([BLOCK_N, BLOCK_D], acc_ty)
    grad_scale = tl.zeros([BLOCK_N], acc_ty)
    for start in range(0, M, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        cols64 = cols.to(tl.int64)
        keys = tl.load(
            K + (g * M + cols64[:, None]) * D + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0
        )
        logits = _matmul(q, tl.trans(keys), ELEMENTWISE, DOT_PRECISION)
        if HAS_BIAS:
            logits += tl.load(BIAS + g * M + cols64, mask=col_ok, other=0.0).to(acc_ty)[None, :]
        entry_ok = valid[:, None] & col_ok[None, :]
        centred = tl.where(entry_ok, logits - lse[:, None], float("-inf"))  # log p; -inf off the tile
        prob = tl.exp(centred)
        coefficient = tl.zeros([BLOCK_N, BLOCK_M], acc_ty) - row[:, None]
        if HAS_GRAD_OUT:
            values = tl.load(
                V + (g * M + cols64[:, None]) * DV + value_dims[None, :],
                mask=col_ok[:, None] & value_dim_ok[None, :],
                other=0.0,
            )
            coefficient += _matmul(grad_out, tl.trans(values), ELEMENTWISE, DOT_PRECISION)
            grad_v = _matmul(tl.trans(prob.to(grad_out.dtype)), grad_out, ELEMENTWISE, DOT_PRECISION)
            tl.atomic_add(
                GRAD_V + (key_base + cols64[:, None]) * DV + value_dims[None, :],
                grad_v.to(GRAD_V.dtype.element_ty),
                mask=col_ok[:, None] & value_dim_ok[None, :],
            )
        if HAS_QUAD:
            coefficient += quad[:, None] * prob
        grad_logits = prob * coefficient
        grad_q += _matmul(grad_logits.to(keys.dtype), keys, ELEMENTWISE, DOT_PRECISION)
        grad_keys = _matmul(tl.trans(grad_logits.to(q.dtype)), q, ELEMENTWISE, DOT_PRECISION)
        tl.atomic_add(
            GRAD_K + (key_base + cols64[:, None]) * D + dims[None, :],
            grad_keys.to(GRAD_K.dtype.element_ty),
            mask=col_ok[:, None] & dim_ok[None, :],
        )
        if HAS_BIAS:
            grad_bias = tl.sum(grad_logits, 0)
            tl.atomic_add(GRAD_BIAS + key_base + cols64, grad_bias.to(GRAD_BIAS.dtype.element_ty), mask=col_ok)
        grad_scale += tl.sum(grad_logits * tl.where(entry_ok, centred, 0.0), 1)
    tl.store(GRAD_SCALE + at, grad_scale.to(GRAD_SCALE.dtype.element_ty), mask=in_range)
    tl.store(
        GRAD_Q + (rows64[:, None] * G + g) * D + dims[None, :],
        grad_q.to(GRAD_Q.dtype.element_ty),
        mask=in_range[:, None] & dim_ok[None, :],
    )
