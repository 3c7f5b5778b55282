"""Export the pretrained encoder as a plain torchaudio ``Wav2Vec2Model`` (CNN + Transformer, no pretraining head).

    python -m simplexvq_recipes.speech.downstream.export RUN_DIR_OR_CHECKPOINT encoder.pt

The file is a ``torch.save`` dict that needs neither simplexvq nor its configs to load:

* ``hyperparameters``: keyword arguments of :func:`torchaudio.models.wav2vec2_model`;
* ``state_dict``: the model's weights (``feature_extractor.*``, ``encoder.*``);
* ``format`` / ``version``: what wrote it.

Load it back with :func:`load_exported` (or by hand:
``wav2vec2_model(**d["hyperparameters"]).load_state_dict(d["state_dict"])``), then use torchaudio's API:
``model.extract_features(waveforms, lengths)`` gives the outputs of every Transformer layer, ``model(waveforms)``
the final (layer-normalised) features. Before writing, the export checks on a check signal that the rebuilt model
gives exactly the features of the original.

``--torchscript encoder.ts`` also writes a TorchScript archive (``torch.jit.load``, usable from C++). Script a
model yourself with :func:`script_encoder`, not ``torch.jit.script(model.wav2vec2)``: torchaudio's scripting folds
the positional convolution's weight norm into a plain weight *in place*, after which the live model's
``state_dict`` no longer loads into ``build_wav2vec2`` (a ``copy.deepcopy`` shares the class that loses its
``weight``); :func:`script_encoder` scripts a model rebuilt from the exported weights.
"""

from __future__ import annotations

import argparse
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchaudio
from torch import Tensor

from simplexvq_recipes.speech.pretraining.config import ModelConfig
from simplexvq_recipes.speech.pretraining.model import Wav2Vec2Pretrainer, load_pretrained
from simplexvq_recipes.training.atomic import atomic_write_bytes

FORMAT = "simplexvq.torchaudio_wav2vec2"
LOADER = "simplexvq_recipes.speech.downstream.export.load_exported"
VERSION = 1


def torchaudio_hyperparameters(config: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of :func:`torchaudio.models.wav2vec2_model` that build the recipe's encoder."""
    return {
        "extractor_mode": config.extractor_mode,
        "extractor_conv_layer_config": [tuple(int(v) for v in layer) for layer in config.conv_layers],
        "extractor_conv_bias": config.conv_bias,
        "encoder_embed_dim": config.embed_dim,
        "encoder_projection_dropout": config.input_dropout,
        "encoder_pos_conv_kernel": config.pos_conv_kernel,
        "encoder_pos_conv_groups": config.pos_conv_groups,
        "encoder_num_layers": config.num_layers,
        "encoder_num_heads": config.num_heads,
        "encoder_attention_dropout": config.attention_dropout,
        "encoder_ff_interm_features": config.ffn_dim,
        "encoder_ff_interm_dropout": config.activation_dropout,
        "encoder_dropout": config.dropout,
        "encoder_layer_norm_first": config.layer_norm_first,
        "encoder_layer_drop": config.layer_drop,
        "aux_num_out": None,
    }


def export_state(model: Wav2Vec2Pretrainer) -> dict[str, Any]:
    """The exported dict of a pretrainer: hyperparameters and a CPU copy of ``model.wav2vec2``'s weights."""
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.wav2vec2.state_dict().items()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "torchaudio_version": torchaudio.__version__,
        "hyperparameters": torchaudio_hyperparameters(model.config),
        "state_dict": state,
    }


def build_exported(exported: dict[str, Any]) -> torchaudio.models.Wav2Vec2Model:
    """Rebuild the torchaudio model of an exported dict (eval mode); strict loading: every weight must fit."""
    if exported.get("format") != FORMAT:
        raise ValueError(f"not an exported simplexvq encoder (format {exported.get('format')!r}, want {FORMAT!r})")
    if exported.get("version", 0) > VERSION:
        raise ValueError(f"exported with a newer format version {exported['version']} (this code reads {VERSION})")
    hyperparameters = dict(exported["hyperparameters"])
    hyperparameters["extractor_conv_layer_config"] = [tuple(x) for x in hyperparameters["extractor_conv_layer_config"]]
    model = torchaudio.models.wav2vec2_model(**hyperparameters)
    model.load_state_dict(exported["state_dict"], strict=True)
    return model.eval()


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> torchaudio.models.Wav2Vec2Model:
    """Load a file written by :func:`export` as a torchaudio ``Wav2Vec2Model`` in eval mode."""
    exported = torch.load(str(path), map_location=map_location, weights_only=True)
    return build_exported(exported).to(map_location)


