"""ProductQuantizer.decode: code indices -> the vectors eval mode outputs for them, against a naive lookup."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import simplexvq
from simplexvq import ProductQuantizer

DIM, GROUPS, CODEBOOK_SIZE = 12, 3, 5


def _quantizer(name: str, **options) -> ProductQuantizer:
    torch.manual_seed(0)
    quantizer = simplexvq.build_quantizer(name, dim=DIM, groups=GROUPS, codebook_size=CODEBOOK_SIZE, knn_k=2, **options)
    return quantizer.eval()


def _naive_decode(quantizer: ProductQuantizer, indices: torch.Tensor) -> torch.Tensor:
    """One code vector per (position, group), looked up in a Python loop; zeros for -1."""
    config = quantizer.config
    codebook = quantizer.code_vectors()
    if not config.is_smoothing and config.distance == "cosine":
        codebook = codebook / codebook.norm(dim=-1, keepdim=True)
    rows = []
    for position in indices.reshape(-1, config.groups).tolist():
        parts = [
            codebook[g, m] if m >= 0 else torch.zeros(config.group_dim, dtype=codebook.dtype)
            for g, m in enumerate(position)
        ]
        rows.append(torch.cat(parts))
    return torch.stack(rows).reshape(*indices.shape[:-1], config.dim)


@pytest.mark.parametrize("name", simplexvq.built_in_quantizers())
def test_decode_equals_eval_mode_output(name):
    """Every built-in method: decoding the indices of an eval-mode forward gives its quantized output (exactly
    for smoothing methods, whose hard output is a codebook row; to rounding for the estimators' ``z + (q - z)``)."""
    quantizer = _quantizer(name)
    z = torch.randn(2, 7, DIM, generator=torch.Generator().manual_seed(1))
    padding_mask = torch.zeros(2, 7, dtype=torch.bool)
    padding_mask[1, 5:] = True
    with torch.no_grad():
        out = quantizer(z, padding_mask)
        decoded = quantizer.decode(out.indices)
    assert decoded.shape == z.shape
    assert torch.equal(decoded[1, 5:], torch.zeros(2, DIM))
    if quantizer.config.is_smoothing:
        assert torch.equal(decoded, out.quantized)
    else:
        torch.testing.assert_close(decoded, out.quantized, rtol=1e-5, atol=1e-6)


def test_decode_matches_the_memory_efficient_path():
    quantizer = _quantizer("softmax-knn_ce", memory_efficient=True, chunk_size=3)
    z = torch.randn(9, DIM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = quantizer(z)
    assert torch.equal(quantizer.decode(out.indices), out.quantized)


@pytest.mark.parametrize("name", ["softmax-knn_ce", "ste-cosine", "simvq"])
def test_decode_values_and_gradients_match_a_naive_lookup(name):
    quantizer = _quantizer(name)
    generator = torch.Generator().manual_seed(3)
    indices = torch.randint(-1, CODEBOOK_SIZE, (4, 2, GROUPS), generator=generator)
    weights = torch.randn(4, 2, DIM, generator=generator)

    decoded = quantizer.decode(indices)
    (weights * decoded).sum().backward()
    fast_grads = [p.grad.clone() for p in quantizer.parameters() if p.grad is not None]
    quantizer.zero_grad()
    naive = _naive_decode(quantizer, indices)
    (weights * naive).sum().backward()
    naive_grads = [p.grad.clone() for p in quantizer.parameters() if p.grad is not None]

    torch.testing.assert_close(decoded, naive, rtol=1e-6, atol=1e-6)
    assert len(fast_grads) == len(naive_grads) > 0
    for fast, reference in zip(fast_grads, naive_grads, strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)


def test_decode_keeps_leading_shape_and_device_of_the_codebook():
    quantizer = _quantizer("softmax-none")
    indices = torch.zeros(GROUPS, dtype=torch.int32)  # a single position, int32 indices
    decoded = quantizer.decode(indices)
    assert decoded.shape == (DIM,)
    codebook = quantizer.code_vectors()
    assert torch.equal(decoded, torch.cat([codebook[g, 0] for g in range(GROUPS)]))


@pytest.mark.parametrize(
    ("indices", "error", "message"),
    [
        (torch.tensor([[0, 1, CODEBOOK_SIZE]]), ValueError, r"must lie in \[0, 5\).*got \[5\]"),
        (torch.tensor([[0, -2, 1]]), ValueError, r"or be -1 for padding; got \[-2\]"),
        (torch.tensor([[0, 1]]), ValueError, r"shape \(\.\.\., groups\) = \(\.\.\., 3\), got \(1, 2\)"),
        (torch.tensor(1), ValueError, r"shape \(\.\.\., groups\)"),
        (torch.zeros(2, GROUPS), ValueError, "integer code indices, got dtype torch.float32"),
        (torch.zeros(2, GROUPS, dtype=torch.bool), ValueError, "integer code indices"),
        ([[0, 1, 2]], TypeError, "tensor of code indices, got list"),
    ],
)
def test_bad_indices_get_a_clear_error(indices, error, message):
    with pytest.raises(error, match=message):
        _quantizer("softmax-knn_ce").decode(indices)


def test_cosine_hard_methods_decode_on_the_sphere():
    quantizer = _quantizer("rotation-cosine")
    decoded = quantizer.decode(torch.arange(CODEBOOK_SIZE)[:, None].expand(-1, GROUPS))
    norms = decoded.reshape(CODEBOOK_SIZE, GROUPS, -1).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    raw = quantizer.code_vectors().transpose(0, 1).reshape(CODEBOOK_SIZE, DIM)
    torch.testing.assert_close(decoded, F.normalize(raw.reshape(CODEBOOK_SIZE, GROUPS, -1), dim=-1).flatten(1))
