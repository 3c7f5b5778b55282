"""fairseq2 0.8.1 extension: a wav2vec 2.0 model family (``wav2vec2_simplexvq``) whose quantizer is simplexvq's.

Installed as the ``fairseq2.extension`` entry point ``setup_simplexvq_extension``; see ``docs/fairseq2.md``.
Importing this package imports fairseq2; ``import simplexvq`` does not import it.
"""

from simplexvq.fairseq2_extension.aux_loss import GradScale, inject_aux_loss, probe_grad_scale
from simplexvq.fairseq2_extension.config import (
    SIMPLEXVQ_WAV2VEC2_FAMILY,
    TINY_ASR_ARCH,
    QuantizerSection,
    SimplexVQWav2Vec2Config,
)
from simplexvq.fairseq2_extension.factory import SimplexVQWav2Vec2Factory, create_simplexvq_wav2vec2_model
from simplexvq.fairseq2_extension.hub import get_simplexvq_wav2vec2_model_hub
from simplexvq.fairseq2_extension.quantizer import SimplexVQQuantizerOutput, SimplexVQWav2Vec2Quantizer
from simplexvq.fairseq2_extension.registration import setup_simplexvq_extension

__all__ = [
    "SIMPLEXVQ_WAV2VEC2_FAMILY",
    "TINY_ASR_ARCH",
    "GradScale",
    "QuantizerSection",
    "SimplexVQQuantizerOutput",
    "SimplexVQWav2Vec2Config",
    "SimplexVQWav2Vec2Factory",
    "SimplexVQWav2Vec2Quantizer",
    "create_simplexvq_wav2vec2_model",
    "get_simplexvq_wav2vec2_model_hub",
    "inject_aux_loss",
    "probe_grad_scale",
    "setup_simplexvq_extension",
]
