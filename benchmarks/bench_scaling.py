"""Scaling of time and memory with N, M and K: measured points and fitted exponents (issue 4, part 3).

Four values of N (M = 8196, D = 64), four of M (N = 16384, D = 64) and four of K (N = 16384, M = 8196, D = 64);
each case in a fresh process. Layers: ``softmax-knn_ce`` memory-efficient and dense. The exponent is the
least-squares slope of log(quantity) against log(N) (or M, K): for time, of the median CPU seconds; for memory, of
the step memory (peak RSS minus the RSS before the step).

    .venv/bin/python benchmarks/bench_scaling.py
"""

from __future__ import annotations

import argparse
import math

from _harness import environment, fmt_mib, measure_in_subprocess, save, table

AXES = {
    "N": {"values": (4096, 8192, 16384, 32768), "fixed": {"m": 8196, "d": 64}},
    "M": {"values": (2048, 4096, 8192, 16384), "fixed": {"n": 16384, "d": 64}},
    "K": {"values": (2, 8, 32, 128), "fixed": {"n": 16384, "m": 8196, "d": 64}},
}
LAYERS = ("softmax-knn_ce-efficient", "softmax-knn_ce")
DENSE_BYTES_PER_ELEMENT = 28  # measured by bench_memory.py (about 7 float32 N x M tensors at the peak)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-budget", type=float, default=6 * 1024.0**3, help="bytes; dense points above skip")
    args = parser.parse_args()

    results = {}
    sections = []
    for axis, spec in AXES.items():
        key = {"N": "n", "M": "m", "K": "k"}[axis]
        rows, fits = [], {}
        for layer in LAYERS:
            points = []
            for value in spec["values"]:
                case = {"layer": layer, **spec["fixed"], key: value, "threads": args.threads, "repeats": args.repeats}
                if layer == "softmax-knn_ce" and DENSE_BYTES_PER_ELEMENT * case["n"] * case["m"] > args.dense_budget:
                    continue  # the dense path would not fit the budget on this machine
                points.append(measure_in_subprocess(case))
                print(axis, layer, value, points[-1].get("cpu_s"), points[-1].get("step_rss_mib"))
            good = [p for p in points if "error" not in p]
            xs = [p[key] for p in good]
            fits[layer] = {
                "time_exponent": slope(xs, [p["cpu_s"] for p in good]) if len(good) > 1 else float("nan"),
                "memory_exponent": slope(xs, [max(p["step_rss_mib"], 1.0) for p in good])
                if len(good) > 1
                else float("nan"),
            }
            results.setdefault(axis, {})[layer] = {"points": points, **fits[layer]}
            for p in points:
                rows.append(
                    [
                        layer,
                        p[key],
                        f"{p['cpu_s']:.2f}" if "cpu_s" in p else p.get("error"),
                        fmt_mib(p.get("step_rss_mib")),
                        fmt_mib(p.get("peak_rss_mib")),
                    ]
                )
        fixed = ", ".join(f"{k.upper()} = {v}" for k, v in spec["fixed"].items())
        exponents = "; ".join(
            f"`{layer}`: time ~ {axis}^{fit['time_exponent']:.2f}, step memory ~ {axis}^{fit['memory_exponent']:.2f}"
            for layer, fit in fits.items()
        )
        sections.append(
            f"#### Varying {axis} ({fixed})\n\n{exponents}\n\n"
            + table(["layer", axis, "CPU time (s)", "step memory", "peak RSS"], rows)
        )
    markdown = (
        f"Median CPU seconds over {args.repeats} repeats ({args.threads} thread), step memory = peak RSS minus RSS "
        "before the step, one fresh process per point; K = 8 unless varied.\n\n" + "\n".join(sections)
    )
    save("scaling", {"environment": environment(), "results": results}, markdown)


if __name__ == "__main__":
    main()
