"""The pretraining recipe end to end: one process, exact resume after SIGKILL, two gloo processes, bad audio files.

Every run uses the ``tiny`` preset shrunk further (1 s crops, 4 utterances per batch) on a synthetic corpus of
WAV and FLAC files written by ``tests/scripts/speech_corpus.py``, so no apt package is needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simplexvq_recipes.speech.data.audio import AudioReadError
from simplexvq_recipes.speech.data.manifest import ManifestEntry, read_manifest, write_manifest
from simplexvq_recipes.speech.pretraining import train as train_module
from simplexvq_recipes.speech.pretraining.model import load_pretrained, resolve_checkpoint
from simplexvq_recipes.training.checkpoint import latest_complete

CORPUS = Path(__file__).parent / "scripts" / "speech_corpus.py"
FAST = [
    "--preset",
    "tiny",
    "data.crop_samples=16000",
    "data.valid_crop_samples=16000",
    "data.batch_size=4",
    "data.min_samples=4000",
    "model.num_negatives=10",
    "training.progress_bar=false",
    "training.threads=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = pytest.mark.slow  # end-to-end runs of the recipe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("speech_corpus", CORPUS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_corpus(tmp_path_factory.mktemp("speech") / "corpus", num_train=24, num_valid=8)


def _command(corpus: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "simplexvq_recipes.speech.pretraining.train",
        *FAST,
        f"data.manifest_dir={corpus}",
        f"training.output_dir={run_dir}",
        *overrides,
    ]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


RESUME_SETTINGS = (
    "training.steps=10",
    "optim.warmup_steps=2",
    "training.checkpoint_every=2",
    "training.log_every=2",
    "training.eval_every=5",
)


@pytest.fixture(scope="module")
def unbroken_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("unbroken")
    _run(_command(corpus, run_dir, *RESUME_SETTINGS))
    return run_dir


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "step_00000010" / "model.safetensors"))


def _history(run_dir: Path, timing: bool = False) -> list[dict]:
    """Every logged row of the final checkpoint (without the wall-clock ``seconds_per_step`` unless ``timing``)."""
    rows = json.loads((run_dir / "checkpoints" / "step_00000010" / "trainer_state.json").read_text())["history"]
    return rows if timing else [{k: v for k, v in row.items() if not k.endswith("seconds_per_step")} for row in rows]


def test_run_writes_everything_users_expect(unbroken_run, corpus):
    run = unbroken_run
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000008", "step_00000010"]
    for name in ("config.yaml", "results.json", "code_usage.png", "code_usage_train.png", "code_histogram.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "history.json").read_text()) == _history(
        run, timing=True
    )  # every logged row, as checkpointed
    assert (run / "code_usage.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((run / "results.json").read_text())
    assert results["quantizer"] == "softmax-knn_ce" and results["step"] == 10
    assert 0 < results["val_usage"][0] <= 1
    assert results["val_dead_codes"][0] == pytest.approx(64 * (1 - results["val_usage"][0]))
    # every unpadded frame of the (centre-cropped) validation utterances was counted exactly once
    valid = read_manifest(corpus / "valid.tsv")
    samples = torch.tensor([min(e.num_samples, 16000) for e in valid.entries if e.num_samples >= 4000])
    model, config = load_pretrained(run)
    assert results["val_frames"] == [float(model.frame_lengths(samples).sum())]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/loss_contrastive",
        "train/loss_knn_ce",
        "train/loss_feature_penalty",
        "train/lr",
        "train/temperature",
        "train/code_perplexity",
        "train/prob_perplexity",
        "train/usage",
        "train/accuracy",
        "val/usage",
        "val/perplexity",
        "val/contrastive",
        "val/dead_codes",
    }
    assert expected <= tags, expected - tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8, 10]
    assert [e.step for e in events.Scalars("val/usage")] == [0, 5, 10]  # before training, then every 5
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[-1] == pytest.approx(config.optim.final_lr, rel=1e-3)  # cosine annealed to 5e-6 at the end


def test_load_pretrained_restores_the_trained_weights(unbroken_run):
    model, config = load_pretrained(unbroken_run)
    assert not model.training and config.model.quantizer.codebook_size == 64
    for name, value in _final_weights(unbroken_run).items():
        assert torch.equal(model.state_dict()[name], value), name
    same, _ = load_pretrained(unbroken_run / "checkpoints" / "step_00000008")
    assert not torch.equal(same.mask_embedding, model.mask_embedding)
    with torch.no_grad():
        encoded = model.encode(torch.randn(1, 16000) * 0.1, layers=[2])
    assert encoded.codes.shape == (1, 49, 1) and encoded.layers[2].shape == (1, 49, 64)
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        load_pretrained(unbroken_run / "tensorboard")


def test_sigkill_then_resume_reaches_the_same_parameters(unbroken_run, corpus, tmp_path):
    """Kill the run (SIGKILL) as soon as its first checkpoint exists, wherever it then is; resuming with the
    same command must end with exactly the parameters and metric history of the run that never stopped."""
    run_dir = tmp_path / "killed"
    command = _command(corpus, run_dir, *RESUME_SETTINGS)
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run_dir / "checkpoints" / "step_00000002" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run_dir / "checkpoints" / "step_00000010").exists()

    resumed = _run(command)
    assert "resumed from" in resumed.stdout + resumed.stderr
    reference = _final_weights(unbroken_run)
    weights = _final_weights(run_dir)
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name
    assert _history(run_dir) == _history(unbroken_run)


def test_two_gloo_processes_end_to_end(corpus, tmp_path):
    """Neighbours across ranks (the multi-process default) and a validation split of one utterance, so that only
    rank 0 has a validation batch: every collective must still be met on both ranks."""
    run_dir = tmp_path / "ddp"
    manifest = read_manifest(corpus / "valid.tsv")
    write_manifest(corpus / "valid_one.tsv", manifest.root, manifest.entries[:1])
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "simplexvq_recipes.speech.pretraining.train",
        *_command(
            corpus,
            run_dir,
            "training.steps=4",
            "training.checkpoint_every=2",
            "training.log_every=2",
            "training.eval_every=4",
            "optim.warmup_steps=2",
            "model.layer_drop=0.5",  # layers skipped differently on each rank: DDP must cope with unused parameters
            "data.valid_subset=valid_one",
        )[3:],
    ]
    result = _run(command)
    assert result.stdout.count("step 4: validation code usage") == 1  # printed by the main process only
    checkpoint = run_dir / "checkpoints" / "step_00000004"
    assert {"rng_0.safetensors", "rng_1.safetensors", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    results = json.loads((run_dir / "results.json").read_text())
    assert results["step"] == 4
    # the one validation utterance was counted once, by rank 0
    model, config = load_pretrained(run_dir)
    samples = torch.tensor([min(e.num_samples, 16000) for e in manifest.entries[:1]])
    assert results["val_frames"] == [float(model.frame_lengths(samples).sum())]
    assert "knn_scope=global" in (run_dir / "train.log").read_text()  # the default with several processes
    assert config.model.quantizer.knn_scope is None
    history = json.loads((checkpoint / "trainer_state.json").read_text())["history"]
    assert all(torch.isfinite(torch.tensor(row["train/loss"])) for row in history if "train/loss" in row)
    # one schedule step per optimizer step (not one per process): peak after the 2 warmup steps, floor at the end
    lr = {int(row["step"]): row["train/lr"] for row in history if "train/lr" in row}
    assert lr[2] == pytest.approx(1e-3) and lr[4] == pytest.approx(1e-5)


def test_load_pretrained_and_the_trainer_agree_on_a_truncated_newest_checkpoint(unbroken_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(unbroken_run, run)
    newest = run / "checkpoints" / "step_00000010" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.warns(RuntimeWarning, match="step_00000010/model.safetensors is truncated"):
        model, _ = load_pretrained(run)
    with pytest.warns(RuntimeWarning, match="step_00000010/model.safetensors"):
        assert latest_complete(run / "checkpoints").name == "step_00000008"  # what the trainer resumes from
    for name, value in load_file(str(run / "checkpoints" / "step_00000008" / "model.safetensors")).items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(FileNotFoundError, match="step_00000010/model.safetensors is truncated"):
        load_pretrained(run / "checkpoints" / "step_00000010")


def test_missing_audio_file_stops_with_its_name(corpus, tmp_path):
    """In process: the manifests are checked before the Accelerator (or anything global) is set up."""
    manifest = read_manifest(corpus / "train.tsv")
    broken = tmp_path / "manifests"
    write_manifest(
        broken / "train.tsv",
        manifest.root,
        [*manifest.entries[:5], ManifestEntry("nowhere/lost.wav", 16000), *manifest.entries[5:]],
    )
    write_manifest(broken / "valid.tsv", manifest.root, read_manifest(corpus / "valid.tsv").entries)
    threads = torch.get_num_threads()
    with pytest.raises(AudioReadError, match=r"lost.wav: no such file \(listed in .*train.tsv line 7\)"):
        train_module.main(
            [
                *FAST,
                f"data.manifest_dir={broken}",
                f"training.output_dir={tmp_path / 'run'}",
                "training.tensorboard=false",
            ]
        )
    assert torch.get_num_threads() == threads and not (tmp_path / "run").exists()


def test_unreadable_files_are_skipped_with_a_warning_when_configured(corpus, tmp_path):
    """Two corrupt files listed as the longest utterances land in one batch of 2: that batch is skipped, the run
    still completes its steps, and the warnings name the files."""
    manifest = read_manifest(corpus / "train.tsv")
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ("bad1.wav", "bad2.flac"):
        (audio / name).write_bytes(b"this is not audio" * 100)
    entries = [ManifestEntry(str((manifest.root / e.path).resolve()), e.num_samples) for e in manifest.entries]
    entries += [ManifestEntry(str(audio / "bad1.wav"), 39999), ManifestEntry(str(audio / "bad2.flac"), 39999)]
    write_manifest(tmp_path / "m" / "train.tsv", "/", entries)
    write_manifest(tmp_path / "m" / "valid.tsv", manifest.root, read_manifest(corpus / "valid.tsv").entries)
    run_dir = tmp_path / "run"
    result = _run(
        _command(
            tmp_path / "m",
            run_dir,
            "data.on_error=skip",
            "data.batch_size=2",
            "data.crop_samples=40000",
            "training.steps=16",
            "training.eval_every=16",
            "training.checkpoint_every=16",
            "training.log_every=16",
        )
    )
    assert "bad1.wav" in result.stderr and "bad2.flac" in result.stderr
    assert "batch skipped" in result.stderr
    assert json.loads((run_dir / "results.json").read_text())["step"] == 16


@pytest.fixture(scope="module")
def corpus_of_12(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("speech_corpus", CORPUS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_corpus(tmp_path_factory.mktemp("speech12") / "corpus", num_train=12, num_valid=4)


def test_resume_from_an_older_step_leaves_no_checkpoint_newer_than_the_results(corpus_of_12, tmp_path):
    """The issue's reproduction: steps=10 keep_last=3, then steps=9 keep_last=1 resume_from=step_00000006 left only
    the abandoned run's step_00000010 (what a resume or an export then picked) beside results.json saying step 9."""
    run = tmp_path / "run"
    common = [*FAST, f"data.manifest_dir={corpus_of_12}", f"training.output_dir={run}", "training.eval_every=0"]
    common += ["training.checkpoint_every=2", "training.tensorboard=false"]
    train_module.main([*common, "training.steps=10", "training.keep_last=3"])
    step_6 = run / "checkpoints" / "step_00000006"
    results = train_module.main([*common, "training.steps=9", "training.keep_last=1", f"training.resume_from={step_6}"])
    assert results["step"] == 9 == json.loads((run / "results.json").read_text())["step"]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000009"]
    assert latest_complete(run / "checkpoints").name == "step_00000009"  # what a plain resume continues from
    assert resolve_checkpoint(run)[1].name == "step_00000009"  # what the exports read
    (abandoned,) = (run / "checkpoints").glob("abandoned-*")
    assert {"step_00000008", "step_00000010", "results.json"} <= {p.name for p in abandoned.iterdir()}
    assert json.loads((abandoned / "results.json").read_text())["step"] == 10
