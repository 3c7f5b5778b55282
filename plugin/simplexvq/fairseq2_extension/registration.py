"""The ``fairseq2.extension`` entry point: register the ``wav2vec2_simplexvq`` model family, its archs, and the
``wav2vec2_asr`` archs that fine-tune them."""

from __future__ import annotations

from fairseq2.composition import register_model_family
from fairseq2.models.wav2vec2 import Wav2Vec2Model, apply_ac_to_wav2vec2, apply_fsdp_to_wav2vec2
from fairseq2.runtime.dependency import DependencyContainer

from simplexvq.fairseq2_extension.config import (
    SIMPLEXVQ_WAV2VEC2_FAMILY,
    SimplexVQWav2Vec2Config,
    register_simplexvq_asr_configs,
    register_simplexvq_wav2vec2_configs,
)
from simplexvq.fairseq2_extension.factory import create_simplexvq_wav2vec2_model


def setup_simplexvq_extension(container: DependencyContainer) -> None:
    """Called by fairseq2 (``init_fairseq2()``, its recipe CLI and ``fairseq2.recipe.run``) with its container.

    The family's models are fairseq2 ``Wav2Vec2Model`` instances (so fairseq2's wav2vec2 recipe, FSDP and
    activation-checkpointing appliers accept them); only the quantizer differs. fairseq2 only logs a warning when
    an extension fails: set ``FAIRSEQ2_EXTENSION_TRACE=1`` to make it raise.
    """
    register_model_family(
        container,
        SIMPLEXVQ_WAV2VEC2_FAMILY,
        kls=Wav2Vec2Model,
        config_kls=SimplexVQWav2Vec2Config,
        factory=create_simplexvq_wav2vec2_model,
        fsdp_applier=apply_fsdp_to_wav2vec2,
        layerwise_ac_applier=apply_ac_to_wav2vec2,
    )
    register_simplexvq_wav2vec2_configs(container)
    register_simplexvq_asr_configs(container)
