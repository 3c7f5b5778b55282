"""Peak memory and time of one forward+backward of the quantizer layer: dense vs memory-efficient (issue 4, part 3).

Sizes: the paper's latent pixels per device (N = 16x16x64 = 16384 and 64x64x16 = 65536), its codebooks (M = 1024
and 8196) and D = 32..256, then M = 16384, 32768 and 65536 (N = 65536, D = 64). Layer: ``softmax-knn_ce`` (one
group, K = 8), dense (``memory_efficient=False``, the paper's computation) and streamed (``memory_efficient=True``).
Every case runs in a fresh subprocess; memory is the peak RSS (``ru_maxrss``) of that process. The dense path is
only run where its predicted peak fits ``--dense-budget-gib``; elsewhere its requirement is computed from the
measured bytes per N x M element of the dense runs (and the size of one N x M float32 tensor is given).

    .venv/bin/python benchmarks/bench_memory.py            # full grid (long: the largest case is 4.3e9 logits)
    .venv/bin/python benchmarks/bench_memory.py --quick    # N = 16384 only
"""

from __future__ import annotations

import argparse
import itertools
import json

from _harness import RESULTS_DIR, dense_softmax_bytes, environment, fmt_mib, measure_in_subprocess, save, table

PAPER_N = (16 * 16 * 64, 64 * 64 * 16)
PAPER_M = (1024, 8196)
PAPER_D = (32, 64, 128, 256)
LARGE_M = (16384, 32768, 65536)
LARGE_N, LARGE_D = 65536, 64


def repeats_for(n: int, m: int) -> dict:
    elements = n * m
    if elements <= 1 << 27:
        return {"repeats": 3, "warmup": 1}
    if elements <= 1 << 30:
        return {"repeats": 2, "warmup": 0}
    return {"repeats": 1, "warmup": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dense-budget-gib", type=float, default=6.0)
    parser.add_argument("--quick", action="store_true", help="N = 16384 only, no large M")
    parser.add_argument("--from-json", action="store_true", help="only re-render results/memory.json")
    args = parser.parse_args()
    if args.from_json:
        payload = json.loads((RESULTS_DIR / "memory.json").read_text())
        save("memory", payload, render(payload))
        return

    sizes = [(n, m, d) for n, m, d in itertools.product(PAPER_N, PAPER_M, PAPER_D)]
    if args.quick:
        sizes = [s for s in sizes if s[0] == PAPER_N[0]]
    else:
        sizes += [(LARGE_N, m, LARGE_D) for m in LARGE_M]
    sizes.sort(key=lambda s: s[0] * s[1])

    results = []
    dense_bytes_per_element: list[float] = []  # measured step memory of the dense path per N*M element
    for n, m, d in sizes:
        base = {"n": n, "m": m, "d": d, "threads": args.threads, **repeats_for(n, m)}
        efficient = measure_in_subprocess({**base, "layer": "softmax-knn_ce-efficient"})
        per_element = max(dense_bytes_per_element) if dense_bytes_per_element else 48.0
        predicted = efficient.get("baseline_rss_mib", 600.0) + per_element * n * m / 1024.0**2
        dense = None
        if predicted <= args.dense_budget_gib * 1024:
            dense = measure_in_subprocess({**base, "layer": "softmax-knn_ce"})
            if "error" not in dense:
                dense_bytes_per_element.append(dense["step_rss_mib"] * 1024.0**2 / (n * m))
        results.append(
            {
                "n": n,
                "m": m,
                "d": d,
                "efficient": efficient,
                "dense": dense,
                "dense_predicted_peak_mib": predicted,
                "n_by_m_float32_mib": dense_softmax_bytes(n, m) / 1024.0**2,
            }
        )
        print(n, m, d, efficient.get("peak_rss_mib"), efficient.get("wall_s"), dense and dense.get("peak_rss_mib"))

    payload = {"environment": environment(), "threads": args.threads, "results": results}
    save("memory", payload, render(payload))


def fit_dense(results: list[dict]) -> tuple[float, float]:
    """Least-squares fit of the dense path's step memory (MiB) against N * M: (MiB per element, MiB)."""
    points = [
        (r["n"] * r["m"], r["dense"]["peak_rss_mib"] - r["dense"]["baseline_rss_mib"])
        for r in results
        if r["dense"] is not None and "error" not in r["dense"]
    ]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return slope, mean_y - slope * mean_x


def render(payload: dict) -> str:
    results = payload["results"]
    slope, intercept = fit_dense(results)
    rows = []
    for r in results:
        eff, dense = r["efficient"], r["dense"]
        ran = dense is not None and "error" not in dense
        if ran:
            dense_peak = fmt_mib(dense["peak_rss_mib"])
        else:
            predicted = eff["baseline_rss_mib"] + intercept + slope * r["n"] * r["m"]
            dense_peak = f"~{fmt_mib(predicted)} (fit, not run)"
        rows.append(
            [
                r["n"],
                r["m"],
                r["d"],
                fmt_mib(r["n_by_m_float32_mib"]),
                dense_peak,
                fmt_mib(eff["peak_rss_mib"]),
                f"{dense['wall_s']:.2f} / {dense['cpu_s']:.2f}" if ran else "-",
                f"{eff['wall_s']:.2f} / {eff['cpu_s']:.2f}",
                f"{dense['cpu_s'] / eff['cpu_s']:.2f}" if ran else "-",
            ]
        )
    return (
        "Forward+backward of `softmax-knn_ce` (G = 1, K = 8): peak RSS of a fresh process, median time (wall / CPU "
        f"seconds, {payload.get('threads', 1)} thread). Dense step memory, least-squares fit over the dense runs: "
        f"{slope * 1024**2:.1f} bytes per N x M logit (about {slope * 1024**2 / 4:.1f} float32 N x M tensors alive "
        f"at the peak) + {intercept:.0f} MiB; 'fit, not run' rows add it to the efficient run's baseline RSS.\n\n"
        + table(
            [
                "N",
                "M",
                "D",
                "one N x M fp32 tensor",
                "dense peak RSS",
                "efficient peak RSS",
                "dense time (s)",
                "efficient time (s)",
                "dense / efficient CPU time",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
