"""Export a pretrained wav2vec 2.0 to the Hugging Face format (``transformers.Wav2Vec2Model``).

    python -m simplexvq_recipes.speech.downstream.hf_export RUN_DIR OUT_DIR

``RUN_DIR`` is a run folder of the Accelerate speech recipe (its newest checkpoint, or one ``checkpoints/step_*``
folder) or the output folder of a fairseq2 wav2vec2 run with the ``wav2vec2_simplexvq`` family (its last
checkpoint). ``OUT_DIR`` receives what ``save_pretrained`` writes (``config.json``, ``model.safetensors``) plus
``preprocessor_config.json`` (the run's sample rate and waveform normalisation), so that
``transformers.Wav2Vec2Model.from_pretrained(OUT_DIR)``, s3prl's ``hf_wav2vec2_custom`` upstream (SUPERB) and
ESPnet's Hugging Face frontends load it offline. The recipe's encoder *is* a ``transformers.Wav2Vec2Model``, so its
export is its own ``save_pretrained``; a fairseq2 model's weights are mapped by name
(:mod:`~simplexvq_recipes.speech.downstream.hf_mapping`). Everything is written to a staging folder beside
``OUT_DIR``, reloaded from there as a user would and checked on a padded check batch against the original's hidden
states (:data:`DEFAULT_TOLERANCE`) before it is moved into place; ``OUT_DIR`` is refused, before anything is
written, when it is or lies inside a run or checkpoint folder or holds one.

**Features, and the quantizer beside them.** The Hugging Face format describes wav2vec 2.0's Gumbel quantizer
(codevector logits from a linear layer), which cannot hold a simplexvq quantizer (cosine logits over a learnable
temperature, product codebooks, SimVQ's projection). The export therefore writes the encoder in the Hugging Face
format and the quantizer beside it, in ``simplexvq_quantizer.safetensors`` + ``simplexvq_quantizer.json``
(ignored by ``transformers``): :func:`load_quantizer` rebuilds it, and
``quantizer(projection(hf_output.extract_features)).indices`` gives the model's codes, ``quantizer.decode`` their
vectors. A third-party quantizer (not a :class:`simplexvq.ProductQuantizer`) is left out: features only.

Nothing from the run folder is unpickled without ``weights_only=True``: fairseq2 checkpoints are loaded with its
restricted unpickler whatever their ``model.yaml`` says. Importing this module imports neither ``transformers``
nor fairseq2 nor torchaudio; each is imported when needed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from simplexvq_recipes.speech.downstream.export import (
    ExportError,
    check_batch,
    check_output_folder,
    load_speech_run,
    max_hidden_state_difference,
    recipe_hidden_states,
)
from simplexvq_recipes.speech.downstream.hf_mapping import fairseq2_shape, fairseq2_state_dict, hf_config
from simplexvq_recipes.speech.downstream.hf_quantizer import (
    QUANTIZER_CONFIG,
    QUANTIZER_WEIGHTS,
    load_quantizer,
    save_quantizer,
)

if TYPE_CHECKING:
    import transformers

__all__ = [
    "DEFAULT_TOLERANCE",
    "QUANTIZER_CONFIG",
    "ExportError",
    "ExportResult",
    "export_fairseq2_model",
    "export_recipe_model",
    "export_run",
    "fairseq2_shape",
    "fairseq2_state_dict",
    "hf_config",
    "load_quantizer",
]

SAMPLE_RATE = 16000
DEFAULT_TOLERANCE = 1e-4
"""Largest absolute difference of hidden states (float32, CPU) allowed between the exported model and the
original: for fairseq2 the same arithmetic in a different order (attention kernels, padding masks of -1e4 versus
the dtype's minimum); for the recipe's own encoder the reload is exact."""


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


def _frames(model: transformers.Wav2Vec2Model, lengths: Tensor) -> Tensor:
    frames = lengths
    for kernel, stride in zip(model.config.conv_kernel, model.config.conv_stride, strict=True):
        frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
    return frames


# --------------------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------------------


def _build_hf(config: transformers.Wav2Vec2Config, make_state: Any) -> transformers.Wav2Vec2Model:
    import transformers

    model = transformers.Wav2Vec2Model(config)
    keys = list(model.state_dict())
    model.load_state_dict(make_state(keys), strict=True)  # every weight mapped, none left over
    return model.eval()


def _reload(folder: Path) -> transformers.Wav2Vec2Model:
    """The export as a user loads it: ``from_pretrained``, offline."""
    import transformers

    return transformers.Wav2Vec2Model.from_pretrained(folder, local_files_only=True).eval()


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the checked files into ``out_dir`` (the whole folder when it is new); quantizer files of an earlier
    export that this one does not write are removed, so the folder never mixes two exports."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    written = {path.name for path in staging.iterdir()}
    for name in (QUANTIZER_CONFIG, QUANTIZER_WEIGHTS):
        if name not in written and (out_dir / name).exists():
            (out_dir / name).unlink()
    for path in staging.iterdir():
        os.replace(path, out_dir / path.name)


def _write_checked(
    out_dir: Path,
    write: Callable[[Path], bool],
    reference: list[Tensor],
    tolerance: float,
    *,
    sampling_rate: int,
    do_normalize: bool,
) -> tuple[float, bool]:
    """Write the export (``write(folder)`` -> whether a quantizer was written) and its preprocessing into a staging
    folder beside ``out_dir``, reload it from disk as a user would, check its hidden states against ``reference``
    and only then move it into ``out_dir``. Returns the largest difference and ``write``'s answer."""
    import transformers

    check_output_folder(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        wrote_quantizer = write(staging)
        transformers.Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=sampling_rate,
            padding_value=0.0,
            do_normalize=do_normalize,
            return_attention_mask=True,
        ).save_pretrained(staging)
        reloaded = _reload(staging)
        waveforms, lengths = check_batch()
        actual = hf_hidden_states(reloaded, waveforms, lengths)
        difference = max_hidden_state_difference(reference, actual, _frames(reloaded, lengths))
        if not difference <= tolerance:
            raise RuntimeError(f"the exported model's hidden states differ from the original's by {difference:.3g}")
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return difference, wrote_quantizer


def export_recipe_model(
    pretrainer: nn.Module,
    out_dir: str | Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    sampling_rate: int = SAMPLE_RATE,
    do_normalize: bool = False,
) -> ExportResult:
    """Export a :class:`~simplexvq_recipes.speech.pretraining.model.Wav2Vec2Pretrainer` (the Accelerate recipe):
    ``save_pretrained`` of its own ``wav2vec2`` plus the quantizer files. ``sampling_rate`` and ``do_normalize``
    go into ``preprocessor_config.json`` (:func:`export_run` takes them from the run's ``data`` settings)."""
    out_dir = Path(out_dir)
    waveforms, lengths = check_batch()
    reference = recipe_hidden_states(pretrainer, waveforms, lengths)

    def write(folder: Path) -> bool:
        pretrainer.wav2vec2.save_pretrained(folder, safe_serialization=True)
        return save_quantizer(folder, pretrainer.quantizer_input, pretrainer.quantizer)

    difference, wrote_quantizer = _write_checked(
        out_dir, write, reference, tolerance, sampling_rate=sampling_rate, do_normalize=do_normalize
    )
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
    waveforms, lengths = check_batch()
    reference = fairseq2_hidden_states(model, waveforms, lengths)
    in_memory = max_hidden_state_difference(
        reference, hf_hidden_states(hf_model, waveforms, lengths), _frames(hf_model, lengths)
    )
    if not in_memory <= tolerance:
        raise RuntimeError(f"the Hugging Face model's hidden states differ from the original's by {in_memory:.3g}")
    from simplexvq.fairseq2_extension import SimplexVQWav2Vec2Quantizer

    quantizer = model.quantizer

    def write(folder: Path) -> bool:
        hf_model.save_pretrained(folder, safe_serialization=True)
        return isinstance(quantizer, SimplexVQWav2Vec2Quantizer) and save_quantizer(
            folder, quantizer.input_proj, quantizer.core
        )

    difference, wrote_quantizer = _write_checked(
        out_dir, write, reference, tolerance, sampling_rate=SAMPLE_RATE, do_normalize=False
    )
    return ExportResult(out_dir, "fairseq2", max(in_memory, difference), wrote_quantizer)


def _fairseq2_checkpoint_dir(run_dir: Path) -> Path | None:
    """The ``checkpoints`` folder of a fairseq2 run (it holds ``model.yaml``), or None."""
    for candidate in (run_dir, run_dir / "checkpoints"):
        if (candidate / "model.yaml").is_file():
            return candidate
    return None


def _last_fairseq2_step(checkpoint_dir: Path) -> Path:
    """``step_N/model`` of the largest ``N`` (what fairseq2 calls ``last_checkpoint``)."""
    steps = []
    for folder in checkpoint_dir.glob("step_*"):
        number = folder.name.removeprefix("step_")
        if number.isdigit() and (folder / "model").is_dir():
            steps.append((int(number), folder / "model"))
    if not steps:
        raise FileNotFoundError(f"{checkpoint_dir} holds no fairseq2 checkpoint (step_N/model)")
    return max(steps)[1]


def load_fairseq2_checkpoint(checkpoint_dir: Path) -> tuple[nn.Module, Any]:
    """``(model, config)`` of the last checkpoint of a fairseq2 run (the ``wav2vec2_simplexvq`` family or
    fairseq2's ``wav2vec2``). The config comes from ``model.yaml`` (read with a safe YAML loader); the weights are
    loaded by fairseq2's checkpoint loader with ``restrict=True`` (``torch.load(weights_only=True)``) whatever
    ``model.yaml`` says: a checkpoint that holds anything but tensors and plain values is refused. fairseq2
    initialises once per process."""
    import fairseq2
    from fairseq2.composition import register_checkpoint_models
    from fairseq2.device import CPU
    from fairseq2.error import InvalidOperationError
    from fairseq2.models.wav2vec2 import get_wav2vec2_model_hub

    from simplexvq.fairseq2_extension import SIMPLEXVQ_WAV2VEC2_FAMILY, get_simplexvq_wav2vec2_model_hub

    family = _model_family(checkpoint_dir / "model.yaml")
    if family == SIMPLEXVQ_WAV2VEC2_FAMILY:
        get_hub = get_simplexvq_wav2vec2_model_hub
    elif family == "wav2vec2":
        get_hub = get_wav2vec2_model_hub
    else:
        raise ExportError(f"{checkpoint_dir} holds a {family!r} model; export handles wav2vec2 and wav2vec2_simplexvq")
    weights = _last_fairseq2_step(checkpoint_dir)
    try:
        fairseq2.init_fairseq2(extras=lambda c: register_checkpoint_models(c, checkpoint_dir), no_progress=True)
    except InvalidOperationError as error:
        raise RuntimeError(
            "fairseq2 is already initialised in this process, so the checkpoint cannot be registered; run the "
            "export in a fresh process (python -m simplexvq_recipes.speech.downstream.hf_export RUN_DIR OUT_DIR) "
            "or call export_fairseq2_model(model, config, out_dir)"
        ) from error
    hub = get_hub()
    config = hub.get_model_config("last_checkpoint")
    try:
        model = hub.load_custom_model(weights, config, device=CPU, restrict=True)
    except Exception as error:
        if not _is_unpickling_refusal(error):
            raise
        raise ExportError(
            f"refusing to load {weights}: it holds objects other than tensors, which loading would run as code "
            "(a fairseq2 checkpoint holds tensors and plain values only)"
        ) from error
    return model, config


def _is_unpickling_refusal(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is ``torch.load(weights_only=True)`` refusing an object."""
    import pickle

    while error is not None:
        if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _model_family(model_yaml: Path) -> str | None:
    """The ``model_family`` line of fairseq2's ``model.yaml`` (read as text: nothing is evaluated)."""
    match = re.search(r"^model_family:\s*(\S+)\s*$", model_yaml.read_text(), flags=re.MULTILINE)
    return match.group(1).strip("'\"") if match else None


def export_run(run_dir: str | Path, out_dir: str | Path, *, tolerance: float = DEFAULT_TOLERANCE) -> ExportResult:
    """Export the newest checkpoint of a run folder of either recipe (see the module docstring)."""
    run_dir = Path(run_dir)
    check_output_folder(out_dir, [run_dir])
    checkpoint_dir = _fairseq2_checkpoint_dir(run_dir)
    if checkpoint_dir is not None:
        model, config = load_fairseq2_checkpoint(checkpoint_dir)
        return export_fairseq2_model(model, config, out_dir, tolerance=tolerance)
    model, config = load_speech_run(run_dir)
    return export_recipe_model(
        model,
        out_dir,
        tolerance=tolerance,
        sampling_rate=config.data.sample_rate,
        do_normalize=config.data.normalize,
    )


def main(argv: Sequence[str] | None = None) -> ExportResult:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a speech recipe run (or checkpoints/step_*) or a fairseq2 run")
    parser.add_argument("out_dir", type=Path, help="output folder for save_pretrained")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="largest hidden-state difference")
    args = parser.parse_args(argv)
    try:
        result = export_run(args.run_dir, args.out_dir, tolerance=args.tolerance)
    except (FileNotFoundError, ExportError, ImportError) as error:
        parser.exit(1, f"error: {error}\n")
    extra = f"; quantizer in {QUANTIZER_CONFIG}" if result.quantizer else "; features only (no simplexvq quantizer)"
    print(
        f"exported {result.source} model to {result.out_dir} (hidden states within {result.max_difference:.2g} "
        f"of the original){extra}; load it with transformers.Wav2Vec2Model.from_pretrained('{result.out_dir}')"
    )
    return result


if __name__ == "__main__":
    main()
