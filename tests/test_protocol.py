"""The typed contract of registered quantizers (simplexvq.Quantizer) and check_quantizer's message."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import simplexvq
from simplexvq import Quantizer, QuantizerOutput, check_quantizer


@pytest.mark.parametrize("name", simplexvq.built_in_quantizers())
def test_every_built_in_quantizer_satisfies_the_contract(name):
    quantizer = simplexvq.build_quantizer(name, dim=8, groups=2, codebook_size=4, knn_k=1)
    assert isinstance(quantizer, Quantizer)
    assert check_quantizer(quantizer) is quantizer
    quantizer.set_num_updates(3)
    out = quantizer(torch.randn(5, 8))
    assert isinstance(out, QuantizerOutput)
    assert quantizer.code_vectors().shape == (2, 4, 4)
    assert quantizer.decode(out.indices).shape == (5, 8)


class _NoDecode(nn.Module):
    def forward(self, z: Tensor, padding_mask: Tensor | None = None) -> QuantizerOutput:
        return QuantizerOutput(quantized=z, indices=z.new_zeros(z.shape[:-1] + (1,), dtype=torch.long), loss=z.sum())

    def code_vectors(self) -> Tensor:
        return torch.zeros(1, 1, 1)


def test_a_module_missing_methods_is_rejected_with_their_names():
    module = _NoDecode()
    assert not isinstance(module, Quantizer)
    with pytest.raises(TypeError, match=r"my-vq _NoDecode does not satisfy simplexvq.Quantizer: missing decode, "):
        check_quantizer(module, name="my-vq")
    with pytest.raises(TypeError, match="missing forward, code_vectors, decode, set_num_updates"):
        check_quantizer(object())
