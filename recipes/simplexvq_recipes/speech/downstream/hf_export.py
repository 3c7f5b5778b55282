"""Export a pretrained wav2vec 2.0 to the Hugging Face format (``transformers.Wav2Vec2Model``).

    python -m simplexvq_recipes.speech.downstream.hf_export RUN_DIR OUT_DIR

``RUN_DIR`` is a run folder of the Accelerate speech recipe (its newest checkpoint, or one ``checkpoints/step_*``
folder) or the output folder of a fairseq2 wav2vec2 run with the ``wav2vec2_simplexvq`` family (its last
checkpoint). ``OUT_DIR`` receives what ``save_pretrained`` writes (``config.json``, ``model.safetensors``) plus
``preprocessor_config.json`` (16 kHz raw waveforms, not normalised), so that
``transformers.Wav2Vec2Model.from_pretrained(OUT_DIR)``, s3prl's ``hf_wav2vec2_custom`` upstream (SUPERB) and
ESPnet's Hugging Face frontends load it offline. Before anything is written, the export checks on a check signal
that the Hugging Face model's hidden states equal the project's own (:data:`DEFAULT_TOLERANCE`).

**Features, and the quantizer beside them.** The Hugging Face format describes wav2vec 2.0's Gumbel quantizer
(codevector logits from a linear layer), which cannot hold a simplexvq quantizer (cosine logits over a learnable
temperature, product codebooks, SimVQ's projection). The export therefore writes the encoder in the Hugging Face
format and the quantizer beside it, in ``simplexvq_quantizer.safetensors`` + ``simplexvq_quantizer.json``
(ignored by ``transformers``): :func:`load_quantizer` rebuilds it, and
``quantizer(projection(hf_output.extract_features)).indices`` gives the model's codes, ``quantizer.decode`` their
vectors. A third-party quantizer (not a :class:`simplexvq.ProductQuantizer`) is left out: features only.

Importing this module imports neither ``transformers`` nor fairseq2; each is imported when needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import simplexvq
from simplexvq_recipes.speech.downstream.export import check_signal

if TYPE_CHECKING:
    import transformers

SAMPLE_RATE = 16000
QUANTIZER_WEIGHTS = "simplexvq_quantizer.safetensors"
QUANTIZER_CONFIG = "simplexvq_quantizer.json"
QUANTIZER_FORMAT = "simplexvq.hf_export.quantizer"
DEFAULT_TOLERANCE = 1e-4
"""Largest absolute difference of hidden states (float32, CPU) allowed between the two implementations: the same
arithmetic in a different order (attention kernels, padding masks of -1e4 versus the dtype's minimum)."""


@dataclass
class ExportResult:
    """What :func:`export_run` wrote: the folder, the source kind, the measured largest hidden-state difference,
    and whether the quantizer was written beside the encoder."""

    out_dir: Path
    source: str
    max_difference: float
    quantizer: bool


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
# torchaudio (the Accelerate recipe) -> Hugging Face
# --------------------------------------------------------------------------------------------------------------


def torchaudio_shape(wav2vec2: nn.Module) -> EncoderShape:
    """The hyperparameters of a ``torchaudio.models.Wav2Vec2Model``, read from its modules."""
    blocks = list(wav2vec2.feature_extractor.conv_layers)
    norms = [type(block.layer_norm).__name__ if block.layer_norm is not None else None for block in blocks]
    if norms[0] == "GroupNorm" and all(norm is None for norm in norms[1:]):
        conv_norm = "group"
    elif all(norm == "LayerNorm" for norm in norms):
        conv_norm = "layer"
    else:
        raise ValueError(f"CNN normalisation {norms} has no Hugging Face counterpart (group norm first, or all layer)")
    transformer = wav2vec2.encoder.transformer
    layer = transformer.layers[0]
    positional = transformer.pos_conv_embed.conv
    return EncoderShape(
        conv_layers=tuple(
            (block.conv.out_channels, block.conv.kernel_size[0], block.conv.stride[0]) for block in blocks
        ),
        conv_bias=blocks[0].conv.bias is not None,
        conv_norm=conv_norm,
        hidden_size=wav2vec2.encoder.feature_projection.projection.out_features,
        num_layers=len(transformer.layers),
        num_heads=layer.attention.num_heads,
        ffn_dim=layer.feed_forward.intermediate_dense.out_features,
        pos_conv_kernel=positional.kernel_size[0],
        pos_conv_groups=positional.groups,
        layer_norm_first=bool(layer.layer_norm_first),  # torchaudio's Transformer stores the opposite flag
    )


def torchaudio_state_dict(
    wav2vec2: nn.Module, hf_keys: Sequence[str], mask_embedding: Tensor | None = None
) -> dict[str, Tensor]:
    """The weights of a torchaudio ``Wav2Vec2Model`` under Hugging Face names (``mask_embedding``: the masked
    frames' embedding, Hugging Face's ``masked_spec_embed``)."""
    state: dict[str, Tensor] = {}
    for name, tensor in wav2vec2.state_dict().items():
        if "pos_conv_embed.conv.parametrizations" in name or re.search(r"pos_conv_embed\.conv\.weight_[gv]$", name):
            continue  # weight-norm parts, added below under the target's names
        name = name.replace("encoder.feature_projection.", "feature_projection.")
        name = name.replace("encoder.transformer.", "encoder.")
        state[name] = tensor
    g, v = _weight_norm_parts(wav2vec2.encoder.transformer.pos_conv_embed.conv)
    _with_positional_conv(state, hf_keys, g, v)
    if mask_embedding is not None and "masked_spec_embed" in hf_keys:
        state["masked_spec_embed"] = mask_embedding
    return state


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


# --------------------------------------------------------------------------------------------------------------
# Hidden states of each implementation, for the check
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def hf_hidden_states(model: transformers.Wav2Vec2Model, waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
    """``hidden_states[1:]`` of a Hugging Face ``Wav2Vec2Model`` in eval mode: the output of every Transformer
    layer (for stable-layer-norm models the last one after the final layer norm)."""
    attention_mask = None
    if lengths is not None:
        attention_mask = (torch.arange(waveforms.shape[1])[None] < lengths[:, None]).long()
    output = model.eval()(waveforms, attention_mask=attention_mask, output_hidden_states=True)
    return list(output.hidden_states[1:])


@torch.no_grad()
def recipe_hidden_states(pretrainer: nn.Module, waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
    """The same layers from the Accelerate recipe's model (:meth:`Wav2Vec2Pretrainer.encode`)."""
    pretrainer.eval()
    num_layers = len(pretrainer.wav2vec2.encoder.transformer.layers)
    encoded = pretrainer.encode(waveforms, lengths, layers=list(range(1, num_layers + 1)))
    states = [encoded.layers[layer] for layer in range(1, num_layers + 1)]
    transformer = pretrainer.wav2vec2.encoder.transformer
    if transformer.layers[0].layer_norm_first:  # pre-norm: the encoder ends with a layer norm
        states[-1] = transformer.layer_norm(states[-1])
    return states


@torch.no_grad()
def fairseq2_hidden_states(model: nn.Module, waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
    """The same layers from a fairseq2 ``Wav2Vec2Model`` (frontend without masking, then the encoder)."""
    from fairseq2.nn import BatchLayout

    model.eval()
    layout = BatchLayout.of(waveforms, seq_lens=None if lengths is None else lengths.tolist())
    seqs, seqs_layout, _ = model.encoder_frontend.extract_features(waveforms, layout)
    seqs, _ = model.encoder_frontend.process_features(seqs, seqs_layout)
    states: list[Tensor] = []

    def keep(layer_idx: int, layer_output: Tensor, layer_output_layout: Any, num_layers: int) -> bool:
        states.append(layer_output)
        return True

    with model.encoder.register_layer_hook(keep):
        final = model.encoder(seqs, seqs_layout)
    if states:
        states[-1] = final  # the encoder's output: after the final layer norm of pre-norm encoders
    return states


def _check_batch() -> tuple[Tensor, Tensor]:
    """Two check signals, the second padded (its last 3000 samples are padding)."""
    waveforms = torch.cat([check_signal(16000, seed=0), check_signal(16000, seed=1)])
    lengths = torch.tensor([16000, 13000])
    waveforms[1, 13000:] = 0.0
    return waveforms, lengths


def max_hidden_state_difference(expected: list[Tensor], actual: list[Tensor], frames: Tensor | None) -> float:
    """Largest absolute difference over every layer and every unpadded frame (``frames``: (B,) valid frames)."""
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} reference layers but {len(actual)} Hugging Face layers")
    worst = 0.0
    for reference, exported in zip(expected, actual, strict=True):
        if reference.shape != exported.shape:
            raise ValueError(f"hidden states of shape {tuple(reference.shape)} versus {tuple(exported.shape)}")
        for row in range(reference.shape[0]):
            valid = reference.shape[1] if frames is None else int(frames[row])
            worst = max(worst, float((reference[row, :valid] - exported[row, :valid]).abs().max()))
    return worst


def _frames(model: transformers.Wav2Vec2Model, lengths: Tensor) -> Tensor:
    return model._get_feat_extract_output_lengths(lengths)


# --------------------------------------------------------------------------------------------------------------
# The quantizer beside the encoder
# --------------------------------------------------------------------------------------------------------------


def save_quantizer(out_dir: Path, projection: nn.Module, quantizer: nn.Module) -> bool:
    """Write ``projection`` (layer-normalised CNN features -> quantizer input) and a built-in quantizer (its
    ``QuantizerConfig`` as JSON, its weights as safetensors). Returns False for a third-party quantizer."""
    if not isinstance(quantizer, simplexvq.ProductQuantizer):
        return False
    weight, bias = projection.weight, projection.bias  # torch's or fairseq2's Linear
    tensors = {"projection.weight": weight} | ({} if bias is None else {"projection.bias": bias})
    tensors.update({f"quantizer.{name}": t for name, t in quantizer.state_dict().items()})
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, str(out_dir / QUANTIZER_WEIGHTS))
    description = {
        "format": QUANTIZER_FORMAT,
        "quantizer_config": dataclasses.asdict(quantizer.config),
        "projection": {"in_features": weight.shape[1], "out_features": weight.shape[0], "bias": bias is not None},
        "usage": "codes = quantizer(projection(Wav2Vec2Model(...).extract_features)).indices",
    }
    (out_dir / QUANTIZER_CONFIG).write_text(json.dumps(description, indent=2) + "\n")
    return True


def load_quantizer(folder: str | Path) -> tuple[nn.Linear, simplexvq.ProductQuantizer]:
    """``(projection, quantizer)`` written beside a Hugging Face export (both in eval mode): the quantizer's input
    is ``projection(output.extract_features)`` of ``transformers.Wav2Vec2Model``."""
    folder = Path(folder)
    config_file = folder / QUANTIZER_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} is missing: this export holds the encoder only (a third-party quantizer, or not an "
            "export of simplexvq_recipes.speech.downstream.hf_export)"
        )
    description = json.loads(config_file.read_text())
    if description.get("format") != QUANTIZER_FORMAT:
        raise ValueError(
            f"{config_file} is not a simplexvq quantizer description (format {description.get('format')!r})"
        )
    quantizer = simplexvq.ProductQuantizer(simplexvq.QuantizerConfig(**description["quantizer_config"]))
    projection = nn.Linear(**description["projection"])
    tensors = load_file(str(folder / QUANTIZER_WEIGHTS))
    projection.load_state_dict(
        {k.removeprefix("projection."): v for k, v in tensors.items() if k.startswith("projection.")}
    )
    quantizer.load_state_dict(
        {k.removeprefix("quantizer."): v for k, v in tensors.items() if k.startswith("quantizer.")}
    )
    return projection.eval(), quantizer.eval()


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


def _build_hf(config: transformers.Wav2Vec2Config, make_state: Any) -> transformers.Wav2Vec2Model:
    import transformers

    model = transformers.Wav2Vec2Model(config)
    keys = list(model.state_dict())
    model.load_state_dict(make_state(keys), strict=True)  # every weight mapped, none left over
    return model.eval()


def _save(
    hf_model: transformers.Wav2Vec2Model,
    out_dir: Path,
    reference: list[Tensor],
    lengths: Tensor,
    tolerance: float,
) -> float:
    """Check the in-memory model, write it, reload it from disk as a user would and check again."""
    import transformers

    waveforms, _ = _check_batch()
    frames = _frames(hf_model, lengths)
    difference = max_hidden_state_difference(reference, hf_hidden_states(hf_model, waveforms, lengths), frames)
    if not difference <= tolerance:
        raise RuntimeError(f"the Hugging Face model's hidden states differ from the original's by {difference:.3g}")
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=False, return_attention_mask=True
    ).save_pretrained(out_dir)
    reloaded = transformers.Wav2Vec2Model.from_pretrained(out_dir, local_files_only=True)
    reloaded_difference = max_hidden_state_difference(reference, hf_hidden_states(reloaded, waveforms, lengths), frames)
    if not reloaded_difference <= tolerance:
        raise RuntimeError(f"the reloaded export's hidden states differ by {reloaded_difference:.3g}")
    return max(difference, reloaded_difference)


