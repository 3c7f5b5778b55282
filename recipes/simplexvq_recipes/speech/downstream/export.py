"""Export the pretrained encoder as a plain torchaudio ``Wav2Vec2Model`` (CNN + Transformer, no pretraining head),
for code built on torchaudio. torchaudio is optional: the recipe's encoder is transformers' ``Wav2Vec2Model``
(:mod:`~simplexvq_recipes.speech.downstream.hf_export` writes it in its own format); this export needs a torchaudio
that loads beside the installed torch, and says what to install where there is none.

    python -m simplexvq_recipes.speech.downstream.export RUN_DIR_OR_CHECKPOINT encoder.pt

The file is a ``torch.save`` dict that needs neither simplexvq nor its configs to load:

* ``hyperparameters``: keyword arguments of :func:`torchaudio.models.wav2vec2_model`;
* ``state_dict``: the model's weights (``feature_extractor.*``, ``encoder.*``; torchaudio's names);
* ``format`` / ``version``: what wrote it.

Load it back with :func:`load_exported` (or by hand:
``wav2vec2_model(**d["hyperparameters"]).load_state_dict(d["state_dict"])``), then use torchaudio's API:
``model.extract_features(waveforms, lengths)`` gives the outputs of every Transformer layer, ``model(waveforms)``
the final features. Before writing, the export checks on a padded check batch that torchaudio's model gives the
run's hidden states (:data:`DEFAULT_TOLERANCE`: the two libraries' attention kernels round differently).

``--torchscript encoder.ts`` also writes a TorchScript archive of the torchaudio model (``torch.jit.load``, usable
from C++), scripted from a model rebuilt from the exported weights (:func:`script_encoder`).

This module also holds what both exports share: :func:`check_signal` and :func:`check_output_folder` (an export
never writes into a run or checkpoint folder). Importing it imports neither torchaudio nor transformers.
"""

from __future__ import annotations

import argparse
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from simplexvq_recipes.speech.pretraining.config import ModelConfig, PretrainConfig
from simplexvq_recipes.training.atomic import atomic_write_bytes

if TYPE_CHECKING:
    import torchaudio

    from simplexvq_recipes.speech.pretraining.model import Wav2Vec2Pretrainer

FORMAT = "simplexvq.torchaudio_wav2vec2"
LOADER = "simplexvq_recipes.speech.downstream.export.load_exported"
VERSION = 1
DEFAULT_TOLERANCE = 1e-4
"""Largest absolute difference of hidden states (float32, CPU) allowed between transformers' and torchaudio's
wav2vec 2.0 on the same weights: the same arithmetic in another order (attention kernels, padding masks)."""
TORCHAUDIO_LAST_RELEASE = (2, 11)


class ExportError(ValueError):
    """A problem with the export's input or output that the user fixes (printed as one line by the commands)."""


# --------------------------------------------------------------------------------------------------------------
# What both exports share
# --------------------------------------------------------------------------------------------------------------


