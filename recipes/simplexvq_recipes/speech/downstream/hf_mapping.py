"""How fairseq2's wav2vec 2.0 encoder (the ``wav2vec2_simplexvq`` family, or fairseq2's own ``wav2vec2``) maps onto
``transformers.Wav2Vec2Model``: its config and its parameter names. Used by
:mod:`simplexvq_recipes.speech.downstream.hf_export` (the Accelerate recipe's encoder already is a
``transformers.Wav2Vec2Model`` and needs no mapping).

Importing this module imports neither ``transformers`` nor fairseq2 nor torchaudio; each is imported when needed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    import transformers

# --------------------------------------------------------------------------------------------------------------
# The Hugging Face config
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderShape:
    """The hyperparameters a Hugging Face ``Wav2Vec2Config`` needs, read from either implementation."""

    conv_layers: tuple[tuple[int, int, int], ...]
    """(channels, kernel, stride) per CNN layer."""
    conv_bias: bool
    conv_norm: str
    """``group``: group norm after the first CNN layer only (BASE); ``layer``: layer norm after every CNN layer."""
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    pos_conv_kernel: int
    pos_conv_groups: int
    layer_norm_first: bool


def hf_config(shape: EncoderShape, **quantizer_fields: int) -> transformers.Wav2Vec2Config:
    """A ``transformers.Wav2Vec2Config`` of that encoder. Dropouts keep the Hugging Face defaults (they only act in
    training); ``quantizer_fields`` (``num_codevector_groups`` etc.) are informative: no quantizer weights go in."""
    import transformers

    return transformers.Wav2Vec2Config(
        conv_dim=[layer[0] for layer in shape.conv_layers],
        conv_kernel=[layer[1] for layer in shape.conv_layers],
        conv_stride=[layer[2] for layer in shape.conv_layers],
        conv_bias=shape.conv_bias,
        feat_extract_norm=shape.conv_norm,
        feat_extract_activation="gelu",
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        intermediate_size=shape.ffn_dim,
        hidden_act="gelu",
        num_conv_pos_embeddings=shape.pos_conv_kernel,
        num_conv_pos_embedding_groups=shape.pos_conv_groups,
        do_stable_layer_norm=shape.layer_norm_first,
        layer_norm_eps=1e-5,
        architectures=["Wav2Vec2Model"],
        **quantizer_fields,
    )


def _weight_norm_parts(conv: nn.Module) -> tuple[Tensor, Tensor]:
    """(g, v) of a weight-normalised convolution, whichever weight-norm API built it."""
    parametrizations = getattr(conv, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        return parametrizations.weight.original0, parametrizations.weight.original1
    return conv.weight_g, conv.weight_v


def _with_positional_conv(state: dict[str, Tensor], hf_keys: Sequence[str], g: Tensor, v: Tensor) -> None:
    """Add the positional convolution's weight-norm parts under the target model's own names."""
    for key in hf_keys:
        if "pos_conv_embed.conv." not in key or key.endswith(".bias"):
            continue
        if key.endswith(("weight_g", "original0")):
            state[key] = g
        elif key.endswith(("weight_v", "original1")):
            state[key] = v


# --------------------------------------------------------------------------------------------------------------
# fairseq2 (the wav2vec2_simplexvq family, or fairseq2's own wav2vec2) -> Hugging Face
# --------------------------------------------------------------------------------------------------------------

_FAIRSEQ2_NAMES: tuple[tuple[str, str], ...] = (
    (r"^encoder_frontend\.feature_extractor\.layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.conv."),
    (
        r"^encoder_frontend\.feature_extractor\.layers\.(\d+)\.(group|layer)_norm\.",
        r"feature_extractor.conv_layers.\1.layer_norm.",
    ),
    (r"^encoder_frontend\.post_extract_layer_norm\.", "feature_projection.layer_norm."),
    (r"^encoder_frontend\.model_dim_proj\.", "feature_projection.projection."),
    (r"^encoder_frontend\.pos_encoder\.conv\.bias$", "encoder.pos_conv_embed.conv.bias"),
    (r"^encoder_frontend\.layer_norm\.", "encoder.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.output_proj\.", r"encoder.layers.\1.attention.out_proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"encoder.layers.\1.attention.\2_proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.ffn\.inner_proj\.", r"encoder.layers.\1.feed_forward.intermediate_dense."),
    (r"^encoder\.layers\.(\d+)\.ffn\.output_proj\.", r"encoder.layers.\1.feed_forward.output_dense."),
    (r"^encoder\.layers\.(\d+)\.ffn_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
    (r"^masker\.temporal_mask_embed$", "masked_spec_embed"),
)
"""fairseq2 ``Wav2Vec2Model`` parameter names -> Hugging Face ``Wav2Vec2Model`` ones (the encoder; the
pretraining head, ``final_proj`` / ``final_target_proj`` / ``quantizer``, has no place in ``Wav2Vec2Model``)."""

_FAIRSEQ2_HEAD = re.compile(
    r"^(final_proj|final_target_proj|quantizer)\.|^encoder_frontend\.pos_encoder\.conv\.weight_[gv]$"
)


def fairseq2_shape(config: Any) -> EncoderShape:
    """The hyperparameters of a fairseq2 ``Wav2Vec2Config`` (or the family's config); raises for encoder variants
    the Hugging Face ``Wav2Vec2Model`` cannot express (filterbank input, Conformer, relative positions)."""
    from fairseq2.models.transformer import TransformerNormOrder

    encoder = config.encoder_config
    unsupported = {
        "use_fbank": encoder.use_fbank,
        "use_conformer": encoder.use_conformer,
        "pos_encoder_type": encoder.pos_encoder_type != "conv",
        "pos_encoder_depth": encoder.pos_encoder_depth != 1,
        "layer_norm_features": not encoder.layer_norm_features,
        # fairseq2's pre-norm encoder also normalises after the positional convolution; transformers' does not
        "norm_order": encoder.norm_order != TransformerNormOrder.POST,
    }
    bad = [name for name, value in unsupported.items() if value]
    if bad:
        raise ValueError(
            f"encoder_config fields {bad} describe an encoder that transformers' Wav2Vec2Model cannot hold; export "
            "supports post-norm wav2vec 2.0 encoders: fairseq2's base arch and this family's archs"
        )
    return EncoderShape(
        conv_layers=tuple(tuple(int(v) for v in layer) for layer in encoder.feature_extractor_layer_descs),
        conv_bias=encoder.feature_extractor_bias,
        conv_norm="layer" if encoder.feature_extractor_layer_norm_convs else "group",
        hidden_size=encoder.model_dim,
        num_layers=encoder.num_encoder_layers,
        num_heads=encoder.num_encoder_attn_heads,
        ffn_dim=encoder.ffn_inner_dim,
        pos_conv_kernel=encoder.pos_conv_kernel_size,
        pos_conv_groups=encoder.num_pos_conv_groups,
        layer_norm_first=False,
    )


def fairseq2_state_dict(model: nn.Module, hf_keys: Sequence[str]) -> dict[str, Tensor]:
    """The encoder weights of a fairseq2 ``Wav2Vec2Model`` under Hugging Face names."""
    state: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        if _FAIRSEQ2_HEAD.search(name):
            continue
        for pattern, replacement in _FAIRSEQ2_NAMES:
            renamed, count = re.subn(pattern, replacement, name)
            if count:
                state[renamed] = tensor
                break
        else:
            raise ValueError(f"fairseq2 parameter {name!r} has no Hugging Face Wav2Vec2Model counterpart")
    g, v = _weight_norm_parts(model.encoder_frontend.pos_encoder.conv)
    _with_positional_conv(state, hf_keys, g, v)
    return state