def export_recipe_model(
    pretrainer: nn.Module, out_dir: str | Path, *, tolerance: float = DEFAULT_TOLERANCE
) -> ExportResult:
    """Export a :class:`~simplexvq_recipes.speech.pretraining.model.Wav2Vec2Pretrainer` (the Accelerate recipe)."""
    out_dir = Path(out_dir)
    wav2vec2 = pretrainer.wav2vec2
    quantizer = pretrainer.quantizer
    codebook: dict[str, int] = {}
    if isinstance(quantizer, simplexvq.ProductQuantizer):
        codebook = {
            "num_codevector_groups": quantizer.config.groups,
            "num_codevectors_per_group": quantizer.config.codebook_size,
        }
    config = hf_config(
        torchaudio_shape(wav2vec2),
        codevector_dim=pretrainer.quantizer_input.out_features,
        proj_codevector_dim=pretrainer.project_q.out_features,
        **codebook,
    )
    hf_model = _build_hf(config, lambda keys: torchaudio_state_dict(wav2vec2, keys, pretrainer.mask_embedding))
    waveforms, lengths = _check_batch()
    reference = recipe_hidden_states(pretrainer, waveforms, lengths)
    difference = _save(hf_model, out_dir, reference, lengths, tolerance)
    wrote_quantizer = save_quantizer(out_dir, pretrainer.quantizer_input, quantizer)
    return ExportResult(out_dir, "simplexvq_recipes.speech", difference, wrote_quantizer)


