"""Relative error of the float32 temperature gradient against float64: the Triton kernels and two dense forms.

Runs in Triton's interpreter on CPU tensors (it sets ``TRITON_INTERPRET=1``; about a minute) on the held-out
cases of issue 19 (Euclidean logits at low temperatures) and prints a Markdown table::

    PYTHONPATH=plugin python benchmarks/gpu/temperature_precision.py

It uses only the public ``triton_streamed_softmax_quantize`` and ``simplexvq.functional``, so pointing
``PYTHONPATH`` at another checkout's ``plugin`` measures that version (the "before" column of
docs/performance.md). The objective is ``sum(quantized * W) + 2.5 * knn_loss`` for a fixed random ``W``.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from simplexvq import functional as VQF  # noqa: E402
from simplexvq.scale.triton import triton_streamed_softmax_quantize  # noqa: E402

CASES = [  # (N, G, M, D), K, KNN distance, temperature range, seed
    ((300, 2, 100, 32), 7, "l2", (0.05, 0.55), 11),
    ((300, 2, 100, 32), 7, "ce", (0.05, 0.55), 12),
    ((160, 1, 48, 16), 5, "l2", (0.05, 0.2), 13),
]


def _inputs(shape, tau, seed):
    n, groups, entries, dim = shape
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, groups, dim, generator=gen, dtype=torch.float64)
    codebook = torch.randn(groups, entries, dim, generator=gen, dtype=torch.float64)
    temperature = tau[0] + (tau[1] - tau[0]) * torch.rand(groups, generator=gen, dtype=torch.float64)
    return [x.half().double() for x in (z, codebook, temperature)]


def _dense(z, codebook, temperature, k, knn_distance, centred):
    if centred:  # shifted by |z|^2 / tau per row: the same softmax
        logits = 2.0 * torch.einsum("ngd,gmd->ngm", z, codebook) - codebook.pow(2).sum(-1)[None]
        logits = logits / temperature[:, None]
    else:
        logits = VQF.euclidean_logits(z, codebook, temperature)
    log_pi = torch.log_softmax(logits, dim=-1)
    return torch.einsum("ngm,gmd->ngd", log_pi.exp(), codebook), VQF.knn_loss(log_pi, k, knn_distance)


def _kernels(z, codebook, temperature, k, knn_distance):
    result = triton_streamed_softmax_quantize(
        z, codebook, temperature, distance="euclid", knn_k=k, knn_distance=knn_distance
    )
    return result.quantized, result.knn_loss


def _temperature_grad(fn, inputs, dtype, weight, *args):
    z, codebook, temperature = (x.to(dtype).requires_grad_(True) for x in inputs)
    out, loss = fn(z, codebook, temperature, *args)
    total = (out.double() * weight).sum() + 2.5 * loss.double()
    return torch.autograd.grad(total, temperature)[0].double()


def main() -> None:
    torch.set_float32_matmul_precision("highest")
    dense_forms = "dense fp32, -abs(z-c)^2/tau | dense fp32, (2 z.c - abs(c)^2)/tau"
    print(f"| N, G, M, D | K | KNN | tau | kernels fp32 | {dense_forms} |")
    print("|---|---|---|---|---|---|---|")
    for shape, k, knn_distance, tau, seed in CASES:
        inputs = _inputs(shape, tau, seed)
        weight = torch.randn(shape[0], shape[1], shape[3], generator=torch.Generator().manual_seed(seed + 1))
        weight = weight.double()
        exact = _temperature_grad(_dense, inputs, torch.float64, weight, k, knn_distance, False)
        errors = [
            _temperature_grad(_kernels, inputs, torch.float32, weight, k, knn_distance),
            _temperature_grad(_dense, inputs, torch.float32, weight, k, knn_distance, False),
            _temperature_grad(_dense, inputs, torch.float32, weight, k, knn_distance, True),
        ]
        relative = [float((got - exact).abs().max() / exact.abs().max()) for got in errors]
        cells = " | ".join(f"{value:.1e}" for value in relative)
        print(f"| {', '.join(map(str, shape))} | {k} | {knn_distance} | {tau[0]}-{tau[1]} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
