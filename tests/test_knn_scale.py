"""Tests of the KNN regularizer at scale (issue 4): streamed top-K, vertex subsets, global neighbours across ranks,
the attention form and the fused memory-efficient quantizer.

Every fast path is compared with the dense computation (itself tested against naive references in
``tests/test_functional.py`` and ``tests/test_quantizer.py``) or with a naive reference written here, on values and
on gradients, in float64. The distributed test runs ``tests/distributed/global_knn_worker.py`` under ``torchrun``
with two gloo ranks and compares every rank with one process holding the concatenated batch.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import simplexvq
from simplexvq import functional as VQF
from simplexvq.scale import soft_quantize, streamed_softmax_quantize
from simplexvq.scale.backends import CpuBackend
from simplexvq.scale.backends.blockmax import BlockMaxima
from simplexvq.scale.backends.candidates import merge_scores
from simplexvq.scale.backends.ceiling import CeilingTopK, kept_per_column
from simplexvq.scale.distributed import select_among_gathered
from simplexvq.scale.knn_loss import knn_loss_scaled
from simplexvq.scale.topk import RunningTopK, streamed_topk

DT = torch.float64
REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = REPO_ROOT / "tests" / "distributed" / "global_knn_worker.py"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _log_probs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.log_softmax(2.0 * torch.randn(shape, generator=_gen(seed), dtype=DT), dim=-1)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], weight: torch.Tensor | None = None) -> list[torch.Tensor]:
    total = out.sum() if weight is None else (out * weight).sum()
    grads = torch.autograd.grad(total, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def naive_subset_knn(log_probs: torch.Tensor, k: int, distance: str, vertices: torch.Tensor) -> torch.Tensor:
    """Eq. 13 over the vertex subset ``vertices`` (G, S): explicit loops and sorting, normalised by S K."""
    n_pos, groups, entries = log_probs.shape
    total = 0.0
    for g in range(groups):
        for m in vertices[g].tolist():
            deviations = []
            for n in range(n_pos):
                p = log_probs[n, g].exp()
                if distance == "ce":
                    deviations.append(-log_probs[n, g, m])
                else:
                    vertex = torch.zeros(entries, dtype=DT)
                    vertex[m] = 1.0
                    deviations.append(((vertex - p) ** 2).sum())
            order = sorted(range(n_pos), key=lambda i: deviations[i].item())
            total = total + sum(deviations[i] for i in order[:k])
    return total / (groups * vertices.shape[1] * k)


# --------------------------------------------------------------------------------------------------------------
# Streamed top-K and the functional API
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("order", ["random", "descending", "ties"])
def test_running_topk_equals_full_topk(chunk, order):
    """Random rows take the sparse merge, descending rows (every entry a candidate) the dense one; with ties the
    values must match and every row must be distinct and hold its value."""
    deviations = torch.randn(200, 11, generator=_gen(1), dtype=DT)
    if order == "descending":
        deviations = deviations.sort(dim=0, descending=True).values
    elif order == "ties":
        deviations = torch.randint(0, 4, (200, 11), generator=_gen(1)).to(DT)
    for k in (1, 4, 200):
        state = RunningTopK.empty(k, 11, dtype=DT, device=torch.device("cpu"))
        for start in range(0, 200, chunk):
            state.update(deviations[start : start + chunk], start)
        expected = deviations.topk(k, dim=0, largest=False)
        assert torch.equal(state.values.sort(dim=0).values, expected.values)
        assert torch.equal(deviations.gather(0, state.rows), state.values)
        rows = state.rows.sort(dim=0).values
        assert bool((rows[1:] != rows[:-1]).all()) and bool((rows >= 0).all())
        if order != "ties":
            assert torch.equal(rows, expected.indices.sort(dim=0).values)


@pytest.mark.parametrize("columns", [1, 5, 8, 13, 64])
def test_candidate_extraction_equals_nonzero_of_the_comparison(columns):
    """The packed (8 entries per int64 word) candidate scan equals ``(chunk < threshold).nonzero()`` in row-major
    order, for column counts that are and are not multiples of 8, chunks of changing size (the reused buffer
    grows and shrinks), no candidates, every entry a candidate, and ties with the threshold (not candidates)."""
    generator = _gen(7)
    state = RunningTopK.empty(3, columns, dtype=DT, device=torch.device("cpu"))
    for trial, rows in enumerate([5, 1, 17, 40, 3, 64, 2]):
        state.values = torch.randn(3, columns, generator=generator, dtype=DT)
        chunk = torch.randn(rows, columns, generator=generator, dtype=DT)
        if trial == 2:
            chunk = chunk.abs() + 10.0  # none below
        elif trial == 3:
            chunk = -chunk.abs() - 10.0  # all below
        elif trial == 4:
            chunk = state.values.amax(dim=0).expand(rows, -1).clone()  # equal is not below
        row, column = state._candidates(chunk)
        expected_row, expected_column = (chunk < state.values.amax(dim=0)).nonzero(as_tuple=True)
        assert torch.equal(row, expected_row) and torch.equal(column, expected_column), trial


@pytest.mark.parametrize("shape", [(7, 64), (5, 3, 133), (4, 20), (2, 1, 1), (6, 200)])
@pytest.mark.parametrize("values", ["random", "ties", "late"])
def test_block_maxima_equal_max_and_first_argmax(shape, values):
    """Row maxima and the first index of the maximum equal ``torch.max`` / ``torch.argmax`` (which return the first
    maximal index), with and without a partial last block, with fewer columns than one block and with ties."""
    generator = _gen(21)
    if values == "random":
        x = torch.randn(shape, generator=generator, dtype=DT)
    else:
        x = torch.randint(0, 3, shape, generator=generator).to(DT)
        if values == "late":  # the maximum only in the last column (the partial block when there is one)
            x[..., -1] = 5.0
    blocks = BlockMaxima.of(x, width=16)
    assert torch.equal(blocks.top, x.amax(dim=-1))
    assert torch.equal(blocks.argmax(), x.argmax(dim=-1))
    assert blocks.full.shape[-1] == shape[-1] // 16 and (blocks.tail is None) == (shape[-1] % 16 == 0)


@pytest.mark.parametrize("size", [64, 133, 20])
@pytest.mark.parametrize("order", ["random", "ties", "descending"])
@pytest.mark.parametrize("chunk", [1, 9, 50])
def test_merge_scores_equals_update_on_deviations(size, order, chunk):
    """The block-bound candidate search of ``merge_scores`` finds exactly the entries of ``update``'s
    comparison: same K smallest values and rows per column, for blocks with and without a partial last one, ties
    (integer scores) and an order in which every entry is a candidate."""
    groups, num_rows, k = 2, 150, 3
    generator = _gen(22)
    if order == "ties":
        scores = torch.randint(0, 5, (groups, num_rows, size), generator=generator).to(DT)
        offsets = torch.randint(0, 3, (groups, num_rows), generator=generator).to(DT)
    else:
        scores = 4.0 * torch.randn(groups, num_rows, size, generator=generator, dtype=DT)
        offsets = scores.logsumexp(dim=-1)
    if order == "descending":
        offsets = offsets + torch.linspace(0.0, -50.0, num_rows, dtype=DT)
    deviations = (offsets.unsqueeze(-1) - scores).transpose(0, 1).reshape(num_rows, groups * size)
    reference = RunningTopK.empty(k, groups * size, dtype=DT, device=torch.device("cpu"))
    state = RunningTopK.empty(k, groups * size, dtype=DT, device=torch.device("cpu"))
    for start in range(0, num_rows, chunk):
        part = slice(start, start + chunk)
        reference.update(deviations[part], start)
        merge_scores(state, scores[:, part], offsets[:, part], BlockMaxima.of(scores[:, part], 16), start)
    assert state.rows_seen == reference.rows_seen == num_rows
    assert torch.equal(
        state.values.sort(dim=0).values, deviations.topk(k, dim=0, largest=False).values.sort(dim=0).values
    )
    assert torch.equal(deviations.gather(0, state.rows), state.values)
    if order != "ties":
        assert torch.equal(state.rows.sort(dim=0).values, reference.rows.sort(dim=0).values)


@pytest.mark.parametrize("shape", [(9, 4), (8, 2, 5), (13, 3, 3)])
@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_streamed_knn_loss_equals_dense(shape, distance, chunk_size):
    log_probs = _log_probs(shape, seed=2).requires_grad_(True)
    mask = torch.ones(shape[0], dtype=torch.bool)
    mask[[1, 5]] = False
    for k in (1, 3, int(mask.sum())):
        dense = VQF.knn_loss(log_probs, k, distance, mask=mask)
        streamed = knn_loss_scaled(log_probs, k, distance, mask=mask, chunk_size=chunk_size)
        torch.testing.assert_close(streamed, dense)
        weight = torch.tensor(1.7, dtype=DT)
        (expected,) = _grads(dense, [log_probs], weight)
        (got,) = _grads(streamed, [log_probs], weight)
        assert torch.count_nonzero(expected) > 0
        torch.testing.assert_close(got, expected)
        assert torch.count_nonzero(got[~mask]) == 0  # padding gets no gradient


@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("shared", [True, False])
def test_vertex_subset_matches_naive(distance, chunk_size, shared):
    log_probs = _log_probs((7, 2, 5), seed=3).requires_grad_(True)
    vertices = torch.tensor([1, 4]) if shared else torch.tensor([[0, 3], [2, 4]])
    per_group = vertices.expand(2, -1) if shared else vertices
    got = knn_loss_scaled(log_probs, 3, distance, vertices=vertices, chunk_size=chunk_size)
    expected = naive_subset_knn(log_probs, 3, distance, per_group)
    torch.testing.assert_close(got, expected)
    for g_got, g_exp in zip(_grads(got, [log_probs]), _grads(expected, [log_probs]), strict=True):
        torch.testing.assert_close(g_got, g_exp)


@pytest.mark.parametrize("distance", ["ce", "l2"])
def test_vertex_subsampling_is_unbiased(distance):
    """Averaged over every S-subset of vertices, the subsampled loss and gradient equal the full ones (section 5.3)."""
    log_probs = _log_probs((6, 2, 5), seed=4).requires_grad_(True)
    full = VQF.knn_loss(log_probs, 2, distance)
    subsets = [torch.tensor(s) for s in itertools.combinations(range(5), 2)]
    losses = [knn_loss_scaled(log_probs, 2, distance, vertices=s) for s in subsets]
    mean_loss = torch.stack(losses).mean()
    torch.testing.assert_close(mean_loss, full)
    torch.testing.assert_close(_grads(mean_loss, [log_probs])[0], _grads(full, [log_probs])[0])
    assert torch.stack(losses).std() > 0  # each subset alone differs: only the expectation is exact


def test_global_scope_without_process_group_is_local():
    assert not dist.is_initialized()
    log_probs = _log_probs((6, 2, 4), seed=5).requires_grad_(True)
    for chunk_size in (None, 2):
        local = VQF.knn_loss(log_probs, 2, "l2")
        global_ = knn_loss_scaled(log_probs, 2, "l2", scope="global", chunk_size=chunk_size)
        torch.testing.assert_close(global_, local)
        torch.testing.assert_close(_grads(global_, [log_probs])[0], _grads(local, [log_probs])[0])
    with pytest.raises(ValueError, match=r"k=7.*N=6"):
        knn_loss_scaled(log_probs, 7, scope="global")


def test_select_among_gathered_is_the_global_topk():
    """Three simulated ranks with unequal rows (one smaller than K, one empty): the union of the selections is the
    top-K of the concatenation, and the reported sum is the same on every rank."""
    k, columns = 3, 6
    rows = {0: torch.randn(5, columns, generator=_gen(6), dtype=DT), 1: torch.randn(2, columns, generator=_gen(7))}
    rows[1] = rows[1].to(DT)
    rows[2] = torch.empty(0, columns, dtype=DT)
    candidates = []
    for rank in range(3):
        local = rows[rank].topk(min(k, rows[rank].shape[0]), dim=0, largest=False).values
        candidates.append(torch.cat([local, torch.full((k - local.shape[0], columns), float("nan"), dtype=DT)]))
    gathered = torch.stack(candidates)
    everything = torch.cat([rows[r] for r in range(3)])
    expected = everything.topk(k, dim=0, largest=False).values
    picked, sums = [], []
    for rank in range(3):
        selected, total = select_among_gathered(gathered, k, rank)
        picked.append(torch.where(selected, candidates[rank], torch.zeros_like(candidates[rank])))
        sums.append(total)
        assert not bool((selected & torch.isnan(candidates[rank])).any())
    torch.testing.assert_close(sum(p.sum(dim=0) for p in picked), expected.sum(dim=0))
    assert sum(int(s.sum()) for s in (select_among_gathered(gathered, k, r)[0] for r in range(3))) == k * columns
    assert all(torch.equal(s, sums[0]) for s in sums)
    torch.testing.assert_close(sums[0], expected.sum())


def test_select_among_gathered_prefers_infinite_deviations_to_empty_slots():
    """Rank 0 holds one real row at +inf deviation and an empty slot, rank 1 one real row: with K = 2 both real rows
    are selected, the empty slot never."""
    inf, nan = float("inf"), float("nan")
    gathered = torch.tensor([[[inf], [nan]], [[1.0], [nan]]], dtype=DT)
    selected_0, total = select_among_gathered(gathered, 2, 0)
    selected_1, _ = select_among_gathered(gathered, 2, 1)
    assert selected_0[:, 0].tolist() == [True, False]
    assert selected_1[:, 0].tolist() == [True, False]
    assert total.item() == inf


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scope": "world"}, r"scope must be 'local' or 'global'"),
        ({"chunk_size": 0}, r"chunk_size must be a positive integer"),
        ({"vertices": torch.tensor([0, 9])}, r"vertices must lie in \[0, M=4\)"),
        ({"vertices": torch.tensor([1, 1])}, r"vertices must not repeat"),
        ({"vertices": torch.tensor([[0], [1], [2]])}, r"vertices must have shape \(S,\) or \(G=2, S\)"),
        ({"vertices": torch.tensor([0.0])}, r"vertices must be an integer tensor"),
    ],
)
def test_knn_loss_bad_scale_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        knn_loss_scaled(_log_probs((5, 2, 4), seed=8), 2, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Attention form and fused streamed quantization vs the dense path
# --------------------------------------------------------------------------------------------------------------


def _inputs(n: int, groups: int, entries: int, d: int, seed: int) -> list[torch.Tensor]:
    gen = _gen(seed)
    z = torch.randn(n, groups, d, generator=gen, dtype=DT)
    codebook = torch.randn(groups, entries, d, generator=gen, dtype=DT)
    temperature = 0.3 + torch.rand(groups, generator=gen, dtype=DT)
    return [x.requires_grad_(True) for x in (z, codebook, temperature)]


def _dense(z, codebook, temperature, distance, k=None, knn_distance="ce", vertices=None):
    logits = VQF.cosine_logits(z, codebook, temperature) if distance == "cosine" else None
    if logits is None:
        logits = VQF.euclidean_logits(z, codebook, temperature)
    log_pi = torch.log_softmax(logits, dim=-1)
    pi = log_pi.exp()
    loss = None if k is None else knn_loss_scaled(log_pi, k, knn_distance, vertices=vertices)
    return torch.einsum("ngm,gmd->ngd", pi, codebook), loss, pi


@pytest.mark.parametrize("distance", ["cosine", "euclid"])
@pytest.mark.parametrize("shape", [(9, 1, 6, 3), (7, 3, 4, 5)])
def test_soft_quantize_attention_equals_dense(distance, shape):
    inputs = _inputs(*shape, seed=10)
    expected, _, _ = _dense(*inputs, distance)
    got = soft_quantize(*inputs, distance)
    torch.testing.assert_close(got, expected)
    weight = torch.randn(expected.shape, generator=_gen(11), dtype=DT)
    for g_got, g_exp in zip(_grads(got, inputs, weight), _grads(expected, inputs, weight), strict=True):
        assert torch.count_nonzero(g_exp) > 0  # z, Q and the temperature all receive a gradient
        torch.testing.assert_close(g_got, g_exp)


@pytest.mark.parametrize("distance", ["cosine", "euclid"])
@pytest.mark.parametrize("knn_distance", ["ce", "l2"])
@pytest.mark.parametrize(
    ("shape", "chunk_size", "k"),
    [((11, 1, 5, 3), 1, 2), ((13, 2, 4, 3), 4, 3), ((6, 3, 7, 2), 64, 6), ((300, 2, 133, 4), 32, 3)],
)
@pytest.mark.parametrize("subset", [False, True])
def test_streamed_softmax_quantize_equals_dense(distance, knn_distance, shape, chunk_size, k, subset):
    inputs = _inputs(*shape, seed=12)
    vertices = torch.tensor([1, 3]) if subset else None
    out, loss, pi = _dense(*inputs, distance, k, knn_distance, vertices)
    result = streamed_softmax_quantize(
        *inputs, distance=distance, knn_k=k, knn_distance=knn_distance, chunk_size=chunk_size, vertices=vertices
    )
    torch.testing.assert_close(result.quantized, out)
    torch.testing.assert_close(result.knn_loss, loss)
    assert torch.equal(result.indices, pi.argmax(dim=-1))
    expected_stats = simplexvq.stats.probability_stats(pi)
    for name, value in expected_stats.items():
        torch.testing.assert_close(result.stats[name], value)
    weight = torch.randn(out.shape, generator=_gen(13), dtype=DT)
    for alpha in (0.0, 2.5):  # output gradient alone, then output and KNN together
        expected = _grads((out * weight).sum() + alpha * loss, inputs)
        got = _grads((result.quantized * weight).sum() + alpha * result.knn_loss, inputs)
        for g_got, g_exp in zip(got, expected, strict=True):
            torch.testing.assert_close(g_got, g_exp)
    for g_got, g_exp in zip(_grads(result.knn_loss, inputs), _grads(loss, inputs), strict=True):  # KNN alone
        assert torch.count_nonzero(g_exp) > 0
        torch.testing.assert_close(g_got, g_exp)


def test_streamed_softmax_quantize_gradcheck():
    inputs = _inputs(4, 2, 3, 2, seed=14)
    for knn_distance in ("ce", "l2"):

        def fn(z, q, t, knn_distance=knn_distance):
            result = streamed_softmax_quantize(z, q, t, knn_k=2, knn_distance=knn_distance, chunk_size=2)
            return result.quantized, result.knn_loss

        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_streamed_without_rows_and_without_output():
    z, codebook, temperature = _inputs(0, 2, 4, 3, seed=15)
    result = streamed_softmax_quantize(z, codebook, temperature)
    assert result.quantized.shape == (0, 2, 3) and result.indices.shape == (0, 2) and result.knn_loss is None
    with pytest.raises(ValueError, match=r"k=1.*N=0"):
        streamed_softmax_quantize(z, codebook, temperature, knn_k=1)
    z, codebook, temperature = _inputs(6, 2, 4, 3, seed=16)
    result = streamed_softmax_quantize(z, codebook, temperature, knn_k=2, compute_output=False, chunk_size=4)
    _, loss, _ = _dense(z, codebook, temperature, "cosine", 2)
    assert result.quantized is None
    torch.testing.assert_close(result.knn_loss, loss)
    for g_got, g_exp in zip(_grads(result.knn_loss, [z, codebook]), _grads(loss, [z, codebook]), strict=True):
        torch.testing.assert_close(g_got, g_exp)


# --------------------------------------------------------------------------------------------------------------
# The quantizer's options
# --------------------------------------------------------------------------------------------------------------


def _pair(regularizer: str, distance: str, inference: str = "hard", **extra):
    config = simplexvq.quantizer_config(
        f"softmax-{regularizer}",
        dim=12,
        groups=2,
        codebook_size=7,
        knn_k=3,
        distance=distance,
        inference=inference,
        regularizer_weight=0.7,
    )
    torch.manual_seed(0)
    dense = simplexvq.ProductQuantizer(config).double()
    efficient = simplexvq.ProductQuantizer(dataclasses.replace(config, memory_efficient=True, **extra)).double()
    efficient.load_state_dict(dense.state_dict())
    return dense, efficient


@pytest.mark.parametrize("regularizer", ["knn_ce", "knn_l2", "none"])
@pytest.mark.parametrize("distance", ["cosine", "euclid"])
@pytest.mark.parametrize("mode", ["train", "eval_hard", "eval_soft"])
def test_memory_efficient_quantizer_equals_dense(regularizer, distance, mode):
    dense, efficient = _pair(regularizer, distance, "soft" if mode == "eval_soft" else "hard", chunk_size=4)
    if mode != "train":
        dense.eval()
        efficient.eval()
    z = torch.randn(3, 9, 12, generator=_gen(20), dtype=DT)
    pad = torch.rand(3, 9, generator=_gen(21)) < 0.3
    z_dense, z_eff = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    expected, got = dense(z_dense, pad), efficient(z_eff, pad)
    torch.testing.assert_close(got.quantized, expected.quantized)
    assert torch.equal(got.indices, expected.indices)
    assert got.losses.keys() == expected.losses.keys()
    for name in expected.losses:
        torch.testing.assert_close(got.losses[name], expected.losses[name])
    assert got.stats.keys() == expected.stats.keys()
    for name in expected.stats:
        torch.testing.assert_close(got.stats[name], expected.stats[name])
    weight = torch.randn(z.shape, generator=_gen(22), dtype=DT)
    ((expected.quantized * weight).sum() + expected.loss).backward()
    ((got.quantized * weight).sum() + got.loss).backward()
    pairs = [(z_dense.grad, z_eff.grad)] + [
        (p.grad, q.grad) for p, q in zip(dense.parameters(), efficient.parameters(), strict=True)
    ]
    for g_exp, g_got in pairs:
        if g_exp is None:
            assert g_got is None or torch.count_nonzero(g_got) == 0
        else:
            torch.testing.assert_close(g_got, g_exp)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_quantizer_vertex_subsample(memory_efficient):
    """Training regularizes the drawn subset (normalised by S K); eval mode uses every vertex."""
    config = simplexvq.quantizer_config(
        "softmax-knn_ce",
        dim=8,
        groups=2,
        codebook_size=6,
        knn_k=2,
        vertex_subsample=3,
        memory_efficient=memory_efficient,
    )
    torch.manual_seed(0)
    quantizer = simplexvq.ProductQuantizer(config).double()
    z = torch.randn(20, 8, generator=_gen(30), dtype=DT)
    torch.manual_seed(123)
    loss = quantizer(z).loss
    torch.manual_seed(123)
    vertices = torch.rand(2, 6).argsort(dim=-1)[:, :3].sort(dim=-1).values
    log_pi = torch.log_softmax(quantizer.logits(z.reshape(20, 2, 4), quantizer.codebook()), dim=-1)
    torch.testing.assert_close(loss, naive_subset_knn(log_pi, 2, "ce", vertices))
    quantizer.eval()
    torch.testing.assert_close(quantizer(z).loss, VQF.knn_loss(log_pi, 2, "ce"))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any operator (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_memory_efficient_never_builds_n_by_m():
    n, groups, entries, chunk, k = 256, 2, 128, 16, 4
    config = simplexvq.quantizer_config("softmax-knn_l2", dim=8, groups=groups, codebook_size=entries, knn_k=k)
    largest = {}
    for efficient in (False, True):
        torch.manual_seed(0)
        quantizer = simplexvq.ProductQuantizer(
            dataclasses.replace(config, memory_efficient=efficient, chunk_size=chunk if efficient else None)
        )
        z = torch.randn(n, 8, requires_grad=True)
        with _LargestTensor() as mode:
            out = quantizer(z)
            (out.quantized.square().sum() + out.loss).backward()
        largest[efficient] = mode.largest
    assert largest[False] >= n * groups * entries
    assert largest[True] <= (chunk + k) * groups * entries < n * groups * entries // 8


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"knn_scope": "world"}, r"knn_scope='world' is not one of local, global"),
        ({"knn_scope": "global", "regularizer": "perplexity"}, r"knn_scope='global'.*regularizer='perplexity'"),
        ({"memory_efficient": True, "method": "hard_gumbel"}, r"memory_efficient=True .*method='softmax'"),
        ({"memory_efficient": True, "regularizer": "perplexity"}, r"memory_efficient=True supports"),
        ({"memory_efficient": 1}, r"memory_efficient must be True or False"),
        ({"chunk_size": 0, "memory_efficient": True}, r"chunk_size must be a positive integer"),
        ({"chunk_size": 8, "regularizer": "perplexity"}, r"chunk_size streams"),
        ({"vertex_subsample": 9}, r"vertex_subsample=9 exceeds codebook_size=4"),
        ({"vertex_subsample": 2, "regularizer": "none"}, r"vertex_subsample subsamples"),
    ],
)
def test_invalid_scale_config_is_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        simplexvq.QuantizerConfig(dim=8, codebook_size=4, **fields)


def test_memory_efficient_refuses_return_probs():
    quantizer = simplexvq.build_quantizer("softmax-knn_ce", dim=8, codebook_size=4, knn_k=2, memory_efficient=True)
    with pytest.raises(ValueError, match=r"return_probs=True .*memory_efficient=True"):
        quantizer(torch.randn(6, 8), return_probs=True)


def test_local_quantizer_still_rejects_an_empty_batch():
    quantizer = simplexvq.build_quantizer("softmax-knn_ce", dim=8, codebook_size=4, knn_k=2, knn_scope="global")
    with pytest.raises(ValueError, match=r"no positions to quantize"):
        quantizer(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))  # no process group: local rules


# --------------------------------------------------------------------------------------------------------------
# Two gloo ranks vs one process holding both halves
# --------------------------------------------------------------------------------------------------------------


def _load_worker():
    spec = importlib.util.spec_from_file_location("global_knn_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=DT)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed + gloo")
def test_global_knn_matches_single_process(tmp_path):
    worker = _load_worker()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(WORKER), str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, f"torchrun failed\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    world_size = 2
    assert [r["world_size"] for r in reports] == [world_size, world_size]

    for name in worker.FUNCTIONAL:
        z, weight, sizes = worker.functional_data(name)
        z, weight = z.requires_grad_(True), weight.requires_grad_(True)
        loss = worker.functional_loss(name, z, weight, "local")  # one process, concatenated batch
        grad_z, grad_weight = torch.autograd.grad(loss, [z, weight])
        shards = grad_z.split(list(sizes))
        for rank, report in enumerate(reports):
            got = report["functional"][name]
            torch.testing.assert_close(_tensor(got["loss"]), loss.detach(), msg=f"{name} rank {rank} loss")
            torch.testing.assert_close(_tensor(got["weight_grad"]), grad_weight.reshape(-1), msg=f"{name} grad")
            # each rank's input gradient is W times its rows' share (DDP then averages over W ranks)
            expected_z = world_size * shards[rank].reshape(-1)
            torch.testing.assert_close(_tensor(got["z_grad"]).reshape(-1), expected_z, msg=f"{name} z grad")

    for name in worker.QUANTIZER:
        shards = worker.quantizer_shards(name)
        quantizer = worker.build_quantizer(name, "local")
        rows = [z.reshape(-1, worker.DIM)[~pad.reshape(-1)] for z, pad in shards]
        everything = torch.cat(rows).requires_grad_(True)
        torch.manual_seed(worker.SUBSAMPLE_SEED)  # rank 0's vertex draw, which the worker broadcasts
        loss = quantizer(everything).loss
        loss.backward()
        row_grads = everything.grad.split([r.shape[0] for r in rows])
        for rank, report in enumerate(reports):
            got = report["quantizer"][name]
            assert got["valid_rows"] == rows[rank].shape[0]
            assert not got["fell_back"], f"{name}: the Triton backend fell back to the reference backend"
            torch.testing.assert_close(_tensor(got["loss"]), loss.detach(), msg=f"{name} rank {rank} loss")
            for param_name, param in quantizer.named_parameters():
                torch.testing.assert_close(
                    _tensor(got["grads"][param_name]), param.grad.reshape(-1), msg=f"{name} {param_name}"
                )
            z, pad = shards[rank]
            expected = torch.zeros(z.shape, dtype=DT).reshape(-1, worker.DIM)
            expected[~pad.reshape(-1)] = world_size * row_grads[rank]
            torch.testing.assert_close(_tensor(got["z_grad"]), expected.reshape(-1), msg=f"{name} z grad")
    assert any(r["quantizer"]["efficient-rank0-empty"]["valid_rows"] == 0 for r in reports)
    assert any(r["quantizer"]["dense-rank0-all-padding"]["valid_rows"] == 0 for r in reports)
    assert any(r["quantizer"]["efficient-rank0-all-padding-triton"]["valid_rows"] == 0 for r in reports)

    for report in reports:  # K above the global N: the same error on both ranks, nobody hangs
        message = report["errors"]["k-above-global-n"]
        assert message is not None and "k=4" in message and "all 2 ranks" in message and "N=3" in message


# --------------------------------------------------------------------------------------------------------------
# The ceiling carried over between steps (simplexvq.scale.backends.ceiling)
# --------------------------------------------------------------------------------------------------------------


def _ceiling_search(scores, offsets, k, ceiling, chunk):
    """Run CeilingTopK over ``scores`` (G, N, M) in chunks; recomputation from the full deviation matrix."""
    groups, num_rows, size = scores.shape
    deviations = (offsets.unsqueeze(-1) - scores).transpose(0, 1).reshape(num_rows, groups * size)
    recomputed = []

    def recompute(columns, keep):
        recomputed.append(columns)
        return streamed_topk(
            lambda a, b: deviations[a:b, columns],
            num_rows,
            keep,
            columns.numel(),
            7,
            dtype=DT,
            device=deviations.device,
        )

    search = CeilingTopK(k, groups, size, ceiling, dtype=DT, device=torch.device("cpu"))
    for start in range(0, num_rows, chunk):
        part = slice(start, start + chunk)
        search.add(scores[:, part], offsets[:, part], BlockMaxima.of(scores[:, part], 16), start)
    state, next_ceiling = search.finish(recompute)
    return deviations, state, next_ceiling, recomputed


@pytest.mark.parametrize("ceiling", ["none", "previous", "too_low", "infinite", "mixed"])
@pytest.mark.parametrize("size", [40, 133])
def test_ceiling_search_is_exact_whatever_the_ceiling(ceiling, size):
    """Whatever the ceiling (none, the previous batch's, everywhere too low, infinite, a mix), the K smallest
    deviations and their rows equal the full top-K; columns with fewer than K entries below the ceiling are
    recomputed, and only those."""
    groups, num_rows, k = 2, 120, 3
    generator = _gen(31)

    def batch():
        scores = 3.0 * torch.randn(groups, num_rows, size, generator=generator, dtype=DT)
        return scores, scores.logsumexp(dim=-1)

    _, _, previous, _ = _ceiling_search(*batch(), k, None, 25)
    assert previous is not None and previous.shape == (groups * size,) and bool(previous.isfinite().all())
    given = {
        "none": None,
        "previous": previous,
        "too_low": torch.zeros(groups * size, dtype=DT),
        "infinite": torch.full((groups * size,), float("inf"), dtype=DT),
        "mixed": torch.where(torch.arange(groups * size) % 3 == 0, torch.zeros(groups * size, dtype=DT), previous),
    }[ceiling]
    deviations, state, next_ceiling, recomputed = _ceiling_search(*batch(), k, given, 25)
    expected = deviations.topk(k, dim=0, largest=False)
    assert state.values.shape == (k, groups * size) and state.rows_seen == num_rows
    assert torch.equal(state.values.sort(dim=0).values, expected.values.sort(dim=0).values)
    assert torch.equal(state.rows.sort(dim=0).values, expected.indices.sort(dim=0).values)
    if given is None:
        assert recomputed == []
    else:
        below = (deviations < given).sum(dim=0)
        assert torch.equal(
            torch.cat(recomputed) if recomputed else torch.empty(0, dtype=torch.long), (below < k).nonzero().squeeze(1)
        )
    keep = kept_per_column(k)
    if 4 * sum(len(c) for c in recomputed) > groups * size:  # too many recomputed: no ceiling for the next call
        assert ceiling in ("too_low", "mixed") and next_ceiling is None
    else:  # the keep-th smallest where known: all recomputed columns, and those with keep entries below the ceiling
        true_kth = deviations.topk(keep, dim=0, largest=False).values.amax(dim=0)
        if given is not None:
            known = (deviations < given).sum(dim=0) >= keep
            if recomputed:
                known[torch.cat(recomputed)] = True
            true_kth = torch.where(known, true_kth, given)
        assert torch.equal(next_ceiling, true_kth)


def test_streamed_quantize_with_a_hint_equals_without():
    """``knn_hint`` from a call on other data (or a useless one) changes neither the loss nor any gradient; the
    quantizer carries it from step to step and still equals the dense quantizer."""
    z_old, codebook, temperature = _inputs(150, 2, 133, 4, seed=32)
    first = streamed_softmax_quantize(z_old, codebook, temperature, knn_k=3, chunk_size=32)
    assert first.knn_hint is not None and first.knn_hint.shape == (2 * 133,)
    inputs = [_inputs(150, 2, 133, 4, seed=33)[0], codebook, temperature]
    plain = streamed_softmax_quantize(*inputs, knn_k=3, chunk_size=32)
    expected = _grads(plain.knn_loss + (plain.quantized**2).sum(), inputs)
    for hint in (first.knn_hint, torch.zeros(2 * 133, dtype=DT), torch.full((2 * 133,), float("inf"), dtype=DT)):
        hinted = streamed_softmax_quantize(*inputs, knn_k=3, chunk_size=32, knn_hint=hint)
        torch.testing.assert_close(hinted.knn_loss, plain.knn_loss)
        for got, want in zip(_grads(hinted.knn_loss + (hinted.quantized**2).sum(), inputs), expected, strict=True):
            torch.testing.assert_close(got, want)
    assert streamed_softmax_quantize(*inputs, knn_k=3, knn_distance="l2", chunk_size=32).knn_hint is None
    with pytest.raises(ValueError, match=r"knn_hint must have shape \(G \* M,\) = \(266,\)"):
        streamed_softmax_quantize(*inputs, knn_k=3, knn_hint=torch.zeros(5, dtype=DT))

    torch.manual_seed(0)
    efficient = simplexvq.build_quantizer(
        "softmax-knn_ce", dim=8, groups=2, codebook_size=133, knn_k=3, memory_efficient=True, chunk_size=32
    ).double()
    dense = simplexvq.build_quantizer("softmax-knn_ce", dim=8, groups=2, codebook_size=133, knn_k=3).double()
    dense.load_state_dict(efficient.state_dict())
    assert not any("hint" in name for name in efficient.state_dict())
    for seed in (34, 35):
        x = torch.randn(2, 75, 8, generator=_gen(seed), dtype=DT)
        losses = [quantizer(x).losses["knn_ce"] for quantizer in (efficient, dense)]
        torch.testing.assert_close(losses[0], losses[1])
        assert isinstance(efficient.streamed_backend, CpuBackend) and efficient.streamed_backend.knn_hint is not None


# --------------------------------------------------------------------------------------------------------------
# The compatibility modules simplexvq.knn / simplexvq.efficient: re-exports for users, imported by nothing inside
# --------------------------------------------------------------------------------------------------------------

COMPAT_MODULES = ("simplexvq.knn", "simplexvq.efficient")


def _imported_modules(path: Path, package: str | None = None) -> set[str]:
    """Every module a source file of ``package`` (default: its place under plugin/) imports, ``from simplexvq
    import knn`` counted as ``simplexvq.knn``."""
    import ast

    names: set[str] = set()
    if package is None:
        package = ".".join(path.relative_to(REPO_ROOT / "plugin").with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_no_core_module_imports_the_compatibility_modules():
    sources = sorted((REPO_ROOT / "plugin" / "simplexvq").rglob("*.py"))
    assert len(sources) > 30
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(_imported_modules(path) & set(COMPAT_MODULES))
        for path in sources
        if path.stem not in ("knn", "efficient") or path.parent.name != "simplexvq"
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_import_checker_sees_every_import_form(tmp_path):
    """The checker above must flag each way of importing a compatibility module (else it could never fail)."""
    module = tmp_path / "probe.py"
    forms = [
        "import simplexvq.knn",
        "from simplexvq import efficient",
        "from .. import knn",
        "from ..efficient import x",
    ]
    for form in forms:
        module.write_text(form + "\n")
        assert _imported_modules(module, "simplexvq.scale") & set(COMPAT_MODULES), form
    module.write_text("from simplexvq.scale import knn_loss\nimport simplexvq.knnx\n")
    assert not _imported_modules(module, "simplexvq.scale") & set(COMPAT_MODULES)


def test_using_the_library_never_loads_the_compatibility_modules():
    """A training step on every backend, the functional and at-scale KNN loss and the kernels' module in a fresh
    interpreter: ``simplexvq.knn`` and ``simplexvq.efficient`` stay unloaded."""
    code = """
import sys, warnings
import torch, simplexvq
from simplexvq import functional as VQF
from simplexvq.scale import knn_loss_scaled
import simplexvq.scale.triton
warnings.simplefilter("ignore")
for backend in ("reference", "cpu", "triton", "auto"):
    q = simplexvq.build_quantizer("softmax-knn_ce", dim=8, codebook_size=6, knn_k=2, memory_efficient=True,
                                  backend=backend)
    q(torch.randn(3, 5, 8)).loss.backward()
simplexvq.build_quantizer("softmax-knn_l2", dim=8, codebook_size=6, knn_k=2, chunk_size=2)(torch.randn(9, 8))
lp = torch.randn(7, 2, 5).log_softmax(-1)
VQF.knn_loss(lp, 2), knn_loss_scaled(lp, 2, chunk_size=3)
print(sorted(m for m in ("simplexvq.knn", "simplexvq.efficient") if m in sys.modules))
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_the_compatibility_modules_re_export_the_same_objects():
    import simplexvq.efficient as efficient
    import simplexvq.knn as knn
    from simplexvq import scale
    from simplexvq.scale import distributed, topk

    assert efficient.streamed_softmax_quantize is scale.streamed_softmax_quantize
    assert efficient.soft_quantize is scale.soft_quantize
    assert efficient.StreamedRequest is scale.StreamedRequest
    assert knn.knn_loss_scaled is knn_loss_scaled
    assert knn.select_global is distributed.select_global and knn.streamed_topk is topk.streamed_topk
