"""Vertex subsampling (section 5.3's workaround, ``vertex_subsample=S``): its cost and its statistical effect.

Cost: time and step memory of ``softmax-knn_ce`` (memory-efficient and dense) with S = M, M/4, M/16 vertices per
step (N = 16384, M = 8196, D = 64), one fresh process each. Effect: on a fixed batch of a random quantizer
(N = 4096, M = 1024, D = 64, K = 8), over 32 draws of the subset, the loss and the gradient of the KNN term
w.r.t. the code vectors and the input, compared with the full regularizer: bias of the mean loss, relative
standard deviation of the loss, mean cosine similarity of one draw's gradient with the full gradient (the noise a
step sees), and cosine similarity of the gradient averaged over the draws with the full gradient (unbiasedness).

    .venv/bin/python benchmarks/bench_subsample.py
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _harness import environment, fmt_mib, measure_in_subprocess, save, table

import simplexvq

COST_SIZE = {"n": 16384, "m": 8196, "d": 64}
FRACTIONS = (1, 4, 16)


def knn_gradients(quantizer: simplexvq.ProductQuantizer, z: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The KNN loss and the gradient of it w.r.t. the code vectors and the input, flattened into one vector."""
    z = z.clone().requires_grad_(True)
    quantizer.zero_grad(set_to_none=True)
    loss = quantizer(z).loss
    loss.backward()
    return float(loss.detach()), torch.cat([quantizer.codebook.weight.grad.reshape(-1), z.grad.reshape(-1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--draws", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cost = []
    for fraction in FRACTIONS:
        subsample = COST_SIZE["m"] // fraction if fraction > 1 else None
        for layer in ("softmax-knn_ce-efficient", "softmax-knn_ce"):
            case = {"layer": layer, **COST_SIZE, "vertex_subsample": subsample, "threads": args.threads}
            cost.append(measure_in_subprocess(case))
            print(layer, subsample, cost[-1].get("cpu_s"), cost[-1].get("step_rss_mib"))

    n, m, d = 4096, 1024, 64
    torch.manual_seed(0)
    z = torch.randn(n, d)
    effect = []
    for fraction in FRACTIONS:
        subsample = m // fraction
        config = simplexvq.quantizer_config(
            "softmax-knn_ce", dim=d, codebook_size=m, knn_k=8, memory_efficient=True, vertex_subsample=subsample
        )
        torch.manual_seed(0)
        quantizer = simplexvq.ProductQuantizer(config)
        quantizer.eval()  # eval mode: every vertex, the exact loss
        full_loss, full_grad = knn_gradients(quantizer, z)
        quantizer.train()
        losses, cosines, grad_sum = [], [], torch.zeros_like(full_grad)
        for draw in range(args.draws if fraction > 1 else 1):
            torch.manual_seed(1000 + draw)
            loss, grad = knn_gradients(quantizer, z)
            losses.append(loss)
            cosines.append(float(torch.nn.functional.cosine_similarity(grad, full_grad, dim=0)))
            grad_sum += grad
        effect.append(
            {
                "vertex_subsample": subsample,
                "full_loss": full_loss,
                "mean_loss": statistics.mean(losses),
                "relative_bias": statistics.mean(losses) / full_loss - 1.0,
                "relative_std": statistics.pstdev(losses) / full_loss,
                "gradient_cosine": statistics.mean(cosines),
                "mean_gradient_cosine": float(torch.nn.functional.cosine_similarity(grad_sum, full_grad, dim=0)),
            }
        )
        print(effect[-1])

    cost_rows = [
        [
            c["layer"],
            c.get("vertex_subsample") or c["m"],
            f"{c['cpu_s']:.2f}" if "cpu_s" in c else c.get("error"),
            fmt_mib(c.get("step_rss_mib")),
        ]
        for c in cost
    ]
    effect_rows = [
        [
            e["vertex_subsample"],
            f"{100 * e['relative_bias']:+.2f}%",
            f"{100 * e['relative_std']:.2f}%",
            f"{e['gradient_cosine']:.3f}",
            f"{e['mean_gradient_cosine']:.3f}",
        ]
        for e in effect
    ]
    markdown = (
        f"Cost (N = {COST_SIZE['n']}, M = {COST_SIZE['m']}, D = {COST_SIZE['d']}, K = 8; median CPU seconds, "
        f"{args.threads} thread; step memory = peak RSS minus RSS before the step):\n\n"
        + table(["layer", "S", "CPU time (s)", "step memory"], cost_rows)
        + f"\nEffect (N = {n}, M = {m}, D = {d}, K = 8, random quantizer, {args.draws} draws; S = M is the full "
        "loss; the mean is over draws):\n\n"
        + table(
            ["S", "bias of mean loss", "rel. std of loss", "one draw: gradient cosine", "mean over draws: cosine"],
            effect_rows,
        )
    )
    save("subsample", {"environment": environment(), "cost": cost, "effect": effect}, markdown)


if __name__ == "__main__":
    main()