def export_fairseq2_model(
    model: nn.Module, config: Any, out_dir: str | Path, *, tolerance: float = DEFAULT_TOLERANCE
) -> ExportResult:
    """Export a fairseq2 ``Wav2Vec2Model`` of the ``wav2vec2_simplexvq`` family (or fairseq2's own wav2vec2, whose
    Gumbel quantizer is left out) built from ``config``."""
    out_dir = Path(out_dir)
    hf = hf_config(
        fairseq2_shape(config),
        num_codevector_groups=config.num_codebooks,
        num_codevectors_per_group=config.num_codebook_entries,
        codevector_dim=config.quantized_dim,
        proj_codevector_dim=config.final_dim,
    )
    hf_model = _build_hf(hf, lambda keys: fairseq2_state_dict(model, keys))
    waveforms, lengths = _check_batch()
    reference = fairseq2_hidden_states(model, waveforms, lengths)
    difference = _save(hf_model, out_dir, reference, lengths, tolerance)
    from simplexvq.fairseq2_extension import SimplexVQWav2Vec2Quantizer

    quantizer = model.quantizer
    wrote_quantizer = isinstance(quantizer, SimplexVQWav2Vec2Quantizer) and save_quantizer(
        out_dir, quantizer.input_proj, quantizer.core
    )
    return ExportResult(out_dir, "fairseq2", difference, wrote_quantizer)


