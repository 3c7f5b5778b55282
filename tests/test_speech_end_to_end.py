"""The speech recipe as a user runs it, through its command lines: ``--help``, a 3-step ``tiny`` run on a small
generated corpus, and the Hugging Face export of that run, loaded by ``transformers.Wav2Vec2Model.from_pretrained``
with the run's own hidden states.

CI runs this file in the pinned ``.venv`` and again in ``.venv-wheel`` (the built wheel beside torch 2.13, no
torchaudio, no fairseq2), where ``SIMPLEXVQ_EXPECT_INSTALLED=1`` also makes it check that the command lines import
the installed package, not the source tree.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

CORPUS = Path(__file__).parent / "scripts" / "speech_corpus.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = 3
pytestmark = pytest.mark.slow


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A 3-step run of the ``tiny`` preset and its Hugging Face export (both from the command line)."""
    root = tmp_path_factory.mktemp("end_to_end")
    spec = importlib.util.spec_from_file_location("speech_corpus", CORPUS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    corpus = module.write_corpus(root / "corpus", num_train=8, num_valid=4)
    run_dir, hf_dir = root / "run", root / "hf"
    _run(
        "-m",
        "simplexvq_recipes.speech.pretraining.train",
        "--preset",
        "tiny",
        f"data.manifest_dir={corpus}",
        f"training.output_dir={run_dir}",
        f"training.steps={STEPS}",
        "training.log_every=1",
        "training.eval_every=0",
        "training.eval_at_start=false",
        "training.threads=1",
        "optim.warmup_steps=1",
        "data.crop_samples=16000",
        "data.valid_crop_samples=16000",
        "data.batch_size=4",
        "data.min_samples=4000",
        "model.num_negatives=10",
        cwd=root,
    )
    export = _run("-m", "simplexvq_recipes.speech.downstream.hf_export", str(run_dir), str(hf_dir), cwd=root)
    return {"root": root, "run": run_dir, "hf": hf_dir, "export_output": export.stdout}


@pytest.mark.skipif(os.environ.get("SIMPLEXVQ_EXPECT_INSTALLED") != "1", reason="only in the wheel environment")
def test_the_tests_and_the_command_lines_import_the_installed_wheel(tmp_path):
    import simplexvq
    import simplexvq_recipes

    probe = "import simplexvq, simplexvq_recipes; print(simplexvq.__file__); print(simplexvq_recipes.__file__)"
    result = _run("-c", probe, cwd=tmp_path)
    site = sysconfig.get_paths()["purelib"]
    for path in [simplexvq.__file__, simplexvq_recipes.__file__, *result.stdout.split()]:
        assert path.startswith(site), f"{path} is not in {site}: the source tree is importable"


def test_help_lists_the_settings(tmp_path):
    result = _run("-m", "simplexvq_recipes.speech.pretraining.train", "--help", cwd=tmp_path)
    assert "--preset" in result.stdout and "training.steps = " in result.stdout


def test_tiny_run_trains_and_logs_its_loss(exported):
    run_dir = exported["run"]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == STEPS
    log = (run_dir / "train.log").read_text()
    assert f"step {STEPS}/{STEPS}" in log and "loss" in log


def test_hf_export_loads_in_transformers_with_the_runs_hidden_states(exported):
    from simplexvq_recipes.speech.downstream import hf_export
    from simplexvq_recipes.speech.pretraining.model import load_pretrained

    assert "transformers.Wav2Vec2Model.from_pretrained" in exported["export_output"]
    hf_model = transformers.Wav2Vec2Model.from_pretrained(exported["hf"], local_files_only=True).eval()
    model, _ = load_pretrained(exported["run"])
    waveforms = torch.randn(2, 12000, generator=torch.Generator().manual_seed(11)) * 0.1
    lengths = torch.tensor([12000, 9000])
    waveforms[1, 9000:] = 0.0
    with torch.no_grad():
        expected = hf_export.recipe_hidden_states(model, waveforms, lengths)
        actual = hf_export.hf_hidden_states(hf_model, waveforms, lengths)
    frames = hf_model._get_feat_extract_output_lengths(lengths)
    assert len(actual) == len(expected) > 0
    assert hf_export.max_hidden_state_difference(expected, actual, frames) <= 1e-5
