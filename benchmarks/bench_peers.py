"""Our quantizers next to the peers, at equal N, M, D, in one run (issue 4, part 3).

Layers: our ``softmax-knn_ce`` (dense and memory-efficient), our ``ste-euclid`` and ``rotation-euclid`` baselines,
``vector_quantize_pytorch.VectorQuantize`` with its defaults (rotation trick, EMA codebook updates) and fairseq2's
``GumbelWav2Vec2VectorQuantizer`` (hard Gumbel-softmax with straight-through, plus wav2vec 2.0's diversity loss;
its ``torch.compile``d lookup is warmed up first). One forward+backward each; time is the median CPU time over
round-robin repeats in one process (1 thread); memory is the peak RSS of a fresh process per layer.

    .venv/bin/pip install vector-quantize-pytorch   # not a dependency of simplexvq
    .venv/bin/python benchmarks/bench_peers.py
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _harness import build_layer, environment, fmt_mib, measure_in_subprocess, round_robin, save, table, train_step

SIZES = ((16384, 1024, 64), (16384, 8196, 64))
LAYERS = (
    "softmax-knn_ce",
    "softmax-knn_ce-efficient",
    "ste-euclid",
    "rotation-euclid",
    "vector-quantize-pytorch",
    "fairseq2-gumbel",
)
REFERENCE = "softmax-knn_ce-efficient"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = []
    for n, m, d in SIZES:
        memory = {
            name: measure_in_subprocess(
                {"layer": name, "n": n, "m": m, "d": d, "threads": args.threads, "repeats": 1, "warmup": 1}
            )
            for name in LAYERS
        }
        layers = {name: build_layer({"layer": name, "n": n, "m": m, "d": d}) for name in LAYERS}
        for layer in layers.values():  # warm-up (fairseq2 compiles its lookup on the first call)
            train_step(layer)
            train_step(layer)
        runners = {name: (lambda layer=layer: train_step(layer)) for name, layer in layers.items()}
        cpu, wall = round_robin(runners, args.repeats)
        median = {name: statistics.median(values) for name, values in cpu.items()}
        results.append({"n": n, "m": m, "d": d, "cpu_s": cpu, "wall_s": wall, "median_cpu_s": median, "memory": memory})
        print(n, m, d, median)
        del layers

    rows = []
    for r in results:
        reference_time = r["median_cpu_s"][REFERENCE]
        reference_memory = r["memory"][REFERENCE]["step_rss_mib"]
        for name in LAYERS:
            mem = r["memory"][name]
            step = mem.get("step_rss_mib")
            rows.append(
                [
                    f"{r['n']} x {r['m']} x {r['d']}",
                    name,
                    f"{r['median_cpu_s'][name]:.3f}",
                    f"{r['median_cpu_s'][name] / reference_time:.2f}",
                    fmt_mib(mem.get("peak_rss_mib")),
                    fmt_mib(mem.get("step_rss_mib")),
                    f"{step / reference_memory:.1f}" if step is not None and reference_memory else "-",
                ]
            )
    markdown = (
        f"One forward+backward at equal N x M x D (G = 1, K = 8 for KNN). Time: median CPU seconds over "
        f"{args.repeats} round-robin repeats in one process ({args.threads} thread). Memory: peak RSS of a fresh "
        "process, and its growth during the step (peak minus the RSS after building the layer and its input). "
        f"Ratios are to `{REFERENCE}`.\n\n"
        + table(
            [
                "N x M x D",
                "layer",
                "time (s)",
                "time ratio",
                "peak RSS",
                "step memory",
                "step memory ratio",
            ],
            rows,
        )
    )
    save("peers", {"environment": environment(), "repeats": args.repeats, "results": results}, markdown)


if __name__ == "__main__":
    main()
