"""Worker for ``tests/test_knn_scale.py::test_global_knn_matches_single_process`` (run by torchrun, not by pytest).

Usage: ``torchrun --standalone --nproc_per_node 2 tests/distributed/global_knn_worker.py OUTDIR``.

Every rank rebuilds the same deterministic global data, keeps its own shard, runs each scenario with
``scope="global"`` / ``knn_scope="global"`` over gloo and writes ``OUTDIR/rank{r}.json`` with, per scenario, the
reported loss, the parameter gradients after DDP-style averaging over ranks and the gradient of its own inputs.
The test imports this file to rebuild the same data and computes the single-process references on the
concatenated batch.

* ``FUNCTIONAL``: ``knn_loss_scaled`` on ``log_softmax(z P)`` with a shared parameter P; the gradient of P is
  averaged over ranks by hand (``all_reduce`` / W), as DDP does. Shards are uneven, one rank may hold fewer rows
  than K, or none.
* ``QUANTIZER``: a :class:`~simplexvq.ProductQuantizer` wrapped in ``DistributedDataParallel`` (gradients averaged
  by DDP itself), dense or memory-efficient; one rank may get only padding or an empty batch.
  The ``*-reference`` and ``*-triton`` scenarios run the streamed layer on those backends (the Triton backend on
  the real kernels in Triton's interpreter when ``simplexvq.scale.triton`` can run, else on the fake kernels of
  ``tests/fake_triton_kernels.py``); their single-process reference is the reference backend.
* ``ERRORS``: K larger than the global number of rows must raise the same error on every rank (no hang).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import torch

GROUPS, CODEBOOK_SIZE, FEATURES = 2, 5, 3
DIM = 8  # quantizer input features (2 groups of 4)
FUNCTIONAL: dict[str, dict] = {
    "uneven-ce": {"sizes": (7, 5), "k": 3, "distance": "ce", "chunk_size": None},
    "uneven-l2-streamed": {"sizes": (7, 5), "k": 3, "distance": "l2", "chunk_size": 2},
    "small-rank-ce": {"sizes": (2, 6), "k": 3, "distance": "ce", "chunk_size": None},
    "small-rank-l2-streamed": {"sizes": (6, 1), "k": 4, "distance": "l2", "chunk_size": 1},
    "empty-rank-ce": {"sizes": (0, 6), "k": 3, "distance": "ce", "chunk_size": None},
    "empty-rank-ce-streamed": {"sizes": (6, 0), "k": 3, "distance": "ce", "chunk_size": 4},
    "empty-rank-l2": {"sizes": (0, 5), "k": 2, "distance": "l2", "chunk_size": None},
    "k-equals-global-n": {"sizes": (2, 3), "k": 5, "distance": "ce", "chunk_size": None},
    "vertex-subset": {"sizes": (5, 4), "k": 2, "distance": "l2", "chunk_size": 3, "vertices": [[0, 3], [1, 4]]},
}
QUANTIZER: dict[str, dict] = {
    "dense-ce": {"shapes": ((2, 3), (1, 5)), "pad": "some", "config": {"regularizer": "knn_ce"}},
    "dense-l2-gumbel": {
        "shapes": ((2, 3), (1, 5)),
        "pad": "some",
        "config": {"method": "hard_gumbel", "regularizer": "knn_l2"},
    },
    "efficient-ce": {
        "shapes": ((2, 3), (1, 5)),
        "pad": "some",
        "config": {"regularizer": "knn_ce", "memory_efficient": True, "chunk_size": 2},
    },
    "efficient-l2-euclid": {
        "shapes": ((1, 2), (2, 4)),
        "pad": "some",
        "config": {"regularizer": "knn_l2", "memory_efficient": True, "chunk_size": 3, "distance": "euclid"},
    },
    "dense-rank0-all-padding": {"shapes": ((2, 3), (2, 4)), "pad": "rank0", "config": {"regularizer": "knn_ce"}},
    "efficient-rank0-empty": {
        "shapes": ((0, 3), (2, 4)),
        "pad": "some",
        "config": {"regularizer": "knn_ce", "memory_efficient": True, "chunk_size": 2},
    },
    "efficient-vertex-subsample": {
        "shapes": ((2, 3), (2, 4)),
        "pad": "some",
        "config": {"regularizer": "knn_ce", "memory_efficient": True, "vertex_subsample": 2},
    },
}
STREAMED = {"regularizer": "knn_ce", "memory_efficient": True, "chunk_size": 2}
for _backend in ("reference", "triton"):
    QUANTIZER |= {
        f"efficient-ce-{_backend}": {
            "shapes": ((2, 3), (1, 5)),
            "pad": "some",
            "config": {**STREAMED, "backend": _backend},
        },
        f"efficient-l2-euclid-subsample-{_backend}": {
            "shapes": ((1, 2), (2, 4)),
            "pad": "some",
            "config": {
                **STREAMED,
                "regularizer": "knn_l2",
                "distance": "euclid",
                "vertex_subsample": 3,
                "backend": _backend,
            },
        },
        f"efficient-rank0-all-padding-{_backend}": {
            "shapes": ((2, 3), (2, 4)),
            "pad": "rank0",
            "config": {**STREAMED, "backend": _backend},
        },
    }
ERRORS: dict[str, dict] = {"k-above-global-n": {"sizes": (1, 2), "k": 4, "distance": "ce", "chunk_size": None}}
QUANTIZER_K = 3
SUBSAMPLE_SEED = 100


# --------------------------------------------------------------------------------------------------------------
# Deterministic data, shared with the test
# --------------------------------------------------------------------------------------------------------------


def functional_data(name: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The whole batch ``z`` (N0 + N1, G, F), the shared parameter ``P`` (G, F, M) and the shard sizes."""
    case = {**FUNCTIONAL, **ERRORS}[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    sizes = case["sizes"]
    z = torch.randn(sum(sizes), GROUPS, FEATURES, generator=generator, dtype=torch.float64)
    weight = 2.0 * torch.randn(GROUPS, FEATURES, CODEBOOK_SIZE, generator=generator, dtype=torch.float64)
    return z, weight, sizes


def functional_loss(name: str, z: torch.Tensor, weight: torch.Tensor, scope: str) -> torch.Tensor:
    from simplexvq.scale.knn_loss import knn_loss_scaled

    case = {**FUNCTIONAL, **ERRORS}[name]
    log_probs = torch.log_softmax(torch.einsum("ngf,gfm->ngm", z, weight), dim=-1)
    vertices = case.get("vertices")
    return knn_loss_scaled(
        log_probs,
        case["k"],
        case["distance"],
        scope=scope,
        chunk_size=case["chunk_size"],
        vertices=None if vertices is None else torch.tensor(vertices),
    )


def quantizer_shards(name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per rank: input ``z`` (B, T, DIM) and ``padding_mask`` (B, T)."""
    case = QUANTIZER[name]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    shards = []
    for rank, shape in enumerate(case["shapes"]):
        z = torch.randn(*shape, DIM, generator=generator, dtype=torch.float64)
        pad = torch.rand(shape, generator=generator) < 0.3
        if pad.numel():
            pad.view(-1)[0] = False  # at least one real position
        if case["pad"] == "rank0" and rank == 0:
            pad[:] = True
        shards.append((z, pad))
    return shards


def build_quantizer(name: str, scope: str):
    """The scenario's quantizer; the single-process one (``scope="local"``) runs the reference backend where the
    scenario names the Triton backend."""
    import simplexvq

    case = QUANTIZER[name]
    config = simplexvq.QuantizerConfig(
        dim=DIM, groups=GROUPS, codebook_size=CODEBOOK_SIZE, knn_k=QUANTIZER_K, **case["config"]
    )
    if scope == "local" and config.backend == "triton":
        config = dataclasses.replace(config, backend="reference")
    torch.manual_seed(0)
    return simplexvq.ProductQuantizer(dataclasses.replace(config, knn_scope=scope)).double()


def use_available_triton_kernels() -> None:
    """The Triton backend's kernels: the real ones in the interpreter when they can run, else the fake ones."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from simplexvq.scale.backends import triton_backend

    try:
        kernels = importlib.import_module("simplexvq.scale.triton")
        usable = kernels.triton_available()[0]
    except ImportError:
        usable = False
    if not usable:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        kernels = importlib.import_module("fake_triton_kernels")
    triton_backend.load_triton_kernels = lambda: kernels


def _listed(x: torch.Tensor | None) -> list[float] | None:
    return None if x is None else [float(v) for v in x.detach().reshape(-1).tolist()]


# --------------------------------------------------------------------------------------------------------------
# The distributed run
# --------------------------------------------------------------------------------------------------------------


def _run_functional(name: str, rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    z, weight, sizes = functional_data(name)
    start = sum(sizes[:rank])
    z_local = z[start : start + sizes[rank]].clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    loss = functional_loss(name, z_local, weight, "global")
    loss.backward()
    grad = weight.grad.clone()
    dist.all_reduce(grad)  # what DDP does with a parameter's gradient: average over ranks
    return {"loss": float(loss.detach()), "weight_grad": _listed(grad / world_size), "z_grad": _listed(z_local.grad)}


def _run_quantizer(name: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    quantizer = build_quantizer(name, "global")
    model = DistributedDataParallel(quantizer)
    z, pad = quantizer_shards(name)[rank]
    z = z.clone().requires_grad_(True)
    torch.manual_seed(SUBSAMPLE_SEED + rank)  # vertex subsets differ per rank unless rank 0's is broadcast
    out = model(z, pad)
    out.loss.backward()
    return {
        "loss": float(out.loss.detach()),
        "grads": {n: _listed(p.grad) for n, p in quantizer.named_parameters()},
        "z_grad": _listed(z.grad),
        "valid_rows": int((~pad).sum()),
        "fell_back": bool(getattr(quantizer.streamed_backend, "fell_back", False)),
    }


def main() -> None:
    import torch.distributed as dist

    outdir = sys.argv[1]
    use_available_triton_kernels()
    dist.init_process_group("gloo")
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        result: dict = {"rank": rank, "world_size": world_size, "functional": {}, "quantizer": {}, "errors": {}}
        for name in FUNCTIONAL:
            result["functional"][name] = _run_functional(name, rank, world_size)
        for name in QUANTIZER:
            result["quantizer"][name] = _run_quantizer(name, rank)
        for name in ERRORS:
            try:
                _run_functional(name, rank, world_size)
                result["errors"][name] = None
            except ValueError as error:
                result["errors"][name] = str(error)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
