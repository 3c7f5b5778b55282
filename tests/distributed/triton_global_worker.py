"""Worker for ``tests/test_triton_backend.py::test_global_scope_matches_single_process`` (run by torchrun).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/distributed/triton_global_worker.py OUTDIR``.

Every rank rebuilds the same deterministic data, keeps its shard (with padding rows marked by ``valid``), runs
:func:`simplexvq.scale.triton.triton_streamed_softmax_quantize` with ``scope="global"`` over gloo in Triton's
interpreter, and writes ``OUTDIR/rank{r}.json``: the loss, the smoothed output, the gradient of the KNN loss with
respect to its own rows, and the codebook and temperature gradients averaged over ranks (as DDP does). The test
imports this file to rebuild the data and compares with the dense single-process computation.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

GROUPS, CODEBOOK_SIZE, DIM = 2, 19, 4
SCENARIOS: dict[str, dict] = {
    "cosine-ce-padding": {"sizes": (9, 6), "k": 3, "knn_distance": "ce", "distance": "cosine"},
    "euclid-l2-subset": {"sizes": (7, 5), "k": 2, "knn_distance": "l2", "distance": "euclid", "vertices": [1, 4, 7]},
    "empty-rank-ce": {"sizes": (0, 8), "k": 4, "knn_distance": "ce", "distance": "cosine"},
}


def scenario_data(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The whole batch ``z`` (N, G, d), ``valid`` (N,), the codebook, the temperature and the shard sizes."""
    case = SCENARIOS[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    sizes = case["sizes"]
    z = torch.randn(sum(sizes), GROUPS, DIM, generator=generator, dtype=torch.float64)
    valid = torch.rand(sum(sizes), generator=generator) > 0.25
    codebook = torch.randn(GROUPS, CODEBOOK_SIZE, DIM, generator=generator, dtype=torch.float64)
    temperature = 0.4 + torch.rand(GROUPS, generator=generator, dtype=torch.float64)
    return z, valid, codebook, temperature, sizes


def _listed(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.detach().reshape(-1).tolist()]


def _run(name: str, rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from simplexvq.scale.triton import triton_streamed_softmax_quantize

    case = SCENARIOS[name]
    z, valid, codebook, temperature, sizes = scenario_data(name)
    start = sum(sizes[:rank])
    z_local = z[start : start + sizes[rank]].clone().requires_grad_(True)
    valid_local = valid[start : start + sizes[rank]].clone()
    codebook = codebook.clone().requires_grad_(True)
    temperature = temperature.clone().requires_grad_(True)
    vertices = case.get("vertices")
    result = triton_streamed_softmax_quantize(
        z_local,
        codebook,
        temperature,
        distance=case["distance"],
        knn_k=case["k"],
        knn_distance=case["knn_distance"],
        scope="global",
        vertices=None if vertices is None else torch.tensor(vertices),
        valid=valid_local,
    )
    result.knn_loss.backward()
    grads = {}
    for label, tensor in (("codebook", codebook), ("temperature", temperature)):
        grad = tensor.grad.clone()
        dist.all_reduce(grad)
        grads[label] = _listed(grad / world_size)
    return {
        "loss": float(result.knn_loss.detach()),
        "quantized": _listed(result.quantized),
        "indices": [int(v) for v in result.indices.reshape(-1).tolist()],
        "z_grad": _listed(z_local.grad),
        "grads": grads,
    }


def main() -> None:
    import torch.distributed as dist

    outdir = sys.argv[1]
    dist.init_process_group("gloo")
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        report = {
            "rank": rank,
            "world_size": world_size,
            "scenarios": {n: _run(n, rank, world_size) for n in SCENARIOS},
        }
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main()
