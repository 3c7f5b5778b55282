"""Inputs for the documentation snippets (tests/test_docs_snippets.py): what the documented commands write and
tensors of the documented shapes, for snippets that read them without creating them."""

from __future__ import annotations

import json
from pathlib import Path

import soundfile as sf
import torch
from safetensors.torch import save_file

RUN = "runs/w2v-knn_ce"
STEP = 10000


def pretrained_run(folder: str | Path, run: str = RUN, step: int = STEP) -> Path:
    """A run folder of the speech recipe's layout holding a freshly initialised ``tiny`` model at ``step``."""
    from simplexvq_recipes.speech.pretraining.config import PretrainConfig, preset_path
    from simplexvq_recipes.speech.pretraining.model import CHECKPOINTS, CONFIG_FILE, WEIGHTS_FILE, build_model
    from simplexvq_recipes.training.checkpoint import TRAINER_STATE
    from simplexvq_recipes.training.config import config_to_yaml, load_config

    config = load_config(PretrainConfig, preset_path("tiny"))
    torch.manual_seed(0)
    model = build_model(config)
    run_dir = Path(folder) / run
    checkpoint = run_dir / CHECKPOINTS / f"step_{step:08d}"
    checkpoint.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config_to_yaml(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint / WEIGHTS_FILE))
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"step": step}))
    return run_dir


def speech_downstream_outputs(folder: str | Path) -> None:
    """What docs/speech-downstream.md's commands write: a run, ``encoder.pt`` (export), ``HF_DIR`` (hf_export) and
    ``feats/valid`` (extract_features on a two-utterance manifest ``data/valid.tsv``)."""
    from simplexvq_recipes.speech.data.manifest import ManifestEntry, write_manifest
    from simplexvq_recipes.speech.downstream import export, extract_features, hf_export

    folder = Path(folder)
    run_dir = pretrained_run(folder)
    audio = folder / "data" / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, samples in enumerate((16000, 12000)):
        sf.write(audio / f"utt{index}.wav", export.check_signal(samples, seed=index)[0].numpy(), 16000)
        entries.append(ManifestEntry(f"utt{index}.wav", samples))
    manifest = write_manifest(folder / "data" / "valid.tsv", audio, entries)
    export.export(run_dir, folder / "encoder.pt")
    hf_export.main([str(run_dir), str(folder / "HF_DIR")])
    extract_features.main([str(run_dir), str(manifest), str(folder / "feats" / "valid"), "--layers", "1", "2"])
