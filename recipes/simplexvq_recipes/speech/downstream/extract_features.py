"""Write the contextual features and discrete codes of a pretrained model for every utterance of a manifest.

    python -m simplexvq_recipes.speech.downstream.extract_features RUN_DIR MANIFEST.tsv OUT_DIR --layers 6 12

One file per utterance, ``OUT_DIR/features/<audio path without extension>.safetensors`` (or ``.npz`` with
``--format npz``), holding

* ``layer_<i>``: (T, embed_dim) output of Transformer layer ``i`` (0: the Transformer's input, the projected CNN
  features), float32 (or float16 with ``--dtype float16``);
* ``codes``: (T, G) int32 hard code index per frame and codebook (the quantizer in eval mode);

plus ``OUT_DIR/index.json``: the settings, the frame rate and one row per utterance (``id``, ``file``,
``num_frames``, ``audio``). :func:`load_utterance` and :func:`read_index` read them back (NumPy arrays).

Utterances are encoded one at a time, unpadded: the CNN's group normalisation spans the whole (padded) length, so
padding would change the features of the shorter utterances of a batch. Re-running the same command skips the
files already written (each file is written atomically); ``--overwrite`` recomputes them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy_safetensors
from safetensors.numpy import save_file as save_numpy_safetensors
from torch import Tensor
from tqdm.auto import tqdm

from simplexvq_recipes.speech.data.audio import AudioReadError, read_audio
from simplexvq_recipes.speech.data.manifest import (
    Manifest,
    ManifestError,
    missing_audio,
    missing_audio_error,
    read_manifest,
)
from simplexvq_recipes.speech.pretraining.model import Wav2Vec2Pretrainer, load_pretrained, resolve_checkpoint
from simplexvq_recipes.training.atomic import atomic_write_json
from simplexvq_recipes.training.runlog import show_progress_bar

INDEX_FILE = "index.json"
FEATURES_DIR = "features"
CODES_KEY = "codes"
FORMATS = ("safetensors", "npz")
DTYPES = ("float32", "float16")
ON_ERROR = ("raise", "skip")


def layer_key(layer: int) -> str:
    """Name of a layer's array in the output files: ``layer_6``."""
    return f"layer_{layer}"