def _fairseq2_checkpoint_dir(run_dir: Path) -> Path | None:
    """The ``checkpoints`` folder of a fairseq2 run (it holds ``model.yaml``), or None."""
    for candidate in (run_dir, run_dir / "checkpoints"):
        if (candidate / "model.yaml").is_file():
            return candidate
    return None


def load_fairseq2_checkpoint(checkpoint_dir: Path) -> tuple[nn.Module, Any]:
    """``(model, config)`` of the last checkpoint of a fairseq2 run (the ``wav2vec2_simplexvq`` family or
    fairseq2's ``wav2vec2``), through fairseq2's own loader. fairseq2 initialises once per process."""
    import fairseq2
    from fairseq2.composition import register_checkpoint_models
    from fairseq2.device import CPU
    from fairseq2.error import InvalidOperationError
    from fairseq2.models.wav2vec2 import get_wav2vec2_model_hub

    from simplexvq.fairseq2_extension import SIMPLEXVQ_WAV2VEC2_FAMILY, get_simplexvq_wav2vec2_model_hub

    try:
        fairseq2.init_fairseq2(extras=lambda c: register_checkpoint_models(c, checkpoint_dir), no_progress=True)
    except InvalidOperationError as error:
        raise RuntimeError(
            "fairseq2 is already initialised in this process, so the checkpoint cannot be registered; run the "
            "export in a fresh process (python -m simplexvq_recipes.speech.downstream.hf_export RUN_DIR OUT_DIR) "
            "or call export_fairseq2_model(model, config, out_dir)"
        ) from error
    family = _model_family(checkpoint_dir / "model.yaml")
    if family == SIMPLEXVQ_WAV2VEC2_FAMILY:
        hub = get_simplexvq_wav2vec2_model_hub()
    elif family == "wav2vec2":
        hub = get_wav2vec2_model_hub()
    else:
        raise ValueError(f"{checkpoint_dir} holds a {family!r} model; export handles wav2vec2 and wav2vec2_simplexvq")
    return hub.load_model("last_checkpoint", device=CPU), hub.get_model_config("last_checkpoint")


