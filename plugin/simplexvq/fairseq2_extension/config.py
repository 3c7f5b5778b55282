"""The model family's configuration (wav2vec 2.0 plus a simplexvq quantizer section) and its archs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Final

from fairseq2.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2EncoderConfig
from fairseq2.models.wav2vec2.asr import Wav2Vec2AsrConfig
from fairseq2.runtime.config_registry import ConfigRegistrar
from fairseq2.runtime.dependency import DependencyContainer
from fairseq2.utils.validation import ValidationResult

import simplexvq
from simplexvq.spec import QuantizerSpec

SIMPLEXVQ_WAV2VEC2_FAMILY: Final = "wav2vec2_simplexvq"

PERPLEXITY_WEIGHT: Final = 0.1
"""Default weight of the ``*-perplexity`` baselines: wav2vec 2.0's diversity weight (alpha), which is also the
default ``diversity_loss_weight`` of fairseq2's wav2vec2 recipe, so those baselines keep wav2vec 2.0's objective."""


@dataclass(kw_only=True)
class QuantizerSection(QuantizerSpec):
    """The family's ``quantizer:`` section: the core's :class:`simplexvq.QuantizerSpec` (same fields, same
    meaning: a registered method name plus every :class:`simplexvq.QuantizerConfig` option such as ``knn_k``,
    ``knn_scope``, ``memory_efficient``, ``chunk_size``, ``vertex_subsample``), settable from a recipe's
    ``config_overrides`` and its command line.

    Only ``validate`` differs: fairseq2's config validator calls ``validate()`` on every nested dataclass and
    expects a ``ValidationResult``. The section's options are checked, with the shapes the model fixes, by
    :meth:`SimplexVQWav2Vec2Config.validate`; called with those shapes this method is the core's check.
    """

    def validate(self, **adapter_fields: Any) -> ValidationResult | None:  # type: ignore[override]
        if adapter_fields:
            return super().validate(**adapter_fields)
        return ValidationResult()  # fairseq2's traversal: the parent config reports this section's errors


@dataclass(kw_only=True)
class SimplexVQWav2Vec2Config(Wav2Vec2Config):
    """A wav2vec 2.0 config whose quantizer is a simplexvq quantizer; every other field keeps its fairseq2 meaning.

    The quantizer's shapes come from fairseq2's own fields: ``num_codebooks`` (G), ``num_codebook_entries`` (M)
    and ``quantized_dim`` (its output size, ``G x`` the codebook dimension); the Gumbel temperature schedule of the
    Gumbel methods from ``codebook_sampling_temperature``. Leave those unset (null) in ``quantizer``.
    """

    quantizer: QuantizerSection = field(default_factory=QuantizerSection)
    """The quantizer by registered name plus its options (:class:`simplexvq.QuantizerSpec`; a plain spec is
    accepted too); ``None`` options keep simplexvq's default for the method, except the ``*-perplexity`` baselines'
    ``regularizer_weight`` (0.1 here)."""

    inject_aux_loss: bool = True
    """Add the quantizer's auxiliary loss to the gradient from inside the model (see ``aux_loss.py``), so that
    fairseq2's own wav2vec2 trainer and criterion train with it. ``False``: add
    ``output.quantizer_output.aux_loss * num_targets`` to the loss yourself."""

    aux_loss_as_diversity: bool = True
    """Report the quantizer's auxiliary loss where fairseq2's wav2vec2 recipe reads its diversity loss: with the
    loss injected, ``Wav2Vec2Loss.diversity`` becomes ``aux_loss x num_targets`` (the KNN loss for the paper's
    method; the family's own diversity term has no gradient anyway) and ``aggregate`` the objective actually
    optimised, so the recipe's ``diversity_loss`` and ``loss`` metrics show them. Only the values change, never
    the gradient. ``False``: fairseq2's diversity value (a metric only)."""

    def __post_init__(self) -> None:
        if not isinstance(self.quantizer, QuantizerSection):
            if not isinstance(self.quantizer, QuantizerSpec):
                raise TypeError(
                    f"SimplexVQWav2Vec2Config.quantizer must be a simplexvq.QuantizerSpec, got "
                    f"{type(self.quantizer).__name__}"
                )
            values = {f.name: getattr(self.quantizer, f.name) for f in dataclasses.fields(QuantizerSpec)}
            self.quantizer = QuantizerSection(**values)

    def quantizer_adapter_fields(self) -> dict[str, Any]:
        """What this config fixes of the quantizer: its shapes and, for built-in methods, the Gumbel temperature
        schedule (fairseq2's ``max(start * decay**step, end)``) and the perplexity baselines' default weight."""
        fields: dict[str, Any] = {
            "dim": self.quantized_dim,
            "codebook_size": self.num_codebook_entries,
            "groups": self.num_codebooks,
        }
        method = self.quantizer.method
        if method in simplexvq.built_in_quantizers():
            start, end, decay = self.codebook_sampling_temperature
            fields["gumbel_temperature"] = {"start": start, "end": end, "decay": decay}
            perplexity = simplexvq.quantizer_traits(method).regularizer == "perplexity"
            if perplexity and self.quantizer.regularizer_weight is None:
                fields["regularizer_weight"] = PERPLEXITY_WEIGHT
        return fields

    def quantizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``simplexvq.build_quantizer(self.quantizer.method, ...)``: the spec's options plus
        :meth:`quantizer_adapter_fields` (an option set both ways differently is an error naming both)."""
        return self.quantizer.build_kwargs(**self.quantizer_adapter_fields())

    def validate(self) -> ValidationResult:
        """fairseq2's config validation hook (recipes and asset cards call it): reject a quantizer simplexvq
        would refuse, with the core's message, before any model is built."""
        result = ValidationResult()
        try:
            self.quantizer.validate(**self.quantizer_adapter_fields())
        except KeyError as error:
            result.add_error(f"`quantizer.method`: {error.args[0]}")
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


TINY_ASR_ARCH: Final = "simplexvq_tiny"
"""The ``wav2vec2_asr`` arch whose encoder matches this family's ``tiny`` arch (fairseq2's ASR recipe fine-tunes it
from a ``tiny`` checkpoint: ``model.arch=simplexvq_tiny``)."""


def tiny_encoder_config() -> Wav2Vec2EncoderConfig:
    """The encoder of the ``tiny`` arch: 3 conv layers (stride 20), 2 transformer layers of width 32, no dropout."""
    return Wav2Vec2EncoderConfig(
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


def tiny_config() -> SimplexVQWav2Vec2Config:
    """A 23k-parameter model for tests: :func:`tiny_encoder_config`, 2 x 16 codes of dimension 8; a
    forward/backward on a (2, 4000) batch takes a fraction of a second."""
    return SimplexVQWav2Vec2Config(
        encoder_config=tiny_encoder_config(),
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


def tiny_asr_config() -> Wav2Vec2AsrConfig:
    """fairseq2's ``base_10h`` ASR settings on the ``tiny`` encoder. Its feature masking spans fit the width of 32
    (fairseq2's default spatial span of 64 features cannot be placed twice in 32: "min_num_spans is 2, but ...")."""
    encoder = tiny_encoder_config()
    encoder.feature_grad_scale = 1.0  # as base_10h: fine-tuning trains the CNN at full rate
    return Wav2Vec2AsrConfig(
        encoder_config=encoder,
        temporal_mask_span_len=4,
        spatial_mask_span_len=4,
    )


def register_simplexvq_asr_configs(container: DependencyContainer) -> None:
    """Register ASR archs (fairseq2's ``wav2vec2_asr`` family) matching the family's archs without a fairseq2
    counterpart: ``simplexvq_tiny``. The BASE archs fine-tune with fairseq2's own ``base_10h`` / ``base_100h``."""
    arch = ConfigRegistrar(container, Wav2Vec2AsrConfig)

    @arch(TINY_ASR_ARCH)
    def simplexvq_tiny() -> Wav2Vec2AsrConfig:
        return tiny_asr_config()