def check_signal(num_samples: int = 16000, seed: int = 0) -> Tensor:
    """A deterministic 1 s test waveform (two chirps plus a little noise) of shape (1, num_samples)."""
    t = torch.arange(num_samples, dtype=torch.float64) / 16000
    signal = 0.4 * torch.sin(2 * math.pi * (200 + 400 * t) * t) + 0.2 * torch.sin(2 * math.pi * (1500 - 300 * t) * t)
    noise = torch.randn(num_samples, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (signal + 0.01 * noise).float()[None]


def check_batch() -> tuple[Tensor, Tensor]:
    """Two check signals, the second padded (its last 3000 samples are padding)."""
    waveforms = torch.cat([check_signal(16000, seed=0), check_signal(16000, seed=1)])
    lengths = torch.tensor([16000, 13000])
    waveforms[1, 13000:] = 0.0
    return waveforms, lengths


def _run_or_checkpoint_kind(folder: Path) -> str | None:
    """What training output ``folder`` is, if any: a recipe run folder or checkpoint, a fairseq2 run or checkpoint."""
    if (folder / "trainer_state.json").is_file():
        return "a checkpoint folder"
    if folder.name.startswith("step_") and folder.parent.name == "checkpoints":
        return "a checkpoint folder"
    run_files = ("train.log", "results.json", "history.json")
    if (folder / "checkpoints").is_dir() or (
        (folder / "config.yaml").is_file() and any((folder / name).is_file() for name in run_files)
    ):
        return "a run folder"
    if (folder / "model.yaml").is_file() or (folder.name == "checkpoints" and any(folder.glob("step_*"))):
        return "a checkpoints folder"
    return None


def _descendants(folder: Path, depth: int) -> Iterable[Path]:
    """Sub-folders of ``folder`` down to ``depth`` levels (symbolic links not followed)."""
    if depth == 0:
        return
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield Path(entry.path)
            yield from _descendants(Path(entry.path), depth - 1)


def check_output_folder(
    out_dir: str | Path, sources: Sequence[str | Path] = (), *, refuse_holding: bool = True
) -> None:
    """Refuse (:class:`ExportError`, one line, before anything is written) to write an export into ``out_dir``
    when it is or lies inside a run or checkpoint folder or one of ``sources``, or holds one of ``sources`` or
    (``refuse_holding``: an export folder, whose files replace what is there) any run or checkpoint folder: an
    export must never replace what a resume or another export reads."""
    out = Path(out_dir).resolve()
    for source in sources:
        source = Path(source).resolve()
        if out == source or source in out.parents:
            raise ExportError(f"refusing to export into {out_dir}: it is or lies inside the source {source}")
        if refuse_holding and out in source.parents:
            raise ExportError(f"refusing to export into {out_dir}: it holds the source {source}")
    for folder in (out, *out.parents):
        kind = _run_or_checkpoint_kind(folder)
        if kind is not None:
            raise ExportError(
                f"refusing to export into {out_dir}: {folder} is {kind}; choose an output folder outside it"
            )
    if refuse_holding and out.is_dir():
        for folder in _descendants(out, depth=3):
            kind = _run_or_checkpoint_kind(folder)
            if kind is not None:
                raise ExportError(
                    f"refusing to export into {out_dir}: it holds {kind} ({folder}); choose an empty or new folder"
                )


def load_speech_run(path: str | Path) -> tuple[Wav2Vec2Pretrainer, PretrainConfig]:
    """:func:`~simplexvq_recipes.speech.pretraining.model.load_pretrained`, with one clear line (:class:`ExportError`)
    for a run of another recipe (the vision recipe) instead of a config error."""
    import yaml

    from simplexvq_recipes.speech.pretraining.model import (
        checkpoint_config_file,
        load_pretrained,
        resolve_checkpoint,
    )

    run_dir, checkpoint = resolve_checkpoint(path)
    try:
        config_file = checkpoint_config_file(run_dir, checkpoint)
    except FileNotFoundError as error:
        raise ExportError(str(error)) from error
    try:
        saved = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ExportError(f"{config_file} is not valid YAML ({error.__class__.__name__})") from error
    data = saved.get("data") if isinstance(saved, dict) else None
    if isinstance(saved, dict) and ("eval" in saved or (isinstance(data, dict) and "image_size" in data)):
        raise ExportError(
            f"{path} is a run of the vision recipe (its {config_file.name} has vision settings); this export takes "
            "wav2vec 2.0 runs of the speech recipe"
        )
    try:
        return load_pretrained(path)
    except ValueError as error:
        raise ExportError(f"{path} is not a speech recipe run that this version can read: {error}") from error


# --------------------------------------------------------------------------------------------------------------
# torchaudio
# --------------------------------------------------------------------------------------------------------------


def torchaudio_install_hint() -> str:
    """What to install for torchaudio beside the torch of this environment."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    last = ".".join(map(str, TORCHAUDIO_LAST_RELEASE))
    if (major, minor) <= TORCHAUDIO_LAST_RELEASE:
        return f"pip install 'torchaudio=={major}.{minor}.*' beside torch {major}.{minor}"
    return (
        f"torchaudio's last release is {last} and has no build for torch {major}.{minor}: use the Hugging Face export "
        "(python -m simplexvq_recipes.speech.downstream.hf_export) or run this one beside torch <= "
        f"{last} with the torchaudio of the same version"
    )


def import_torchaudio() -> Any:
    """``torchaudio``, or an ImportError whose one line says what to install."""
    try:
        import torchaudio
    except (ImportError, OSError) as error:
        raise ImportError(
            f"torchaudio is not installed or does not load beside torch {torch.__version__} "
            f"({error.__class__.__name__}): {torchaudio_install_hint()}"
        ) from error
    return torchaudio


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


_HF_TO_TORCHAUDIO = (("feature_projection.", "encoder.feature_projection."), ("encoder.", "encoder.transformer."))


def torchaudio_state_dict(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A transformers ``Wav2Vec2Model`` state dict under torchaudio's names (the mask embedding left out): the two
    libraries name every module alike below ``encoder.feature_projection`` / ``encoder.transformer``."""
    state: dict[str, Tensor] = {}
    for name, tensor in hf_state.items():
        if name == "masked_spec_embed":
            continue
        for hf_prefix, torchaudio_prefix in _HF_TO_TORCHAUDIO:
            if name.startswith(hf_prefix):
                name = torchaudio_prefix + name.removeprefix(hf_prefix)
                break
        state[name] = tensor.detach().cpu().clone()
    return state


def export_state(model: Wav2Vec2Pretrainer) -> dict[str, Any]:
    """The exported dict of a pretrainer: hyperparameters and a CPU copy of its encoder's weights under
    torchaudio's names (needs no torchaudio)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "hyperparameters": torchaudio_hyperparameters(model.config),
        "state_dict": torchaudio_state_dict(model.wav2vec2.state_dict()),
    }


def build_exported(exported: dict[str, Any]) -> torchaudio.models.Wav2Vec2Model:
    """Rebuild the torchaudio model of an exported dict (eval mode); strict loading: every weight must fit."""
    if exported.get("format") != FORMAT:
        raise ValueError(f"not an exported simplexvq encoder (format {exported.get('format')!r}, want {FORMAT!r})")
    if exported.get("version", 0) > VERSION:
        raise ValueError(f"exported with a newer format version {exported['version']} (this code reads {VERSION})")
    hyperparameters = dict(exported["hyperparameters"])
    hyperparameters["extractor_conv_layer_config"] = [tuple(x) for x in hyperparameters["extractor_conv_layer_config"]]
    model = import_torchaudio().models.wav2vec2_model(**hyperparameters)
    model.load_state_dict(exported["state_dict"], strict=True)
    return model.eval()


def load_exported(path: str | Path, map_location: str | torch.device = "cpu") -> torchaudio.models.Wav2Vec2Model:
    """Load a file written by :func:`export` as a torchaudio ``Wav2Vec2Model`` in eval mode."""
    exported = torch.load(str(path), map_location=map_location, weights_only=True)
    return build_exported(exported).to(map_location)


def script_encoder(model: Wav2Vec2Pretrainer) -> torch.jit.ScriptModule:
    """TorchScript of a pretrainer's encoder as torchaudio's model (eval mode), compiled from a model rebuilt from
    the exported weights: torchaudio's scripting folds the positional convolution's weight norm into a plain
    weight in place, so the scripted module is never one that is used for anything else."""
    from simplexvq_recipes.speech.pretraining.model import Wav2Vec2Pretrainer

    if not isinstance(model, Wav2Vec2Pretrainer):
        raise TypeError(f"script_encoder expects a Wav2Vec2Pretrainer (load_pretrained), got {type(model).__name__}")
    return torch.jit.script(build_exported(export_state(model)))


@torch.no_grad()
def torchaudio_hidden_states(model: Any, waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
    """The output of every Transformer layer of a torchaudio ``Wav2Vec2Model`` (eager or scripted), the last one as
    the model's output (after the final layer norm of pre-norm models), as transformers' ``hidden_states[1:]``."""
    layers, _ = model.extract_features(waveforms, lengths)
    final, _ = model(waveforms, lengths)
    return [*layers[:-1], final]


@torch.no_grad()
def recipe_hidden_states(model: Wav2Vec2Pretrainer, waveforms: Tensor, lengths: Tensor | None) -> list[Tensor]:
    """The run's hidden states of Transformer layers 1..N (:meth:`Wav2Vec2Pretrainer.encode`, eval mode)."""
    model.eval()
    num_layers = model.config.num_layers
    encoded = model.encode(waveforms, lengths, layers=list(range(1, num_layers + 1)))
    return [encoded.layers[layer] for layer in range(1, num_layers + 1)]


def max_hidden_state_difference(expected: list[Tensor], actual: list[Tensor], frames: Tensor | None) -> float:
    """Largest absolute difference over every layer and every unpadded frame (``frames``: (B,) valid frames)."""
    if len(expected) != len(actual):
        raise ValueError(f"{len(expected)} reference layers but {len(actual)} exported layers")
    worst = 0.0
    for reference, exported in zip(expected, actual, strict=True):
        if reference.shape != exported.shape:
            raise ValueError(f"hidden states of shape {tuple(reference.shape)} versus {tuple(exported.shape)}")
        for row in range(reference.shape[0]):
            valid = reference.shape[1] if frames is None else int(frames[row])
            worst = max(worst, float((reference[row, :valid] - exported[row, :valid]).abs().max()))
    return worst


def _check(model: Wav2Vec2Pretrainer, torchaudio_model: Any, tolerance: float, what: str) -> float:
    waveforms, lengths = check_batch()
    expected = recipe_hidden_states(model, waveforms, lengths)
    difference = max_hidden_state_difference(
        expected, torchaudio_hidden_states(torchaudio_model, waveforms, lengths), model.frame_lengths(lengths)
    )
    if not difference <= tolerance:
        raise RuntimeError(f"the {what}'s hidden states differ from the run's by {difference:.3g}")
    return difference


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    torchscript: str | Path | None = None,
) -> Path:
    """Export a run's encoder to ``out`` (and, with ``torchscript``, a TorchScript archive there); raises if a
    written model's hidden states differ from the run's on :func:`check_batch` by more than ``tolerance``."""
    out = Path(out)
    targets = [out] if torchscript is None else [out, Path(torchscript)]
    for target in targets:
        check_output_folder(target.parent, [checkpoint], refuse_holding=False)
    import_torchaudio()
    model, _ = load_speech_run(checkpoint)
    exported = export_state(model)
    _check(model, build_exported(exported), tolerance, "torchaudio model")
    if torchscript is not None:
        scripted = script_encoder(model)
        _check(model, scripted, tolerance, "TorchScript model")
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        atomic_write_bytes(torchscript, buffer.getvalue())
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    atomic_write_bytes(out, buffer.getvalue())
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder (its newest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument("out", type=Path, help="output file (.pt)")
    parser.add_argument("--torchscript", type=Path, help="also write a TorchScript archive of the encoder here")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, torchscript=args.torchscript)
    except (FileNotFoundError, ExportError, ImportError) as error:
        parser.exit(1, f"error: {error}\n")
    size = out.stat().st_size / 2**20
    print(f"exported torchaudio Wav2Vec2Model ({size:.1f} MiB) -> {out}; load it with {LOADER}")
    if args.torchscript is not None:
        print(f"TorchScript encoder -> {args.torchscript}; load it with torch.jit.load")
    return out


if __name__ == "__main__":
    main()