def script_encoder(model: Wav2Vec2Pretrainer) -> torch.jit.ScriptModule:
    """TorchScript of a pretrainer's encoder (``model.wav2vec2``) in eval mode, compiled from a rebuilt copy.

    torchaudio prepares its positional convolution for scripting by removing the weight norm from the module
    itself, which renames the live model's weights (``...conv.parametrizations.weight.*`` -> ``...conv.weight``)
    so that its ``state_dict`` no longer loads into ``build_wav2vec2``. A ``copy.deepcopy`` does not protect the
    original either: the copy shares the parametrized class, whose ``weight`` property the removal deletes. So the
    encoder is rebuilt from its hyperparameters and weights (:func:`export_state`) and that model is scripted.
    """
    if not isinstance(model, Wav2Vec2Pretrainer):
        raise TypeError(f"script_encoder expects a Wav2Vec2Pretrainer (load_pretrained), got {type(model).__name__}")
    return torch.jit.script(build_exported(export_state(model)))


def check_signal(num_samples: int = 16000, seed: int = 0) -> Tensor:
    """A deterministic 1 s test waveform (two chirps plus a little noise) of shape (1, num_samples)."""
    t = torch.arange(num_samples, dtype=torch.float64) / 16000
    signal = 0.4 * torch.sin(2 * math.pi * (200 + 400 * t) * t) + 0.2 * torch.sin(2 * math.pi * (1500 - 300 * t) * t)
    noise = torch.randn(num_samples, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (signal + 0.01 * noise).float()[None]


@torch.no_grad()
def max_feature_difference(
    reference: torchaudio.models.Wav2Vec2Model, exported: torchaudio.models.Wav2Vec2Model, waveforms: Tensor
) -> float:
    """Largest absolute difference between the ``extract_features`` outputs (every layer) of two models."""
    expected, _ = reference.extract_features(waveforms)
    actual, _ = exported.extract_features(waveforms)
    return max(float((a - b).abs().max()) for a, b in zip(expected, actual, strict=True))


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tolerance: float = 0.0,
    torchscript: str | Path | None = None,
    torchscript_tolerance: float = 1e-5,
) -> Path:
    """Export a run's encoder to ``out`` (and, with ``torchscript``, a TorchScript archive there); raises if a
    written model's features differ from the original's on :func:`check_signal` by more than its tolerance (the
    scripted model computes the weight-normed positional convolution once, so it may differ by rounding)."""
    model, _ = load_pretrained(checkpoint)
    exported = export_state(model)
    rebuilt = build_exported(exported)
    difference = max_feature_difference(model.wav2vec2.eval(), rebuilt, check_signal())
    if difference > tolerance:
        raise RuntimeError(f"the exported model's features differ from the original's by {difference:.3g}")
    if torchscript is not None:
        scripted = script_encoder(model)
        difference = max_feature_difference(model.wav2vec2, scripted, check_signal())
        if difference > torchscript_tolerance:
            raise RuntimeError(f"the TorchScript model's features differ from the original's by {difference:.3g}")
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        atomic_write_bytes(torchscript, buffer.getvalue())
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    return Path(out)


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder (its newest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument("out", type=Path, help="output file (.pt)")
    parser.add_argument("--torchscript", type=Path, help="also write a TorchScript archive of the encoder here")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, torchscript=args.torchscript)
    except FileNotFoundError as error:
        parser.exit(1, f"error: {error}\n")
    size = out.stat().st_size / 2**20
    print(f"exported torchaudio Wav2Vec2Model ({size:.1f} MiB) -> {out}; load it with {LOADER}")
    if args.torchscript is not None:
        print(f"TorchScript encoder -> {args.torchscript}; load it with torch.jit.load")
    return out


if __name__ == "__main__":
    main()