def _model_family(model_yaml: Path) -> str | None:
    """The ``model_family`` line of fairseq2's ``model.yaml`` (read as text: nothing is evaluated)."""
    match = re.search(r"^model_family:\s*(\S+)\s*$", model_yaml.read_text(), flags=re.MULTILINE)
    return match.group(1).strip("'\"") if match else None


def export_run(run_dir: str | Path, out_dir: str | Path, *, tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Export the newest checkpoint of a run folder of either recipe (see the module docstring)."""
    run_dir = Path(run_dir)
    checkpoint_dir = _fairseq2_checkpoint_dir(run_dir)
    if checkpoint_dir is not None:
        model, config = load_fairseq2_checkpoint(checkpoint_dir)
        return export_fairseq2_model(model, config, out_dir, tolerance=tolerance)
    from simplexvq_recipes.speech.pretraining.model import load_pretrained

    model, _ = load_pretrained(run_dir)
    return export_recipe_model(model, out_dir, tolerance=tolerance)


def main(argv: Sequence[str] | None = None) -> ExportResult:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a speech recipe run (or checkpoints/step_*) or a fairseq2 run")
    parser.add_argument("out_dir", type=Path, help="output folder for save_pretrained")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest hidden-state difference")
    args = parser.parse_args(argv)
    try:
        result = export_run(args.run_dir, args.out_dir, tolerance=args.tolerance)
    except FileNotFoundError as error:
        parser.exit(1, f"error: {error}\n")
    extra = f"; quantizer in {QUANTIZER_CONFIG}" if result.quantizer else "; features only (no simplexvq quantizer)"
    print(
        f"exported {result.source} model to {result.out_dir} (hidden states within {result.max_difference:.2g} "
        f"of the original){extra}; load it with transformers.Wav2Vec2Model.from_pretrained('{result.out_dir}')"
    )
    return result


if __name__ == "__main__":
    main()
