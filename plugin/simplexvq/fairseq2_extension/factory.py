"""Build a fairseq2 ``Wav2Vec2Model`` whose quantizer is a simplexvq quantizer."""

from __future__ import annotations

import inspect
from typing import Any

from fairseq2.models.wav2vec2 import (
    Wav2Vec2Factory,
    Wav2Vec2Loss,
    Wav2Vec2Model,
    Wav2Vec2Output,
    Wav2Vec2VectorQuantizer,
)

from simplexvq.fairseq2_extension.aux_loss import probe_grad_scale
from simplexvq.fairseq2_extension.config import SimplexVQWav2Vec2Config
from simplexvq.fairseq2_extension.quantizer import SimplexVQQuantizerOutput, SimplexVQWav2Vec2Quantizer


class SimplexVQWav2Vec2Factory(Wav2Vec2Factory):
    """fairseq2's wav2vec 2.0 factory with the quantizer replaced (encoder, masker and model are fairseq2's)."""

    def __init__(self, config: SimplexVQWav2Vec2Config) -> None:
        super().__init__(config)
        self._simplexvq_config = config

    def create_model(self) -> Wav2Vec2Model:
        model = super().create_model()
        if self._simplexvq_config.aux_loss_as_diversity:
            model.register_forward_hook(report_aux_loss_hook, with_kwargs=True)
        model.register_forward_hook(probe_loss_scale_hook)  # after the report: it wraps the final aggregate
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
            inject_aux_loss=config.inject_aux_loss,
        )


DEFAULT_DIVERSITY_WEIGHT: float = inspect.signature(Wav2Vec2Model.forward).parameters["diversity_weight"].default


def report_aux_loss_hook(
    model: Wav2Vec2Model, args: Any, kwargs: dict[str, Any], result: tuple[Wav2Vec2Loss, Wav2Vec2Output]
) -> None:
    """Forward hook of the model: put the quantizer's (injected) auxiliary loss where fairseq2 reports losses.

    ``Wav2Vec2Loss.diversity`` becomes ``aux_loss x num_targets`` (sum-scaled like the other terms) and
    ``aggregate`` becomes ``contrastive + aux + feature penalty``, the objective the injected gradient optimises.
    Both changes add gradient-free constants (the family's diversity term is detached, the injected loss too), so
    the gradient of ``aggregate`` is unchanged; fairseq2's wav2vec2 recipe then logs the KNN loss as
    ``diversity_loss`` and the full objective as ``loss``.
    """
    loss, output = result
    quantizer_output = output.quantizer_output
    if not (model.quantizer.inject_aux_loss and isinstance(quantizer_output, SimplexVQQuantizerOutput)):
        return  # without injection the caller adds aux_loss to its loss itself
    num_targets = output.logits.shape[0] * output.logits.shape[1]
    diversity_weight = kwargs.get("diversity_weight", DEFAULT_DIVERSITY_WEIGHT)
    aux = quantizer_output.aux_loss.detach().to(loss.aggregate.dtype) * num_targets
    loss.aggregate = loss.aggregate + (aux - diversity_weight * loss.diversity.detach())
    loss.diversity = aux


def probe_loss_scale_hook(model: Wav2Vec2Model, args: Any, output: tuple[Wav2Vec2Loss, Wav2Vec2Output]) -> None:
    """Forward hook of the model: let the injected auxiliary gradient follow the loss scale (``aux_loss.py``).

    Wraps ``loss.aggregate`` of ``Wav2Vec2Model.forward``'s ``(loss, output)`` in an identity that records the
    gradient arriving at it; the value and every other field are unchanged.
    """
    scale = model.quantizer.pop_grad_scale()
    loss = output[0]
    if scale is not None and loss.aggregate.requires_grad:
        loss.aggregate = probe_grad_scale(loss.aggregate, scale)


def create_simplexvq_wav2vec2_model(config: SimplexVQWav2Vec2Config) -> Wav2Vec2Model:
    """The family's model factory (``(config) -> model``, as fairseq2's ``register_model_family`` expects)."""
    return SimplexVQWav2Vec2Factory(config).create_model()
