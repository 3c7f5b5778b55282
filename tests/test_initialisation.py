"""Quantizers built on the meta device can be materialised and initialised in place (fairseq2, FSDP)."""

from __future__ import annotations

import math

import pytest
import torch

import simplexvq


@pytest.mark.parametrize("name", ["softmax-knn_ce", "ste-euclid", "simvq"])
def test_meta_device_build_then_reset_parameters(name):
    torch.manual_seed(0)
    with torch.device("meta"):
        quantizer = simplexvq.build_quantizer(name, dim=16, groups=2, codebook_size=32, knn_k=2)
    assert all(p.is_meta for p in quantizer.parameters())
    quantizer.to_empty(device="cpu")
    for module in quantizer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    config = quantizer.config
    state = dict(quantizer.named_parameters()) | dict(quantizer.named_buffers())
    vectors = state.get("codebook.weight") if name != "simvq" else state["codebook.basis"]
    std = config.group_dim**-0.5
    assert vectors.shape[-2:] == (32, 8) and abs(vectors.std().item() - std) < 0.15 * std
    if config.is_smoothing:
        assert torch.allclose(quantizer.logits.temperature, torch.full((2,), config.init_temperature))
    if name == "simvq":
        bound = 1 / math.sqrt(8)
        assert state["codebook.bias"].abs().max() <= bound and state["codebook.weight"].abs().max() <= bound
    out = quantizer(torch.randn(64, 16))
    assert torch.isfinite(out.quantized).all() and torch.isfinite(out.loss)
