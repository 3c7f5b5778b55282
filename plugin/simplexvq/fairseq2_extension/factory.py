"""Build a fairseq2 ``Wav2Vec2Model`` whose quantizer is a simplexvq quantizer."""

from __future__ import annotations

from typing import Any

from fairseq2.models.wav2vec2 import Wav2Vec2Factory, Wav2Vec2Model, Wav2Vec2VectorQuantizer
from torch import nn

from simplexvq.fairseq2_extension.aux_loss import probe_grad_scale
from simplexvq.fairseq2_extension.config import SimplexVQWav2Vec2Config
from simplexvq.fairseq2_extension.quantizer import SimplexVQWav2Vec2Quantizer


class SimplexVQWav2Vec2Factory(Wav2Vec2Factory):
    """fairseq2's wav2vec 2.0 factory with the quantizer replaced (encoder, masker and model are fairseq2's)."""

    def __init__(self, config: SimplexVQWav2Vec2Config) -> None:
        super().__init__(config)
        self._simplexvq_config = config

    def create_model(self) -> Wav2Vec2Model:
        model = super().create_model()
        model.register_forward_hook(probe_loss_scale_hook)
        return model

    def create_quantizer(self) -> Wav2Vec2VectorQuantizer:
        config = self._simplexvq_config
        return SimplexVQWav2Vec2Quantizer(
            config.encoder_config.feature_dim,
            config.quantized_dim,
            config.num_codebooks,
            config.num_codebook_entries,
            config.codebook_sampling_temperature,
            method=config.quantizer.method,
            quantizer_kwargs=config.quantizer_kwargs(),
            inject_aux_loss=config.quantizer.inject_aux_loss,
        )


def probe_loss_scale_hook(model: nn.Module, args: Any, output: Any) -> None:
    """Forward hook of the model: let the injected auxiliary gradient follow the loss scale (``aux_loss.py``).

    Wraps ``loss.aggregate`` of ``Wav2Vec2Model.forward``'s ``(loss, output)`` in an identity that records the
    gradient arriving at it; the value and every other field are unchanged.
    """
    quantizer = getattr(model, "quantizer", None)
    if not isinstance(quantizer, SimplexVQWav2Vec2Quantizer):
        return
    scale = quantizer.pop_grad_scale()
    loss = output[0]
    if scale is not None and loss.aggregate.requires_grad:
        loss.aggregate = probe_grad_scale(loss.aggregate, scale)


def create_simplexvq_wav2vec2_model(config: SimplexVQWav2Vec2Config) -> Wav2Vec2Model:
    """The family's model factory (``(config) -> model``, as fairseq2's ``register_model_family`` expects)."""
    return SimplexVQWav2Vec2Factory(config).create_model()
