"""The model family's configuration (wav2vec 2.0 plus a simplexvq quantizer section) and its archs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from fairseq2.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2EncoderConfig
from fairseq2.runtime.config_registry import ConfigRegistrar
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.utils.validation import ValidationResult

import simplexvq

SIMPLEXVQ_WAV2VEC2_FAMILY: Final = "wav2vec2_simplexvq"

PERPLEXITY_WEIGHT: Final = 0.1
"""Default weight of the ``*-perplexity`` baselines: wav2vec 2.0's diversity weight (alpha), which is also the
default ``diversity_loss_weight`` of fairseq2's wav2vec2 recipe, so those baselines keep wav2vec 2.0's objective."""


@dataclass(kw_only=True)
class QuantizerSection:
    """Which simplexvq quantizer replaces wav2vec 2.0's Gumbel quantizer, and its knobs.

    ``G``, ``M`` and the codebook dimension come from the parent config (``num_codebooks``,
    ``num_codebook_entries``, ``quantized_dim // num_codebooks``); the Gumbel temperature schedule of the Gumbel
    methods from ``codebook_sampling_temperature``. ``None`` leaves a knob at simplexvq's default for the method.
    """

    method: str = "softmax-knn_ce"
    """A name registered with :func:`simplexvq.register_quantizer`: every row of the paper's Table 2
    (``ste-euclid``, ``rotation-cosine``, ``hard_gumbel-perplexity``, ``softmax-knn_ce``, ``simvq``, ...)."""

    knn_k: int = 8
    """K of eq. 13, neighbours per code among the positions of one forward pass (one rank): the paper's
    ``K = 2 x 4`` on 4 GPUs is ``knn_k=8`` on one process (or ``knn_k=2`` per rank until KNN spans ranks)."""

    regularizer_weight: float | None = None
    """Weight of the regularizer in eq. 9; ``None``: 1.0 (the paper) for KNN, 0.1 for ``*-perplexity``."""

    distance: str | None = None
    """``cosine`` or ``euclid`` logits / nearest-code metric (``None``: cosine, Euclidean for SimVQ)."""

    init_temperature: float | None = None
    """Initial learnable logit temperature of the smoothing methods (``None``: 0.1 for cosine logits)."""

    learnable_temperature: bool = True

    commitment_weight: float | None = None
    """beta of eq. 10 for the hard methods (``None``: 1.0, 0.25 for SimVQ)."""

    regularize_samples: bool = False
    """Gumbel methods: regularize the Gumbel samples p instead of the assignment probabilities pi."""

    codebook_init_std: float | None = None

    inference: str = "hard"
    """Eval-mode output: ``hard`` (argmax code, the paper) or ``soft`` (``Q pi``, smoothing methods only)."""

    inject_aux_loss: bool = True
    """Add the quantizer's auxiliary loss to the gradient from inside the model (see ``aux_loss.py``), so that
    fairseq2's own wav2vec2 trainer and criterion train with it. ``False``: add
    ``output.quantizer_output.aux_loss * num_targets`` to the loss yourself."""

    def quantizer_kwargs(self) -> dict[str, Any]:
        """Keyword overrides for :func:`simplexvq.build_quantizer`; ``None`` fields are left to simplexvq."""
        kwargs: dict[str, Any] = {
            "knn_k": self.knn_k,
            "learnable_temperature": self.learnable_temperature,
            "regularize_samples": self.regularize_samples,
            "inference": self.inference,
        }
        weight = self.regularizer_weight
        if weight is None and self.method.endswith("-perplexity"):
            weight = PERPLEXITY_WEIGHT
        optional = {
            "regularizer_weight": weight,
            "distance": self.distance,
            "init_temperature": self.init_temperature,
            "commitment_weight": self.commitment_weight,
            "codebook_init_std": self.codebook_init_std,
        }
        kwargs.update({name: value for name, value in optional.items() if value is not None})
        return kwargs


@dataclass(kw_only=True)
class SimplexVQWav2Vec2Config(Wav2Vec2Config):
    """A wav2vec 2.0 config whose quantizer is a simplexvq quantizer (``quantizer``); every other field keeps its
    fairseq2 meaning. ``quantized_dim`` is the quantizer's output size, ``G x`` the codebook dimension."""

    quantizer: QuantizerSection = field(default_factory=QuantizerSection)

    def quantizer_kwargs(self) -> dict[str, Any]:
        """Overrides for :func:`simplexvq.build_quantizer` besides the shapes: the section's knobs and the Gumbel
        temperature schedule ``codebook_sampling_temperature`` (fairseq2's ``max(start * decay**step, end)``)."""
        start, end, decay = self.codebook_sampling_temperature
        schedule = simplexvq.GumbelTemperature(start=start, end=end, decay=decay)
        return {"gumbel_temperature": schedule, **self.quantizer.quantizer_kwargs()}

    def validate(self) -> ValidationResult:
        """fairseq2's config validation hook (recipes and asset cards call it): reject a quantizer simplexvq
        would refuse, before any model is built."""
        result = ValidationResult()
        method = self.quantizer.method
        if method not in simplexvq.available_quantizers():
            known = ", ".join(simplexvq.available_quantizers())
            result.add_error(f"`quantizer.method` is {method!r}, not a registered simplexvq quantizer ({known}).")
            return result
        try:  # built-in presets validate their whole config; third-party factories validate when called
            simplexvq.quantizer_config(
                method,
                dim=self.quantized_dim,
                codebook_size=self.num_codebook_entries,
                groups=self.num_codebooks,
                **self.quantizer_kwargs(),
            )
        except KeyError:
            pass
        except (TypeError, ValueError) as error:
            result.add_error(f"the simplexvq quantizer config is not valid: {error}")
        return result


def base_config(num_codebooks: int, num_codebook_entries: int, codebook_dim: int) -> SimplexVQWav2Vec2Config:
    """wav2vec 2.0 BASE (fairseq2's ``base`` arch) with a ``num_codebooks x num_codebook_entries`` codebook of
    ``codebook_dim``-dimensional vectors quantized by KNN-CE (section 4.2, appendix B.2)."""
    return SimplexVQWav2Vec2Config(
        num_codebooks=num_codebooks,
        num_codebook_entries=num_codebook_entries,
        quantized_dim=num_codebooks * codebook_dim,
    )


def tiny_config() -> SimplexVQWav2Vec2Config:
    """A 23k-parameter model for tests: 3 conv layers (stride 20), 2 encoder layers of width 32, no
    dropout, 2 x 16 codes of dimension 8; a forward/backward on a (2, 4000) batch takes a fraction of a second."""
    encoder = Wav2Vec2EncoderConfig(
        model_dim=32,
        max_seq_len=512,
        feature_dim=16,
        feature_extractor_layer_descs=[(16, 10, 5), (16, 3, 2), (16, 2, 2)],
        pos_conv_kernel_size=8,
        num_pos_conv_groups=4,
        num_encoder_layers=2,
        num_encoder_attn_heads=2,
        ffn_inner_dim=64,
        dropout_p=0.0,
        attn_dropout_p=0.0,
        layer_drop_p=0.0,
    )
    return SimplexVQWav2Vec2Config(
        encoder_config=encoder,
        final_dim=16,
        quantized_dim=16,
        num_codebooks=2,
        num_codebook_entries=16,
        num_distractors=10,
        quantizer=QuantizerSection(knn_k=2),
    )


def register_simplexvq_wav2vec2_configs(container: DependencyContainer) -> None:
    """Register the family's archs: the paper's two codebook configurations on BASE, and ``tiny``."""
    arch = ConfigRegistrar(container, SimplexVQWav2Vec2Config)

    @arch("base_knn_1x1024")
    def base_knn_1x1024() -> SimplexVQWav2Vec2Config:
        return base_config(num_codebooks=1, num_codebook_entries=1024, codebook_dim=256)

    @arch("base_knn_2x320")
    def base_knn_2x320() -> SimplexVQWav2Vec2Config:
        return base_config(num_codebooks=2, num_codebook_entries=320, codebook_dim=128)

    @arch("tiny")
    def tiny() -> SimplexVQWav2Vec2Config:
        return tiny_config()
