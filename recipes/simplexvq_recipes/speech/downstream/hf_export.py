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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import simplexvq
from simplexvq_recipes.speech.downstream.export import check_signal
from simplexvq_recipes.speech.downstream.hf_mapping import (
    fairseq2_shape,
    fairseq2_state_dict,
    hf_config,
    torchaudio_shape,
    torchaudio_state_dict,
)
from simplexvq_recipes.speech.downstream.hf_quantizer import QUANTIZER_CONFIG, load_quantizer, save_quantizer

if TYPE_CHECKING:
    import transformers

__all__ = [
    "DEFAULT_TOLERANCE",
    "QUANTIZER_CONFIG",
    "ExportResult",
    "export_fairseq2_model",
    "export_recipe_model",
    "export_run",
    "fairseq2_shape",
    "fairseq2_state_dict",
    "hf_config",
    "load_quantizer",
    "torchaudio_shape",
    "torchaudio_state_dict",
]

SAMPLE_RATE = 16000
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