class FeatureExtractor:
    """Per-utterance contextual features and codes of a pretrained :class:`Wav2Vec2Pretrainer` (eval mode).

    ``extractor(waveform)`` takes one 16 kHz waveform (samples,) and returns CPU tensors ``layer_<i>`` (T, D)
    float32 and ``codes`` (T, G) int32. ``normalize`` must match the pretraining data setting (zero-mean,
    unit-variance waveforms).
    """

    def __init__(
        self,
        model: Wav2Vec2Pretrainer,
        layers: Sequence[int],
        *,
        normalize: bool = False,
        codes: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        num_layers = model.config.num_layers
        bad = [layer for layer in layers if not 0 <= layer <= num_layers]
        if bad or not layers:
            raise ValueError(f"choose layers in 0..{num_layers} (0 is the Transformer's input), got {list(layers)}")
        self.model = model.to(device).eval()
        self.layers = sorted(set(layers))
        self.normalize = normalize
        self.codes = codes
        self.device = torch.device(device)

    @property
    def frame_rate(self) -> float:
        """Output frames per second at 16 kHz (50 for the base CNN)."""
        return 16000 / self.model.config.downsampling

    @torch.no_grad()
    def __call__(self, waveform: Tensor) -> dict[str, Tensor]:
        if waveform.dim() != 1:
            raise ValueError(f"expected one waveform of shape (samples,), got {tuple(waveform.shape)}")
        waveform = waveform.to(self.device, torch.float32)
        if self.normalize:
            waveform = (waveform - waveform.mean()) / (waveform.std() + 1e-5)
        out = self.model.encode(waveform[None], None, layers=self.layers)
        arrays = {layer_key(layer): out.layers[layer][0].float().cpu() for layer in self.layers}
        if self.codes:
            arrays[CODES_KEY] = out.codes[0].to(torch.int32).cpu()
        return arrays


def iter_waveforms(
    manifest: Manifest, sample_rate: int = 16000, *, on_error: str = "raise"
) -> Iterator[tuple[int, Tensor]]:
    """``(row, waveform)`` for each manifest row; an unreadable file raises :class:`AudioReadError` naming the
    file and its manifest line (``on_error="skip"``: a warning, and the row is left out)."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    for row in range(len(manifest)):
        try:
            yield row, read_audio(manifest.audio_path(row), sample_rate)
        except AudioReadError as error:
            error = AudioReadError(error.path, f"{error.reason} (listed in {manifest.where(row)})")
            if on_error == "raise":
                raise error from None
            warnings.warn(f"skipped: {error}", stacklevel=2)


def check_manifest_audio(manifest: Manifest, on_error: str, skip_hint: str | None = None) -> None:
    """Stop before any work when the manifest lists nothing, or (``on_error="raise"``) lists files that are gone;
    the error names the manifest (and the first missing file) and the fix. With ``"skip"`` missing files are left
    to :func:`iter_waveforms`, which warns about each, unless the whole audio root is gone."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if not len(manifest):
        raise ManifestError(f"{manifest.source or 'the manifest'} lists no audio files")
    missing = missing_audio(manifest)
    if missing and (on_error == "raise" or not manifest.root.is_dir()):
        raise missing_audio_error(manifest, missing, skip_hint)


# ---------------------------------------------------------------------------------------------------------------
# files


def save_utterance(path: str | Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write one utterance's arrays atomically; the format follows the suffix (``.safetensors`` or ``.npz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        if path.suffix == ".safetensors":
            save_numpy_safetensors({k: np.ascontiguousarray(v) for k, v in arrays.items()}, temporary, metadata)
        elif path.suffix == ".npz":
            with open(temporary, "wb") as file:
                np.savez(file, **arrays)
        else:
            raise ValueError(f"unknown feature file format {path.suffix!r}; use .safetensors or .npz")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_utterance(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of one utterance file (``layer_<i>`` (T, D), ``codes`` (T, G)) as NumPy arrays."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_numpy_safetensors(str(path))
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _num_frames(path: Path) -> int:
    """Frames of an utterance file without reading its arrays."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="numpy") as file:
            return int(file.get_slice(file.keys()[0]).get_shape()[0])
    return int(next(iter(load_utterance(path).values())).shape[0])


@dataclass
class FeatureIndex:
    """Contents of ``index.json``: the extraction settings and one row per written utterance."""

    settings: dict[str, Any]
    utterances: list[dict[str, Any]] = field(default_factory=list)
    root: Path | None = None
    """The output folder (``file`` entries are relative to it)."""

    def path(self, row: int) -> Path:
        return Path(self.root or ".") / self.utterances[row]["file"]

    def load(self, row: int) -> dict[str, np.ndarray]:
        return load_utterance(self.path(row))


def read_index(out_dir: str | Path) -> FeatureIndex:
    """Read the ``index.json`` written by :func:`extract`."""
    path = Path(out_dir) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a folder written by python -m {__name__}")
    data = json.loads(path.read_text())
    return FeatureIndex(settings=data["settings"], utterances=data["utterances"], root=Path(out_dir))


# ---------------------------------------------------------------------------------------------------------------
# command


@dataclass(kw_only=True)
class ExtractConfig:
    """What to extract, from which checkpoint and manifest, and where to."""

    checkpoint: str
    manifest: str
    out_dir: str
    layers: list[int]
    format: str = "safetensors"
    dtype: str = "float32"
    codes: bool = True
    device: str = "cpu"
    on_error: str = "raise"
    overwrite: bool = False
    progress_bar: bool = True
    threads: int | None = None
    """``torch.set_num_threads`` (``None``: PyTorch's default); 1 is much faster for small models on busy CPUs."""


def utterance_id(relative_path: str) -> str:
    """Identifier of an utterance: its manifest path without the extension (``level/cs/line_01``)."""
    return str(PurePosixPath(relative_path).with_suffix(""))


def extract(config: ExtractConfig) -> FeatureIndex:
    """Encode every utterance of the manifest and write the files and ``index.json``; returns the index."""
    if config.format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {config.format!r}")
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    if config.threads:
        torch.set_num_threads(config.threads)
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a folder: name a new or existing output folder")
    manifest = read_manifest(config.manifest)
    check_manifest_audio(manifest, config.on_error, "--on-error skip")
    ids = [utterance_id(entry.path) for entry in manifest.entries]
    duplicates = [name for name, count in Counter(ids).items() if count > 1]
    if duplicates:
        raise ManifestError(f"{config.manifest}: two audio files map to the same utterance id {duplicates[0]!r}")
    _, checkpoint = resolve_checkpoint(config.checkpoint)
    model, pretrain_config = load_pretrained(checkpoint)
    extractor = FeatureExtractor(
        model, config.layers, normalize=pretrain_config.data.normalize, codes=config.codes, device=config.device
    )
    settings = {
        "checkpoint": str(checkpoint.resolve()),
        "layers": extractor.layers,
        "format": config.format,
        "dtype": config.dtype,
        "codes": config.codes,
        "sample_rate": pretrain_config.data.sample_rate,
        "frame_rate": extractor.frame_rate,
        "embed_dim": pretrain_config.model.embed_dim,
        "groups": pretrain_config.model.groups,
        "codebook_size": pretrain_config.model.codebook_size,
    }
    out_dir = Path(config.out_dir)
    resume = _check_previous(out_dir, settings, config.overwrite)
    atomic_write_json(out_dir / INDEX_FILE, {"settings": settings, "utterances": []})  # claims the folder

    index = FeatureIndex(settings=settings, root=out_dir)
    rows = tqdm(
        iter_waveforms(manifest, settings["sample_rate"], on_error=config.on_error),
        total=len(manifest),
        desc="features",
        unit="utt",
        disable=not config.progress_bar,
        dynamic_ncols=True,
    )
    dtype = np.dtype(config.dtype)
    for row, waveform in rows:
        relative = f"{FEATURES_DIR}/{ids[row]}.{config.format}"
        target = out_dir / relative
        if resume and target.is_file():
            num_frames = _num_frames(target)
        else:
            arrays = {
                key: value.numpy().astype(dtype if key != CODES_KEY else np.int32, copy=False)
                for key, value in extractor(waveform).items()
            }
            save_utterance(target, arrays, {"audio": str(manifest.audio_path(row)), "id": ids[row]})
            num_frames = int(next(iter(arrays.values())).shape[0])
        index.utterances.append(
            {"id": ids[row], "file": relative, "num_frames": num_frames, "audio": str(manifest.audio_path(row))}
        )
    atomic_write_json(out_dir / INDEX_FILE, {"settings": settings, "utterances": index.utterances})
    return index


def _check_previous(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Whether files already in ``out_dir`` may be kept; an error if they were made with other settings."""
    path = out_dir / INDEX_FILE
    if overwrite or not path.is_file():
        return False
    previous = json.loads(path.read_text()).get("settings")
    if previous != settings:
        changed = sorted(key for key in settings if (previous or {}).get(key) != settings[key])
        raise ValueError(
            f"{out_dir} holds features extracted with other settings ({', '.join(changed)} differ); "
            "pass --overwrite or choose another folder"
        )
    return True


def main(argv: Sequence[str] | None = None) -> FeatureIndex:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run folder (its newest checkpoint) or a checkpoints/step_* folder")
    parser.add_argument("manifest", help="manifest (.tsv) of the audio files")
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument("--layers", type=int, nargs="+", required=True, help="layers to write (0: CNN projection)")
    parser.add_argument("--format", choices=FORMATS, default="safetensors")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the features")
    parser.add_argument("--no-codes", action="store_true", help="do not write the code indices")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--on-error", choices=ON_ERROR, default="raise", help="unreadable audio: stop or skip")
    parser.add_argument("--overwrite", action="store_true", help="recompute files already in OUT_DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none without a terminal)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1: best on busy CPUs)")
    args = parser.parse_args(argv)
    config = ExtractConfig(
        checkpoint=args.checkpoint,
        manifest=args.manifest,
        out_dir=args.out_dir,
        layers=args.layers,
        format=args.format,
        dtype=args.dtype,
        codes=not args.no_codes,
        device=args.device,
        on_error=args.on_error,
        overwrite=args.overwrite,
        progress_bar=show_progress_bar(False if args.no_progress else None),
        threads=args.threads,
    )
    try:
        index = extract(config)
    except (AudioReadError, FileNotFoundError, ManifestError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")
    frames = sum(row["num_frames"] for row in index.utterances)
    print(f"{len(index.utterances)} utterances, {frames} frames -> {Path(config.out_dir) / INDEX_FILE}")
    return index


if __name__ == "__main__":
    main()
