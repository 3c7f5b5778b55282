"""Tests of :class:`simplexvq.CodebookUsageMeter` against naive references.

The references below are deliberately naive: Python loops over batches, samples, positions and groups, Python
``set`` objects of the codes used, ``math.log`` entropies. The meter is fed several batches of different sizes and
layouts ((B, T, G) sequences, (B, H, W, G) images), G = 1 and G = 3, with padding (``-1``) and NaN probabilities at
padded positions (which must be ignored), and compared with the reference after every update.

The distributed test runs ``tests/distributed/usage_meter_worker.py`` under ``torchrun`` with two gloo ranks that hold
different, unequal shards of one data set, and checks that both ranks report the statistics of a single-process meter
fed the whole data set.

Run with ``python -m pytest tests/test_metrics.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from simplexvq import CodebookUsageMeter

STAT_KEYS = (
    "usage",
    "per_sample_usage",
    "perplexity",
    "individual_perplexity",
    "dead_codes",
    "num_positions",
    "counts",
)
REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER = REPO_ROOT / "tests" / "distributed" / "usage_meter_worker.py"

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


# --------------------------------------------------------------------------------------------------------------
# Naive reference


def _entropy(distribution: list[float]) -> float:
    return -sum(p * math.log(p) for p in distribution if p > 0.0)


def naive_stats(batches: list[Batch], groups: int, codebook_size: int) -> dict[str, torch.Tensor]:
    """Usage statistics of ``batches`` [(indices (B, ..., G), probs (B, ..., G, M) or None)], by explicit loops.

    A sample counts for ``per_sample_usage`` when at least one of its entries is not ``-1``; a position's
    probabilities count for ``individual_perplexity`` in group ``g`` when its code in group ``g`` is not ``-1``.
    """
    used: list[set[int]] = [set() for _ in range(groups)]
    counts = [[0] * codebook_size for _ in range(groups)]
    sample_usages: list[list[float]] = []  # one entry (per group) per sample with an unpadded position
    position_perplexities: list[list[float]] = [[] for _ in range(groups)]
    for indices, probs in batches:
        for b in range(indices.shape[0]):
            positions = indices[b].reshape(-1, groups).tolist()
            sample_probs = probs[b].reshape(-1, groups, codebook_size).tolist() if probs is not None else None
            sample_used: list[set[int]] = [set() for _ in range(groups)]
            present = False
            for t, position in enumerate(positions):
                for g, code in enumerate(position):
                    if code == -1:
                        continue
                    present = True
                    counts[g][code] += 1
                    used[g].add(code)
                    sample_used[g].add(code)
                    if sample_probs is not None:
                        position_perplexities[g].append(math.exp(_entropy(sample_probs[t][g])))
            if present:
                sample_usages.append([len(sample_used[g]) / codebook_size for g in range(groups)])

    nan = float("nan")
    usage, per_sample_usage, perplexity, individual_perplexity, dead_codes, num_positions = [], [], [], [], [], []
    for g in range(groups):
        total = sum(counts[g])
        usage.append(len(used[g]) / codebook_size)
        dead_codes.append(codebook_size - len(used[g]))
        num_positions.append(float(total))
        per_sample_usage.append(sum(s[g] for s in sample_usages) / len(sample_usages) if sample_usages else nan)
        perplexity.append(math.exp(_entropy([c / total for c in counts[g]])) if total > 0 else nan)
        values = position_perplexities[g]
        individual_perplexity.append(sum(values) / len(values) if values else nan)
    as_double = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return {
        "usage": as_double(usage),
        "per_sample_usage": as_double(per_sample_usage),
        "perplexity": as_double(perplexity),
        "individual_perplexity": as_double(individual_perplexity),
        "dead_codes": torch.tensor(dead_codes, dtype=torch.int64),
        "num_positions": as_double(num_positions),
        "counts": as_double(counts),
    }


def assert_stats_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(STAT_KEYS)
    for key in STAT_KEYS:
        assert actual[key].shape == expected[key].shape, key
        torch.testing.assert_close(
            actual[key].double().cpu(), expected[key].double(), equal_nan=True, msg=lambda m, k=key: f"{k}: {m}"
        )


# --------------------------------------------------------------------------------------------------------------
# Data


def make_batch(
    generator: torch.Generator,
    shape: tuple[int, ...],
    codebook_size: int,
    *,
    low: int = 0,
    high: int | None = None,
    pad_fraction: float = 0.25,
    pad_last_sample: bool = True,
    with_probs: bool = True,
    dtype: torch.dtype = torch.int64,
) -> Batch:
    """Codes in [low, high) of ``shape`` (B, ..., G), whole positions padded with ``-1`` (and the last sample fully
    padded), and probabilities (B, ..., G, M): softmax rows, some exactly onehot, NaN at padded positions."""
    high = codebook_size if high is None else high
    indices = torch.randint(low, high, shape, generator=generator)
    pad = torch.rand(shape[:-1], generator=generator) < pad_fraction
    if pad_last_sample:
        pad[-1] = True
    indices[pad] = -1
    probs = None
    if with_probs:
        logits = 3.0 * torch.randn(*shape, codebook_size, generator=generator, dtype=torch.float64)
        probs = logits.softmax(dim=-1)
        onehot = torch.rand(shape, generator=generator) < 0.2
        probs[onehot] = torch.nn.functional.one_hot(indices.clamp_min(0)[onehot], codebook_size).double()
        probs[pad] = float("nan")
    return indices.to(dtype), probs


LAYOUTS = {
    "sequence": [(3, 5), (1, 9), (6, 4)],  # (B, T)
    "image": [(2, 3, 4), (5, 2, 2), (1, 4, 3)],  # (B, H, W)
    "mixed": [(4, 6), (2, 3, 3), (1, 1), (3, 2, 5)],
}


def layout_batches(layout: str, groups: int, codebook_size: int, seed: int = 0) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [make_batch(generator, (*lead, groups), codebook_size) for lead in LAYOUTS[layout]]


# --------------------------------------------------------------------------------------------------------------
# The reference itself, on a hand-computed example


def test_naive_reference_on_hand_computed_example():
    # G = 1, M = 4. Sample 0 uses {0, 1} (positions 0, 0, 1, pad); sample 1 uses {2}; sample 2 is all padding.
    indices = torch.tensor([[[0], [0], [1], [-1]], [[2], [-1], [-1], [-1]], [[-1], [-1], [-1], [-1]]])
    uniform = [0.25] * 4
    probs = torch.tensor([[[uniform]] * 4] * 3, dtype=torch.float64).reshape(3, 4, 1, 4)
    stats = naive_stats([(indices, probs)], groups=1, codebook_size=4)
    counts = [2, 1, 1]  # codes 0, 1, 2
    expected_perplexity = math.exp(-sum(c / 4 * math.log(c / 4) for c in counts))
    assert stats["usage"].tolist() == [0.75]
    assert stats["per_sample_usage"].tolist() == [(2 / 4 + 1 / 4) / 2]
    assert stats["perplexity"].tolist() == pytest.approx([expected_perplexity])
    assert stats["individual_perplexity"].tolist() == pytest.approx([4.0])
    assert stats["dead_codes"].tolist() == [1]
    assert stats["num_positions"].tolist() == [4.0]
    meter = CodebookUsageMeter(groups=1, codebook_size=4)
    meter.update(indices, probs)
    assert_stats_equal(meter.compute(), stats)


# --------------------------------------------------------------------------------------------------------------
# Agreement with the reference


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_naive_reference_over_updates(layout, groups):
    codebook_size = 7
    batches = layout_batches(layout, groups, codebook_size)
    meter = CodebookUsageMeter(groups, codebook_size)
    for n in range(1, len(batches) + 1):
        meter.update(*batches[n - 1])
        assert_stats_equal(meter.compute(), naive_stats(batches[:n], groups, codebook_size))


@pytest.mark.parametrize("groups", [1, 3])
def test_large_codebook_partial_usage_and_dead_codes(groups):
    codebook_size = 64
    generator = torch.Generator().manual_seed(1)
    batches = [make_batch(generator, (b, 6, groups), codebook_size, high=20) for b in (2, 5, 3)]
    meter = CodebookUsageMeter(groups, codebook_size)
    for batch in batches:
        meter.update(*batch)
    stats = meter.compute()
    assert_stats_equal(stats, naive_stats(batches, groups, codebook_size))
    assert (stats["dead_codes"] >= codebook_size - 20).all()
    assert stats["dead_codes"].dtype == torch.int64
    assert stats["usage"].shape == (groups,)


def test_int32_indices_match_int64():
    groups, codebook_size = 3, 5
    batches = layout_batches("mixed", groups, codebook_size, seed=3)
    meter64, meter32 = CodebookUsageMeter(groups, codebook_size), CodebookUsageMeter(groups, codebook_size)
    for indices, probs in batches:
        meter64.update(indices, probs)
        meter32.update(indices.to(torch.int32), probs)
    assert_stats_equal(meter32.compute(), meter64.compute())
    assert_stats_equal(meter32.compute(), naive_stats(batches, groups, codebook_size))


def test_two_dimensional_indices_one_position_per_sample():
    groups, codebook_size = 3, 6
    generator = torch.Generator().manual_seed(4)
    indices, probs = make_batch(generator, (8, groups), codebook_size, pad_fraction=0.3)
    meter = CodebookUsageMeter(groups, codebook_size)
    meter.update(indices, probs)
    assert_stats_equal(meter.compute(), naive_stats([(indices, probs)], groups, codebook_size))


def test_perplexity_known_values():
    meter = CodebookUsageMeter(groups=2, codebook_size=8)
    # group 0: codes 0..3 once each (uniform over 4 -> perplexity 4); group 1: always code 5 (perplexity 1)
    meter.update(torch.tensor([[[0, 5], [1, 5]], [[2, 5], [3, 5]]]))
    stats = meter.compute()
    torch.testing.assert_close(stats["perplexity"], torch.tensor([4.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(stats["usage"], torch.tensor([0.5, 0.125], dtype=torch.float64))
    torch.testing.assert_close(stats["per_sample_usage"], torch.tensor([0.25, 0.125], dtype=torch.float64))
    assert stats["dead_codes"].tolist() == [4, 7]
    assert stats["num_positions"].tolist() == [4.0, 4.0]


# --------------------------------------------------------------------------------------------------------------
# Padding


def test_padding_is_ignored_everywhere():
    """A padded batch gives the same statistics as the same data with the padded positions removed."""
    groups, codebook_size = 3, 6
    generator = torch.Generator().manual_seed(5)
    indices, probs = make_batch(generator, (4, 6, groups), codebook_size, pad_fraction=0.4)
    padded = CodebookUsageMeter(groups, codebook_size)
    padded.update(indices, probs)
    assert torch.isnan(probs).any()  # the NaNs at padded positions must not leak
    stripped = CodebookUsageMeter(groups, codebook_size)
    for b in range(indices.shape[0]):
        keep = indices[b, :, 0] >= 0
        if keep.any():  # fully padded samples do not count as samples
            stripped.update(indices[b : b + 1, keep], probs[b : b + 1, keep])
    assert_stats_equal(padded.compute(), stripped.compute())
    assert_stats_equal(padded.compute(), naive_stats([(indices, probs)], groups, codebook_size))


def test_fully_padded_batch_changes_nothing():
    groups, codebook_size = 3, 6
    batches = layout_batches("sequence", groups, codebook_size, seed=6)
    meter = CodebookUsageMeter(groups, codebook_size)
    for batch in batches:
        meter.update(*batch)
    before = meter.compute()
    all_pad = torch.full((3, 4, 2, groups), -1)
    meter.update(all_pad, torch.full((3, 4, 2, groups, codebook_size), float("nan"), dtype=torch.float64))
    meter.update(all_pad)
    assert_stats_equal(meter.compute(), before)


def test_padding_only_meter_reports_empty_statistics():
    meter = CodebookUsageMeter(groups=2, codebook_size=5)
    meter.update(torch.full((2, 3, 2), -1), torch.rand(2, 3, 2, 5))
    assert_stats_equal(meter.compute(), naive_stats([], 2, 5))


def test_single_group_padding_ignores_only_that_entry():
    """``-1`` in one group of a position: counts, usage, dead codes and perplexity of that group ignore it."""
    groups, codebook_size = 3, 5
    generator = torch.Generator().manual_seed(7)
    indices = torch.randint(0, codebook_size, (4, 6, groups), generator=generator)
    indices[torch.rand(indices.shape, generator=generator) < 0.3] = -1
    indices[:, :, 2] = torch.where(indices[:, :, 2] == 4, -1, indices[:, :, 2])  # group 2 never shows code 4...
    indices[0, 0, 2] = -1  # ...and has at least one padded entry
    meter = CodebookUsageMeter(groups, codebook_size)
    meter.update(indices)
    stats, expected = meter.compute(), naive_stats([(indices, None)], groups, codebook_size)
    for key in ("usage", "perplexity", "dead_codes", "num_positions"):
        torch.testing.assert_close(stats[key].double(), expected[key].double(), msg=key)
    assert stats["dead_codes"][2] >= 1


# --------------------------------------------------------------------------------------------------------------
# Probabilities


def test_individual_perplexity_is_nan_without_probs():
    groups, codebook_size = 3, 6
    batches = [(indices, None) for indices, _ in layout_batches("image", groups, codebook_size, seed=8)]
    meter = CodebookUsageMeter(groups, codebook_size)
    for batch in batches:
        meter.update(*batch)
    stats = meter.compute()
    assert torch.isnan(stats["individual_perplexity"]).all()
    assert stats["individual_perplexity"].shape == (groups,)
    assert_stats_equal(stats, naive_stats(batches, groups, codebook_size))


def test_individual_perplexity_averages_only_updates_with_probs():
    groups, codebook_size = 3, 6
    batches = layout_batches("mixed", groups, codebook_size, seed=9)
    batches = [(indices, probs if i % 2 == 0 else None) for i, (indices, probs) in enumerate(batches)]
    meter = CodebookUsageMeter(groups, codebook_size)
    for batch in batches:
        meter.update(*batch)
    assert_stats_equal(meter.compute(), naive_stats(batches, groups, codebook_size))


def test_individual_perplexity_known_values():
    meter = CodebookUsageMeter(groups=1, codebook_size=4)
    onehot = [1.0, 0.0, 0.0, 0.0]
    uniform = [0.25, 0.25, 0.25, 0.25]
    probs = torch.tensor([[[onehot], [uniform], [uniform]]], dtype=torch.float64)  # (1, 3, 1, 4)
    meter.update(torch.tensor([[[0], [1], [-1]]]), probs)
    torch.testing.assert_close(meter.compute()["individual_perplexity"], torch.tensor([2.5], dtype=torch.float64))


def test_float32_probs_accepted():
    groups, codebook_size = 3, 6
    batches = layout_batches("sequence", groups, codebook_size, seed=10)
    meter = CodebookUsageMeter(groups, codebook_size)
    for indices, probs in batches:
        meter.update(indices, probs.float())
    expected = naive_stats([(i, p.float().double()) for i, p in batches], groups, codebook_size)
    assert_stats_equal(meter.compute(), expected)


# --------------------------------------------------------------------------------------------------------------
# State: empty meter, reset, compute() purity


def test_fresh_meter():
    groups, codebook_size = 3, 9
    stats = CodebookUsageMeter(groups, codebook_size).compute()
    assert_stats_equal(stats, naive_stats([], groups, codebook_size))
    assert stats["usage"].tolist() == [0.0] * groups
    assert stats["dead_codes"].tolist() == [codebook_size] * groups
    assert stats["num_positions"].tolist() == [0.0] * groups
    for key in ("per_sample_usage", "perplexity", "individual_perplexity"):
        assert torch.isnan(stats[key]).all(), key


def test_reset():
    groups, codebook_size = 3, 6
    first = layout_batches("sequence", groups, codebook_size, seed=11)
    second = layout_batches("image", groups, codebook_size, seed=12)
    meter = CodebookUsageMeter(groups, codebook_size)
    for batch in first:
        meter.update(*batch)
    meter.reset()
    assert_stats_equal(meter.compute(), naive_stats([], groups, codebook_size))
    for batch in second:
        meter.update(*batch)
    assert_stats_equal(meter.compute(), naive_stats(second, groups, codebook_size))


def test_compute_does_not_mutate_state():
    groups, codebook_size = 3, 6
    batches = layout_batches("mixed", groups, codebook_size, seed=13)
    meter = CodebookUsageMeter(groups, codebook_size)
    for batch in batches[:2]:
        meter.update(*batch)
    first = meter.compute()
    second = meter.compute()
    assert_stats_equal(second, first)
    assert_stats_equal(first, naive_stats(batches[:2], groups, codebook_size))
    for value in second.values():  # the results must not alias the accumulators
        value.add_(100)
    assert_stats_equal(meter.compute(), first)
    for batch in batches[2:]:
        meter.update(*batch)
    assert_stats_equal(meter.compute(), naive_stats(batches, groups, codebook_size))


# --------------------------------------------------------------------------------------------------------------
# Errors


BAD_UPDATES = {
    "wrong_groups": (lambda: (torch.zeros(2, 4, 2, dtype=torch.long), None), ValueError, r"shape \(B, \.\.\., G=3\)"),
    "too_many_groups": (lambda: (torch.zeros(2, 4, 4, dtype=torch.long), None), ValueError, r"G=3\), got \(2, 4, 4\)"),
    "one_dimensional": (
        lambda: (torch.zeros(3, dtype=torch.long), None),
        ValueError,
        r"must have shape \(B, \.\.\., G",
    ),
    "float_indices": (lambda: (torch.zeros(2, 4, 3), None), TypeError, r"integer codes, got torch\.float32"),
    "double_indices": (lambda: (torch.zeros(2, 4, 3, dtype=torch.float64), None), TypeError, r"integer codes"),
    "index_too_large": (
        lambda: (torch.tensor([[[0, 1, 2], [3, 6, 0]]]), None),
        ValueError,
        r"index is >= codebook_size=6",
    ),
    "probs_wrong_codebook": (
        lambda: (torch.zeros(2, 4, 3, dtype=torch.long), torch.rand(2, 4, 3, 5)),
        ValueError,
        r"probs must have shape \(2, 4, 3, 6\), got \(2, 4, 3, 5\)",
    ),
    "probs_missing_group_dim": (
        lambda: (torch.zeros(2, 4, 3, dtype=torch.long), torch.rand(2, 4, 6)),
        ValueError,
        r"probs must have shape \(2, 4, 3, 6\), got \(2, 4, 6\)",
    ),
    "probs_wrong_positions": (
        lambda: (torch.zeros(2, 4, 3, dtype=torch.long), torch.rand(2, 5, 3, 6)),
        ValueError,
        r"probs must have shape",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_update_rejects_bad_input(case):
    make, error, match = BAD_UPDATES[case]
    meter = CodebookUsageMeter(groups=3, codebook_size=6)
    with pytest.raises(error, match=match):
        meter.update(*make())


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_rejected_update_leaves_state_unchanged(case):
    """An update that raises must not have accumulated anything (a caller catching the error keeps clean stats)."""
    make, error, _ = BAD_UPDATES[case]
    groups, codebook_size = 3, 6
    batches = layout_batches("sequence", groups, codebook_size, seed=14)
    meter = CodebookUsageMeter(groups, codebook_size)
    for batch in batches:
        meter.update(*batch)
    with pytest.raises(error):
        meter.update(*make())
    assert_stats_equal(meter.compute(), naive_stats(batches, groups, codebook_size))


def test_empty_batch_is_a_no_op():
    """A batch with no samples (e.g. an empty last shard) adds nothing, like a batch of padding."""
    groups, codebook_size = 3, 6
    batches = layout_batches("sequence", groups, codebook_size, seed=15)
    meter = CodebookUsageMeter(groups, codebook_size)
    for batch in batches:
        meter.update(*batch)
    meter.update(torch.zeros(2, 0, groups, dtype=torch.long))
    meter.update(torch.zeros(0, 4, groups, dtype=torch.long), torch.rand(0, 4, groups, codebook_size))
    assert_stats_equal(meter.compute(), naive_stats(batches, groups, codebook_size))


# --------------------------------------------------------------------------------------------------------------
# Distributed


def _load_worker():
    spec = importlib.util.spec_from_file_location("usage_meter_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _from_json(stats: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor(value, dtype=torch.float64) for key, value in stats.items()}


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed + gloo")
def test_distributed_matches_single_process(tmp_path):
    worker = _load_worker()
    groups, codebook_size = worker.GROUPS, worker.CODEBOOK_SIZE
    shards = {rank: worker.shard_batches(rank) for rank in (0, 1)}

    # The shards are as the worker promises: each rank uses codes the other never uses, and unequal amounts.
    codes = {rank: {int(c) for indices, _ in shards[rank] for c in indices[indices >= 0].tolist()} for rank in shards}
    assert codes[0] - codes[1] and codes[1] - codes[0]
    assert len(shards[1]) > len(shards[0])

    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(WORKER), str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"torchrun failed\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 for r in reports)

    everything = shards[0] + shards[1]
    single = CodebookUsageMeter(groups, codebook_size)
    for batch in everything:
        single.update(*batch)
    rank1_meter = CodebookUsageMeter(groups, codebook_size)
    for batch in shards[1]:
        rank1_meter.update(*batch)
    expected = {
        "full": single.compute(),
        "full_again": single.compute(),
        "rank1_only": rank1_meter.compute(),
        "never_updated": CodebookUsageMeter(groups, codebook_size).compute(),
    }
    naive = {
        "full": naive_stats(everything, groups, codebook_size),
        "rank1_only": naive_stats(shards[1], groups, codebook_size),
        "never_updated": naive_stats([], groups, codebook_size),
    }
    for name in ("full", "full_again", "rank1_only", "never_updated"):
        rank0, rank1 = _from_json(reports[0][name]), _from_json(reports[1][name])
        assert_stats_equal(rank0, rank1)  # identical on both ranks
        assert_stats_equal(rank0, expected[name])
        assert_stats_equal(rank0, naive[name.removesuffix("_again")])
    # the union of the ranks' codes is used; codes neither rank draws stay dead
    assert (_from_json(reports[0]["full"])["dead_codes"] >= codebook_size - 12).all()
    assert (_from_json(reports[0]["full"])["usage"] > _from_json(reports[0]["rank1_only"])["usage"]).all()


def test_padding_in_one_group_only_removes_that_group():
    """Per-group semantics: a -1 in group 1 leaves group 0's statistics untouched, and vice versa."""
    indices = torch.tensor([[[0, -1], [1, -1]], [[2, 3], [2, -1]]])  # (B=2, T=2, G=2)
    probs = torch.full((2, 2, 2, 4), 0.25)
    probs[..., 1, :] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # group 1: onehot, perplexity 1
    meter = CodebookUsageMeter(groups=2, codebook_size=4)
    meter.update(indices, probs=probs)
    stats = meter.compute()
    assert stats["num_positions"].tolist() == [4.0, 1.0]
    assert stats["usage"].tolist() == [0.75, 0.25]
    # group 0: samples use {0,1} and {2} -> (2/4 + 1/4)/2; group 1: only sample 1 has a code -> 1/4
    assert torch.allclose(stats["per_sample_usage"], torch.tensor([0.375, 0.25], dtype=torch.float64))
    assert torch.allclose(stats["individual_perplexity"], torch.tensor([4.0, 1.0], dtype=torch.float64))
    assert stats["perplexity"][1].item() == pytest.approx(1.0)


def test_group_never_seen_reports_nan_perplexity():
    meter = CodebookUsageMeter(groups=2, codebook_size=4)
    meter.update(torch.tensor([[[0, -1], [1, -1]]]))
    stats = meter.compute()
    assert not torch.isnan(stats["perplexity"][0]) and torch.isnan(stats["perplexity"][1])
    assert torch.isnan(stats["per_sample_usage"][1]) and stats["usage"][1].item() == 0.0
