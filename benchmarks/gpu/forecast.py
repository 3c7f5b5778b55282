"""Roofline forecast of the Triton kernels on H100 SXM and H200 SXM: FLOPs and bytes per kernel, no GPU needed.

A forecast, not a measurement: for each kernel of one training step (forward row pass, forward column pass, the
one backward pass) its matrix-product FLOPs (2 per multiply-add, as the kernels issue them, padding ignored), its
exponentials and other elementwise float32 operations per logit (counted from the kernel source, approximate),
and its compulsory HBM bytes (each input read once, each output written once). Each resource alone gives a time;
the forecast is the range from the slowest resource alone (all overlap perfectly) to their sum (none overlap),
beside the six-GEMM floor (``z Q^T``, ``P Q``, ``dO Q^T``, ``P^T dO``, ``dS Q``, ``dS^T z`` as plain matrix
products storing their N x M results; also its FLOPs alone). Also listed, not timed: the bytes the tiles re-read
from L2 and the backward's atomic additions (``dk``, ``db``, ``dv``), which the roofline cannot see. Peaks are
the dense (no sparsity) figures of NVIDIA's data sheets::

    python benchmarks/gpu/forecast.py [--out benchmarks/results]

Tiles are those :func:`simplexvq.scale.triton.launch.block_sizes` picks for CUDA (read from the module when it
imports, else the defaults below).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Dense peaks (TFLOP/s) and HBM bandwidth (TB/s). Sources: NVIDIA H100 Tensor Core GPU data sheet (H100 SXM: FP32
# 67 TFLOPS, TF32 Tensor Core 989 TFLOPS and BF16 Tensor Core 1,979 TFLOPS "with sparsity", i.e. 494.5 / 989.5
# dense, 3.35 TB/s HBM3) and NVIDIA H200 Tensor Core GPU data sheet (H200 SXM: the same compute figures, 4.8 TB/s
# HBM3e). IEEE float32 tl.dot runs on the FP32 (CUDA core) pipes, TF32 and BF16 on the tensor cores.
# Exponentials: 3.9 TFLOPS of special functions on H100 SXM5 (Shah et al., FlashAttention-3, 2024, section 1);
# the H200 has the same GH100 chip and clocks. Other elementwise float32 operations: half the FP32 figure (the
# data sheet counts a fused multiply-add as two).
GPUS = {
    "H100 SXM": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "bandwidth": 3.35, "exp": 3.9, "elementwise": 33.5},
    "H200 SXM": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "bandwidth": 4.8, "exp": 3.9, "elementwise": 33.5},
}
# Elementwise float32 operations per logit, counted from the kernel source (bias, masks, max / argmax, online
# sums, deviations and the top-K test, the logits' gradient and its sums); one exponential per logit each.
ELEMENTWISE_PER_LOGIT = {"forward rows": 16, "forward columns": 15, "backward": 15}
PRECISIONS = {"fp32": ("float32", 4), "tf32": ("float32", 4), "bf16": ("bfloat16", 2)}
CASES = [(16384, 8196, 64, 1, 8), (65536, 65536, 64, 1, 8), (16384, 1024, 256, 2, 8)]  # N, M, D, G, K
DEFAULT_TILES = {  # (rows, keys) per kernel if the package is not importable
    ("float32", "forward"): (32, 32),
    ("float32", "backward"): (32, 16),
    ("bfloat16", "forward"): (64, 64),
    ("bfloat16", "backward"): (64, 32),
}


@dataclass(frozen=True)
class KernelCost:
    kernel: str
    gemms: int  # N x M x D products
    flops: float
    hbm_bytes: float
    l2_bytes: float  # re-read tiles + atomic additions (not in the roofline time)
    exps: float = 0.0
    elementwise: float = 0.0


def _tiles(dtype: str, dim: int, backward: bool) -> tuple[int, int]:
    try:
        sys.path.insert(0, str(REPO / "plugin"))
        import torch

        from simplexvq.scale.triton.launch import block_sizes

        blocks = block_sizes(torch.device("cuda"), dim, dim, getattr(torch, dtype), backward=backward)
        return blocks.rows, blocks.columns
    except ImportError:
        return DEFAULT_TILES[(dtype, "backward" if backward else "forward")]


def kernel_costs(n: int, m: int, d: int, g: int, k: int, precision: str) -> list[KernelCost]:
    """FLOPs and bytes of each kernel of one training step (values = code vectors, DV = D)."""
    dtype, size = PRECISIONS[precision]
    acc = 4  # float32 accumulators, statistics and gradients of keys / bias / values
    product = 2.0 * n * m * d * g  # FLOPs of one N x M x D product per group
    rows_n, rows_m = _tiles(dtype, d, backward=False)
    back_n, _ = _tiles(dtype, d, backward=True)
    queries, codes = n * g * d * size, g * m * d * size
    per_row = n * g * acc
    forward_rows = KernelCost(
        "forward rows (logits, p v, lse, argmax, statistics)",
        2,
        2 * product,
        queries + 2 * codes + g * m * size + queries + 4 * per_row + n * g * 8,
        math.ceil(n / rows_n) * 2 * codes,
    )
    forward_columns = KernelCost(
        "forward columns (logits again, column sums, top-K)",
        1,
        product,
        queries + codes + 2 * per_row + g * m * acc + k * g * m * (acc + 8),
        math.ceil(m / rows_m) * queries,
    )
    backward = KernelCost(
        "backward (logits once; dO v^T, p^T dO, ds k, ds^T q)",
        5,
        5 * product,
        2 * queries + 2 * codes + 3 * per_row + queries + per_row + 3 * g * m * (2 * d + 1) * acc,
        math.ceil(n / back_n) * (2 * codes + g * m * (2 * d + 1) * acc),
    )
    logits = float(n) * m * g
    return [
        KernelCost(**{**asdict(cost), "exps": logits, "elementwise": ELEMENTWISE_PER_LOGIT[name] * logits})
        for cost, name in zip(
            (forward_rows, forward_columns, backward), ("forward rows", "forward columns", "backward"), strict=True
        )
    ]


def floor_cost(n: int, m: int, d: int, g: int, precision: str) -> KernelCost:
    """The six plain matrix products, each reading its operands and writing or reading an N x M matrix."""
    _, size = PRECISIONS[precision]
    logits = n * m * g * size
    operands = (n * g * d + g * m * d) * size
    return KernelCost("six-GEMM floor", 6, 6 * 2.0 * n * m * d * g, 6 * logits + 6 * operands, 0.0)


def resource_ms(cost: KernelCost, gpu: dict, precision: str) -> dict[str, float]:
    """Milliseconds each resource alone needs: matrix products, exponentials, other elementwise operations, HBM."""
    return {
        "products": 1e3 * cost.flops / (gpu[precision] * 1e12),
        "exp": 1e3 * cost.exps / (gpu["exp"] * 1e12),
        "elementwise": 1e3 * cost.elementwise / (gpu["elementwise"] * 1e12),
        "memory": 1e3 * cost.hbm_bytes / (gpu["bandwidth"] * 1e12),
    }


def forecast() -> list[dict]:
    rows = []
    for (n, m, d, g, k), precision in ((case, p) for case in CASES for p in PRECISIONS):
        costs = kernel_costs(n, m, d, g, k, precision)
        floor = floor_cost(n, m, d, g, precision)
        for gpu_name, gpu in GPUS.items():
            kernels = []
            for cost in costs:
                times = resource_ms(cost, gpu, precision)
                kernels.append(
                    {
                        **asdict(cost),
                        "resource_ms": {key: round(value, 4) for key, value in times.items()},
                        "low_ms": round(max(times.values()), 4),
                        "high_ms": round(sum(times.values()), 4),
                        "bound": max(times, key=times.get),
                    }
                )
            floor_times = resource_ms(floor, gpu, precision)
            floor_ms = max(floor_times["products"], floor_times["memory"])
            low = sum(kernel["low_ms"] for kernel in kernels)
            high = sum(kernel["high_ms"] for kernel in kernels)
            rows.append(
                {
                    "gpu": gpu_name,
                    "precision": precision,
                    "N": n,
                    "M": m,
                    "D": d,
                    "G": g,
                    "K": k,
                    "kernels": kernels,
                    "low_ms": round(low, 4),
                    "high_ms": round(high, 4),
                    "floor_ms": round(floor_ms, 4),
                    "floor_bound": "products" if floor_times["products"] >= floor_times["memory"] else "memory",
                    "floor_products_ms": round(floor_times["products"], 4),
                    "ratio_to_floor": [round(low / floor_ms, 2), round(high / floor_ms, 2)],
                    "ratio_to_floor_products": [
                        round(low / floor_times["products"], 2),
                        round(high / floor_times["products"], 2),
                    ],
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "**Forecast, not a measurement** (each kernel: slowest resource alone - sum of all; `python "
        "benchmarks/gpu/forecast.py --out benchmarks/results`):",
        "",
        "| GPU | precision | N, M, D, G | forward rows | forward columns | backward | kernels total | "
        "six-GEMM floor | floor products only | total / floor | total / floor products |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kernels = " | ".join(f"{k['low_ms']:.3f}-{k['high_ms']:.3f} ({k['bound']})" for k in r["kernels"])
        low, high = r["ratio_to_floor"]
        products_low, products_high = r["ratio_to_floor_products"]
        lines.append(
            f"| {r['gpu']} | {r['precision']} | {r['N']}, {r['M']}, {r['D']}, {r['G']} | {kernels} | "
            f"{r['low_ms']:.3f}-{r['high_ms']:.3f} | {r['floor_ms']:.3f} ({r['floor_bound']}) | "
            f"{r['floor_products_ms']:.3f} | {low:.1f}-{high:.1f}x | {products_low:.1f}-{products_high:.1f}x |"
        )
    lines += [
        "",
        "Times in ms; in parentheses the slowest resource (products, exp, elementwise, memory). Per kernel of one "
        "step (the same on both GPUs): matrix-product GFLOP, exponentials and other elementwise operations (G), "
        "HBM MB, and L2 MB (re-read tiles and the backward's atomic additions, not in the times):",
        "",
        "| precision | N, M, D, G | kernel | GEMM-equivalents | GFLOP | G exp | G elementwise | HBM MB | L2 MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["gpu"] != next(iter(GPUS)):
            continue
        for k in r["kernels"]:
            lines.append(
                f"| {r['precision']} | {r['N']}, {r['M']}, {r['D']}, {r['G']} | {k['kernel']} | {k['gemms']} | "
                f"{k['flops'] / 1e9:.1f} | {k['exps'] / 1e9:.2f} | {k['elementwise'] / 1e9:.1f} | "
                f"{k['hbm_bytes'] / 1e6:.1f} | {k['l2_bytes'] / 1e6:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for forecast.json and forecast.md")
    args = parser.parse_args(argv)
    rows = forecast()
    text = markdown(rows)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "forecast.json").write_text(json.dumps({"gpus": GPUS, "rows": rows}, indent=1) + "\n")
        (args.out / "forecast.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
