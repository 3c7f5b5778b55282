"""Overhead of the KNN-CE term over the bare softmax quantizer, and distance of the layer from its matmul floor.

For each size, four layers are timed side by side in one process, round-robin (so that load from other processes
hits them alike): ``softmax-none`` and ``softmax-knn_ce``, dense and memory-efficient. The *floor* is the time of
the six matrix products no implementation can avoid (forward ``z Q^T`` and ``P Q``; backward ``dO Q^T``, ``P^T dO``,
``dL Q`` and ``dL^T z``), timed in the same round-robin; the ratio layer / floor says how much of the layer is
anything else (softmax, top-K, statistics, memory traffic). Also timed: the smoothed output alone through
``scaled_dot_product_attention`` (``soft_quantize``, PyTorch's fused flash kernel on CPU). Median CPU seconds over
the repeats (1 thread).

``--baseline REV`` adds the memory-efficient layers of the library as it was at git revision ``REV`` (imported
side by side, :func:`_harness.load_baseline`) to the same round-robin, and ``--backends`` the memory-efficient
KNN-CE layer on the ``reference`` backend (the other layers use ``auto``, i.e. ``cpu`` here), so that old and new
code, or two backends, are compared under the same load.

    .venv/bin/python benchmarks/bench_overhead.py
    .venv/bin/python benchmarks/bench_overhead.py --size 16384,1024,64 --baseline 86ebd39 --backends

``--count-ops`` instead counts the aten ops of one training step, and those that would sync a GPU, for the dense
layer and the memory-efficient one on each backend (the Triton backend only where its kernels can run), at each
size (:func:`_harness.count_ops`).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from collections.abc import Callable

import torch
from _harness import (
    Layer,
    build_layer,
    count_ops,
    environment,
    load_baseline,
    paired_ratio,
    round_robin,
    save,
    table,
    train_step,
)

from simplexvq.scale import soft_quantize

SIZES = ((16384, 1024, 64), (16384, 1024, 256), (16384, 8196, 64), (65536, 1024, 128))
LAYERS = ("softmax-none", "softmax-knn_ce", "softmax-none-efficient", "softmax-knn_ce-efficient")


def matmul_floor(n: int, m: int, d: int) -> Callable[[], None]:
    """The six unavoidable products of a softmax quantizer's forward+backward, on random operands.

    Computed in row blocks of at most 2**26 logits so the floor itself fits in memory; each block is a full-width
    matrix product, as large as the layer's own.
    """
    z, dz = torch.randn(n, d), torch.randn(n, d)
    codebook = torch.randn(m, d)
    rows = max(1, min(n, (1 << 26) // m))
    probs = torch.randn(rows, m)

    def run() -> None:
        for start in range(0, n, rows):
            block = slice(start, min(start + rows, n))
            p = probs[: block.stop - block.start]
            torch.mm(z[block], codebook.t())  # logits
            torch.mm(p, codebook)  # P Q
            torch.mm(dz[block], codebook.t())  # dP = dO Q^T
            torch.mm(p.t(), dz[block])  # dV = P^T dO
            torch.mm(p, codebook)  # dz = dL Q
            torch.mm(p.t(), z[block])  # dQ = dL^T z

    return run


def training_steps(layer: Layer, n: int, d: int, same_batch: bool) -> Callable[[], None]:
    """One training step per call, as in training: a new batch (drawn ahead, copied into the input), forward +
    backward, then an Adam step (lr 1e-3) on the layer's parameters. The KNN-CE search carries a ceiling from step
    to step (``simplexvq.scale.backends.ceiling``); new batches and moving parameters keep it honest.
    ``same_batch``: the batch and the parameters never change (the measurement before the ceiling existed)."""
    if same_batch:
        return lambda: train_step(layer)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(layer.inputs.shape, generator=generator) for _ in range(4)]
    optimizer = torch.optim.Adam(layer.module.parameters(), lr=1e-3)
    count = itertools.count()

    def run() -> None:
        with torch.no_grad():
            layer.inputs.copy_(batches[next(count) % len(batches)])
        train_step(layer)
        optimizer.step()

    return run


def sdpa_output(n: int, m: int, d: int) -> Callable[[], None]:
    """Forward+backward of the smoothed output alone through ``scaled_dot_product_attention``
    (:func:`simplexvq.scale.soft_quantize`): no statistics, no regularizer."""
    z = torch.randn(n, 1, d, requires_grad=True)
    codebook = (torch.randn(1, m, d) * d**-0.5).requires_grad_(True)
    temperature = torch.full((1,), 0.1, requires_grad=True)
    upstream = torch.randn(n, 1, d)

    def run() -> None:
        (soft_quantize(z, codebook, temperature) * upstream).sum().backward()

    return run


def count_all_ops(sizes: list[tuple[int, int, int]], args: argparse.Namespace) -> None:
    """Ops and syncing ops of one training step per layer and size (see :func:`_harness.count_ops`)."""
    import importlib

    try:
        triton_ready = importlib.import_module("simplexvq.scale.triton").triton_available()[0]
    except ImportError:
        triton_ready = False
    variants = {
        "dense softmax-knn_ce": {"layer": "softmax-knn_ce"},
        **{
            f"efficient softmax-knn_ce [{backend}]": {"layer": "softmax-knn_ce-efficient", "backend": backend}
            for backend in ("cpu", "reference", "triton")
            if backend != "triton" or triton_ready
        },
    }
    results, rows = [], []
    for n, m, d in sizes:
        counts = {name: count_ops(build_layer({**case, "n": n, "m": m, "d": d})) for name, case in variants.items()}
        results.append({"n": n, "m": m, "d": d, "counts": counts})
        rows.append([n, m, d, *(f"{c['ops']} / {c['syncing']}" for c in counts.values())])
        print(n, m, d, counts)
    markdown = (
        "Aten ops / ops that sync a GPU, one training step (forward + backward, K = 8)"
        + ("" if triton_ready else "; the Triton kernels cannot run here, so their row is missing")
        + ".\n\n"
        + table(["N", "M", "D", *variants], rows)
    )
    save(args.name, {"environment": environment(), "results": results}, markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--size", action="append", default=None, metavar="N,M,D", help="measure only these sizes (repeatable)"
    )
    parser.add_argument(
        "--same-batch", action="store_true", help="repeat one batch with frozen parameters (no new data, no Adam step)"
    )
    parser.add_argument("--name", default="overhead", help="results file name (benchmarks/results/NAME.json|md)")
    parser.add_argument("--baseline", metavar="REV", help="also time the efficient layers of git revision REV")
    parser.add_argument("--backends", action="store_true", help="also time efficient KNN-CE on the reference backend")
    parser.add_argument("--count-ops", action="store_true", help="count ops and syncing ops instead of timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.count_ops:
        count_all_ops([tuple(int(v) for v in size.split(",")) for size in args.size] if args.size else SIZES, args)
        return
    baseline = load_baseline(args.baseline) if args.baseline else None

    results = []
    sizes = [tuple(int(v) for v in size.split(",")) for size in args.size] if args.size else SIZES
    for n, m, d in sizes:
        layers = {name: build_layer({"layer": name, "n": n, "m": m, "d": d}) for name in LAYERS}
        if baseline:
            for name in ("softmax-none-efficient", "softmax-knn_ce-efficient"):
                case = {"layer": name, "n": n, "m": m, "d": d, "package": baseline}
                layers[f"{name} @{args.baseline}"] = build_layer(case)
        if args.backends:
            for backend in ("reference",):  # "auto" is "cpu" here: the layers above
                case = {"layer": "softmax-knn_ce-efficient", "n": n, "m": m, "d": d, "backend": backend}
                layers[f"softmax-knn_ce-efficient [{backend}]"] = build_layer(case)
        floor = matmul_floor(n, m, d)
        runners = {name: training_steps(layer, n, d, args.same_batch) for name, layer in layers.items()}
        runners["matmul floor"] = floor
        runners["sdpa output only"] = sdpa_output(n, m, d)
        for run in runners.values():  # warm-up
            run()
        cpu, wall = round_robin(runners, args.repeats)
        median = {name: statistics.median(values) for name, values in cpu.items()}
        result = {
            "n": n,
            "m": m,
            "d": d,
            "cpu_s": cpu,
            "wall_s": wall,
            "median_cpu_s": median,
            "knn_overhead_dense": median["softmax-knn_ce"] / median["softmax-none"] - 1.0,
            "knn_overhead_efficient": median["softmax-knn_ce-efficient"] / median["softmax-none-efficient"] - 1.0,
        }
        if baseline:  # per round, current / baseline: both ran within the same second, under the same load
            for name in ("softmax-none-efficient", "softmax-knn_ce-efficient"):
                result[f"ratio_to_baseline {name}"] = paired_ratio(cpu[name], cpu[f"{name} @{args.baseline}"])
        results.append(result)
        print(result["n"], result["m"], result["d"], median)
        del layers, runners

    rows = []
    for r in results:
        med = r["median_cpu_s"]
        floor = med["matmul floor"]
        rows.append(
            [
                r["n"],
                r["m"],
                r["d"],
                f"{floor:.2f}",
                f"{med['softmax-none']:.2f} ({med['softmax-none'] / floor:.1f}x)",
                f"{med['softmax-knn_ce']:.2f} ({med['softmax-knn_ce'] / floor:.1f}x)",
                f"{100 * r['knn_overhead_dense']:+.0f}%",
                f"{med['softmax-none-efficient']:.2f} ({med['softmax-none-efficient'] / floor:.1f}x)",
                f"{med['softmax-knn_ce-efficient']:.2f} ({med['softmax-knn_ce-efficient'] / floor:.1f}x)",
                f"{100 * r['knn_overhead_efficient']:+.0f}%",
                f"{med['sdpa output only']:.2f} ({med['sdpa output only'] / floor:.1f}x)",
            ]
        )
    markdown = (
        f"Median CPU seconds of one training step over {args.repeats} round-robin repeats ({args.threads} thread; "
        + ("one batch repeated, parameters frozen" if args.same_batch else "a new batch and an Adam step each time")
        + "); in parentheses the ratio to the matmul floor.\n\n"
        + table(
            [
                "N",
                "M",
                "D",
                "matmul floor",
                "dense softmax-none",
                "dense softmax-knn_ce",
                "KNN overhead (dense)",
                "efficient softmax-none",
                "efficient softmax-knn_ce",
                "KNN overhead (efficient)",
                "SDPA output only",
            ],
            rows,
        )
    )
    if baseline or args.backends:
        extra = [name for name in results[0]["median_cpu_s"] if "@" in name or "[" in name]
        markdown += "\n\nSide by side (median CPU seconds; ratio = current / baseline, median over rounds):\n\n"
        markdown += table(
            ["N", "M", "D", *extra, *(key for key in results[0] if key.startswith("ratio_to_baseline"))],
            [
                [r["n"], r["m"], r["d"], *(f"{r['median_cpu_s'][name]:.2f}" for name in extra)]
                + [f"{r[key]:.3f}" for key in r if key.startswith("ratio_to_baseline")]
                for r in results
            ],
        )
    record = {"environment": environment(), "repeats": args.repeats, "same_batch": args.same_batch, "results": results}
    save(args.name, record, markdown)


if __name__ == "__main__":
    main()
