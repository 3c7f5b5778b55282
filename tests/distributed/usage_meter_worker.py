"""Worker for ``tests/test_metrics.py::test_distributed_matches_single_process`` (run by torchrun, not by pytest).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/distributed/usage_meter_worker.py OUTDIR``.

Every rank builds the same deterministic global data set (:func:`shard_batches` for each rank), feeds only its own
shard to a :class:`~simplexvq.CodebookUsageMeter` over gloo, calls ``compute()`` and writes the statistics to
``OUTDIR/rank{r}.json``. The shards differ on purpose: rank 0 draws codes from ``[0, 8)``, rank 1 from ``[4, 12)``
(so each rank uses codes the other never sees, and codes ``[12, 16)`` stay dead), and rank 1 gets one extra batch of
another shape, so the ranks hold unequal numbers of samples and positions. Three meters are computed, in the same
order on every rank:

* ``"full"``: each rank updates with its shard;
* ``"rank1_only"``: only rank 1 updates (rank 0 has seen no data at all);
* ``"never_updated"``: no rank updates.

The test imports this file as a module to rebuild the same data for its single-process reference.
"""

from __future__ import annotations

import json
import os
import sys

import torch

GROUPS = 3
CODEBOOK_SIZE = 16
CODE_RANGES = {0: (0, 8), 1: (4, 12)}


def _batch(
    generator: torch.Generator, shape: tuple[int, ...], low: int, high: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random codes in [low, high) of ``shape`` (B, ..., G) with whole padded positions and one fully padded sample,
    plus probabilities (B, ..., G, M) (NaN at padded positions, which must be ignored)."""
    indices = torch.randint(low, high, shape, generator=generator)
    positions = indices[..., 0]
    pad = torch.rand(positions.shape, generator=generator) < 0.25
    pad[-1] = True  # the last sample is padding only
    indices[pad] = -1
    logits = 3.0 * torch.randn(*shape, CODEBOOK_SIZE, generator=generator, dtype=torch.float64)
    probs = logits.softmax(dim=-1)
    probs[pad] = float("nan")
    return indices, probs


def shard_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The deterministic batches of ``rank``'s shard; the global data set is the shard of rank 0 then rank 1."""
    generator = torch.Generator().manual_seed(1234 + rank)
    low, high = CODE_RANGES[rank]
    batches = [
        _batch(generator, (3, 5, GROUPS), low, high),
        _batch(generator, (2, 7, GROUPS), low, high),
    ]
    if rank == 1:
        batches.append(_batch(generator, (4, 2, 3, GROUPS), low, high))
    return batches


def _to_json(stats: dict[str, torch.Tensor]) -> dict[str, list]:
    """Nested lists of floats, keeping each statistic's shape ((G,) or (G, M) for ``counts``)."""
    return {key: value.cpu().double().tolist() for key, value in stats.items()}


def main() -> None:
    import torch.distributed as dist

    from simplexvq import CodebookUsageMeter

    outdir = sys.argv[1]
    dist.init_process_group("gloo")
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        full = CodebookUsageMeter(GROUPS, CODEBOOK_SIZE)
        rank1_only = CodebookUsageMeter(GROUPS, CODEBOOK_SIZE)
        never_updated = CodebookUsageMeter(GROUPS, CODEBOOK_SIZE)
        for indices, probs in shard_batches(rank):
            full.update(indices, probs)
            if rank == 1:
                rank1_only.update(indices, probs)
        result = {
            "rank": rank,
            "world_size": world_size,
            "full": _to_json(full.compute()),
            "rank1_only": _to_json(rank1_only.compute()),
            "never_updated": _to_json(never_updated.compute()),
        }
        # compute() must not have reduced into the local state: a second call gives the same.
        result["full_again"] = _to_json(full.compute())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    path = os.path.join(outdir, f"rank{rank}.json")
    with open(path, "w") as f:
        json.dump(result, f, allow_nan=True)


if __name__ == "__main__":
    main()
