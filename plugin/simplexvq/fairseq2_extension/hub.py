"""Typed access to the family through fairseq2's model hub (after ``fairseq2.init_fairseq2()``)."""

from __future__ import annotations

from fairseq2.models import ModelHubAccessor
from fairseq2.models.wav2vec2 import Wav2Vec2Model

from simplexvq.fairseq2_extension.config import SIMPLEXVQ_WAV2VEC2_FAMILY, SimplexVQWav2Vec2Config

get_simplexvq_wav2vec2_model_hub = ModelHubAccessor(SIMPLEXVQ_WAV2VEC2_FAMILY, Wav2Vec2Model, SimplexVQWav2Vec2Config)
"""``get_simplexvq_wav2vec2_model_hub().create_new_model(hub.get_arch_config("base_knn_2x320"))`` and so on."""
