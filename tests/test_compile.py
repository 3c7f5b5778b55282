"""``torch.compile(fullgraph=True)`` of a quantizer training step (forward + backward) on the CPU.

``fullgraph=True`` turns any graph break into an error, so a pass proves that the call holds no host sync, no
data-dependent shape and no untraceable Python (``aot_eager`` traces forward and backward like inductor without
generating code, which keeps the test fast). The compiled step must also give the eager step's loss and gradients.
Dense methods run without a padding mask (with one they compact the unpadded rows, a graph break); the streamed
layer (``memory_efficient=True``, whose ``cpu`` backend becomes ``reference`` when traced) runs with one.
"""

from __future__ import annotations

import pytest
import torch

import simplexvq

CASES = [
    ("softmax-knn_ce", {}),
    ("softmax-knn_l2", {"chunk_size": 8, "vertex_subsample": 5}),
    ("softmax-perplexity", {}),
    ("hard_gumbel-knn_ce", {}),
    ("ste-cosine", {}),
    ("rotation-euclid", {}),
    ("simvq", {}),
    ("softmax-knn_ce", {"memory_efficient": True, "chunk_size": 16}),
    ("softmax-knn_l2", {"memory_efficient": True, "vertex_subsample": 5, "distance": "euclid"}),
    ("softmax-none", {"memory_efficient": True}),
]


def _step(quantizer, z, padding):
    out = quantizer(z, padding)
    return out.loss + out.quantized.square().mean(), out.indices


@pytest.mark.parametrize(("name", "options"), CASES, ids=[f"{n}-{'-'.join(o)}" for n, o in CASES])
def test_training_step_compiles_without_graph_breaks(name, options):
    torch._dynamo.reset()  # every case compiles afresh (one code object, many quantizers: no recompile limit)
    torch.manual_seed(0)
    quantizer = simplexvq.build_quantizer(name, dim=8, groups=2, codebook_size=12, knn_k=3, **options).double()
    z = torch.randn(2, 20, 8, dtype=torch.float64)
    padding = None
    if options.get("memory_efficient"):
        padding = torch.zeros(2, 20, dtype=torch.bool)
        padding[1, 13:] = True
    results = []
    for compiled in (False, True):
        torch.manual_seed(1)  # the same Gumbel noise and vertex subset in both runs
        quantizer.zero_grad()
        leaf = z.clone().requires_grad_()
        step = torch.compile(_step, fullgraph=True, backend="aot_eager") if compiled else _step
        loss, indices = step(quantizer, leaf, padding)
        loss.backward()
        results.append((loss, indices, leaf.grad, *(p.grad for p in quantizer.parameters() if p.requires_grad)))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-9, atol=1e-10)
