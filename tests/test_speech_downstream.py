"""Downstream use of a pretrained speech model: feature extraction and an ASR probe (the exports: test_hf_export.py).

Everything runs on a real tiny model (the ``tiny`` preset, trained for a few steps here and saved in the layout
``load_pretrained`` reads) and on real synthetic speech from espeak-ng (skipped with the install command when the
binary is missing).
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from simplexvq_recipes.speech.data import synthetic
from simplexvq_recipes.speech.data.audio import AudioReadError, read_audio
from simplexvq_recipes.speech.data.manifest import ManifestEntry, read_manifest, write_manifest
from simplexvq_recipes.speech.downstream import asr_probe, export, extract_features
from simplexvq_recipes.speech.pretraining.config import PretrainConfig, preset_path
from simplexvq_recipes.speech.pretraining.model import (
    CHECKPOINTS,
    CONFIG_FILE,
    WEIGHTS_FILE,
    build_model,
    load_pretrained,
)
from simplexvq_recipes.training.checkpoint import TRAINER_STATE
from simplexvq_recipes.training.config import config_to_yaml, load_config


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on small shared CPUs the tiny convolutions run several times faster than with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """160 training and 40 held-out espeak-ng utterances (about 8 minutes of speech)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip(f"espeak-ng is not installed ({synthetic.INSTALL_HINT})")
    out = tmp_path_factory.mktemp("synthetic")
    torch.set_num_threads(1)
    config = synthetic.SyntheticConfig(out_dir=str(out), num_train=160, num_valid=40, seed=3)
    return synthetic.build_corpus(config)


def _write_run(run_dir, config: PretrainConfig, model: torch.nn.Module, step: int) -> None:
    """Save ``model`` the way the recipe's checkpoints are laid out (config.yaml + checkpoints/step_*/)."""
    checkpoint = run_dir / CHECKPOINTS / f"step_{step:08d}"
    checkpoint.mkdir(parents=True)
    (run_dir / CONFIG_FILE).write_text(config_to_yaml(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint / WEIGHTS_FILE))
    (checkpoint / TRAINER_STATE).write_text(json.dumps({"step": step}))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder with a tiny model after three pretraining steps on real (espeak-ng or chirp) audio."""
    torch.set_num_threads(1)
    config = load_config(PretrainConfig, preset_path("tiny"))
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    waveforms = torch.cat([export.check_signal(24000, seed=s) for s in range(4)])
    lengths = torch.tensor([24000, 20000, 18000, 24000])
    for _ in range(3):
        loss = model(waveforms, lengths, generator=torch.Generator().manual_seed(0)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run_dir = tmp_path_factory.mktemp("tiny_run")
    _write_run(run_dir, config, model, step=3)
    return run_dir


def _speech_batch(manifest_path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    manifest = read_manifest(manifest_path)
    items = [read_audio(manifest.audio_path(i), 16000) for i in range(count)]
    lengths = torch.tensor([item.shape[0] for item in items])
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True), lengths


# ------------------------------------------------------------------------------------------------------------------
# synthetic corpus


def test_synthetic_corpus_exact_transcripts_and_disjoint_sentences(corpus):
    train, valid = read_manifest(corpus["train"]), read_manifest(corpus["valid"])
    train_text = synthetic.transcript_path(corpus["train"]).read_text().splitlines()
    valid_text = synthetic.transcript_path(corpus["valid"]).read_text().splitlines()
    assert (len(train), len(valid)) == (len(train_text), len(valid_text)) == (160, 40)
    assert not set(train_text) & set(valid_text), "held-out sentences must not occur in training"
    assert {w for t in valid_text for w in t.split()} <= {w for t in train_text for w in t.split()}
    plan = synthetic.plan_corpus(synthetic.SyntheticConfig(out_dir="unused", num_train=160, num_valid=40, seed=3))
    assert [u.text for u in plan["valid"]] == valid_text  # transcripts are exactly what espeak-ng was asked to say
    for index in (0, len(valid) - 1):
        waveform = read_audio(valid.audio_path(index), 16000)
        assert waveform.shape[0] == valid.entries[index].num_samples
        seconds = waveform.shape[0] / 16000
        assert 0.8 < seconds < 6.0 and float(waveform.abs().max()) > 0.05
        words = len(valid_text[index].split())
        assert 0.8 < words / seconds < 5.0, "a speaking rate of about 1.5-3.5 words per second"


# ------------------------------------------------------------------------------------------------------------------
# feature extraction


def test_extract_features_writes_layers_and_codes_per_utterance(tiny_run, corpus, tmp_path, capsys):
    subset = read_manifest(corpus["valid"])
    manifest = write_manifest(tmp_path / "subset.tsv", subset.root, subset.entries[:4])
    out = tmp_path / "features"
    index = extract_features.main([str(tiny_run), str(manifest), str(out), "--layers", "2", "0"])
    assert "4 utterances" in capsys.readouterr().out
    assert extract_features.read_index(out).utterances == index.utterances
    settings = index.settings
    assert settings["layers"] == [0, 2] and settings["frame_rate"] == 50.0 and settings["groups"] == 1

    model, config = load_pretrained(tiny_run)
    dim, codebook_size = config.model.embed_dim, config.model.quantizer.codebook_size
    assert settings["embed_dim"] == dim and settings["codebook_size"] == codebook_size
    for row, entry in enumerate(subset.entries[:4]):
        item = index.utterances[row]
        assert item["id"] == entry.path.removesuffix(".wav") and item["file"].endswith(".safetensors")
        arrays = index.load(row)
        frames = int(model.frame_lengths(torch.tensor(entry.num_samples)))
        assert item["num_frames"] == frames
        assert arrays["layer_0"].shape == arrays["layer_2"].shape == (frames, dim)
        assert arrays["layer_2"].dtype == np.float32
        assert arrays["codes"].shape == (frames, 1) and arrays["codes"].dtype == np.int32
        assert 0 <= arrays["codes"].min() and arrays["codes"].max() < codebook_size
        waveform = read_audio(subset.audio_path(row), 16000)
        with torch.no_grad():
            encoded = model.encode(waveform[None], layers=[2])
        assert np.array_equal(arrays["layer_2"], encoded.layers[2][0].numpy())
        assert np.array_equal(arrays["codes"], encoded.codes[0].numpy())
    assert len(np.unique(np.concatenate([index.load(r)["codes"] for r in range(4)]))) > 1

    # re-running keeps the files; other settings need --overwrite; npz holds the same arrays
    first = out / index.utterances[0]["file"]
    written = first.stat().st_mtime_ns
    extract_features.main([str(tiny_run), str(manifest), str(out), "--layers", "0", "2", "--no-progress"])
    assert first.stat().st_mtime_ns == written
    with pytest.raises(SystemExit):
        extract_features.main([str(tiny_run), str(manifest), str(out), "--layers", "1", "--no-progress"])
    assert "--overwrite" in capsys.readouterr().err
    npz = extract_features.main(
        [str(tiny_run), str(manifest), str(tmp_path / "npz"), "--layers", "0", "2", "--format", "npz", "--no-progress"]
    )
    for row in range(4):
        a, b = index.load(row), npz.load(row)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_extract_features_names_unreadable_audio(tiny_run, corpus, tmp_path, capsys):
    subset = read_manifest(corpus["valid"])
    shutil.copy(subset.audio_path(0), tmp_path / "good.wav")
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wave file")
    entries = [ManifestEntry("good.wav", subset.entries[0].num_samples), ManifestEntry("broken.wav", 16000)]
    manifest = write_manifest(tmp_path / "bad.tsv", tmp_path, entries)
    config = extract_features.ExtractConfig(
        checkpoint=str(tiny_run), manifest=str(manifest), out_dir=str(tmp_path / "out"), layers=[1], progress_bar=False
    )
    with pytest.raises(AudioReadError, match=r"broken\.wav.*bad\.tsv line 3"):
        extract_features.extract(config)
    with pytest.raises(SystemExit):
        extract_features.main([str(tiny_run), str(manifest), str(tmp_path / "cli"), "--layers", "1", "--no-progress"])
    assert "broken.wav" in capsys.readouterr().err

    config.on_error, config.overwrite = "skip", True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = extract_features.extract(config)
    assert [row["id"] for row in index.utterances] == ["good"]
    assert any("broken.wav" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------------------------------------
# ASR probe


def test_error_rates_and_greedy_ctc_decoding():
    cer, wer = asr_probe.error_rates(["the cat sat", "a dog"], ["the bat sat", "a dog"])
    assert cer == pytest.approx(1 / 16) and wer == pytest.approx(1 / 5)
    assert asr_probe.error_rates(["abc"], [""]) == (1.0, 1.0)
    # frames: a a blank a b b blank -> pieces a a b (class i is piece i - 1)
    frames = torch.tensor([2, 2, 0, 2, 3, 3, 0, 1])
    log_probs = torch.nn.functional.one_hot(frames, 5).float().log()
    assert asr_probe.greedy_decode(log_probs, length=7) == [1, 1, 2]
    tokenizer = asr_probe.train_tokenizer(["the cat sat on the mat", "a dog ran"] * 20, "char", 40)
    assert tokenizer.decode(tokenizer.encode("a cat ran")) == "a cat ran"


def test_asr_probe_transcribes_held_out_speech_far_better_than_the_no_audio_prior(tiny_run, corpus, tmp_path, capsys):
    """The conv CTC probe on frozen log-mel features transcribes held-out sentences with a CER well under that of
    the best constant transcript (what a probe learns without hearing anything); the probe on the tiny model's
    layer-2 features (three pretraining steps: close to random, so no bound against the prior) runs the same way
    and emits real text. Measured here: log-mel 28% CER, tiny model 80%, prior 65.5%."""
    common = [str(corpus["train"]), str(corpus["valid"]), "--checkpoint", str(tiny_run), "--layer", "2"]
    common += ["--epochs", "30", "--hidden-dim", "64", "--no-progress"]
    out = tmp_path / "probe.json"
    results = asr_probe.main([*common, "--features", "pretrained", "logmel", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "| pretrained:layer_2 | 64 |" in printed and "| logmel | 80 |" in printed
    saved = json.loads(out.read_text())
    assert [r["features"] for r in saved["results"]] == ["pretrained:layer_2", "logmel", asr_probe.PRIOR]
    assert saved["config"]["tokenizer"] == "char" and saved["config"]["layer"] == 2
    probe, logmel, prior = results
    assert 0.5 < prior.cer < 0.9, prior  # the sentences share a grammar: a constant guess gets some characters
    assert logmel.cer < 0.65 * prior.cer and logmel.wer < 0.9, (logmel.cer, logmel.wer, prior.cer)
    assert probe.cer < 0.95 and any(hypothesis.strip() for _, hypothesis in probe.examples), probe
    assert probe.train_loss < 3.0 and logmel.train_loss < 1.5, (probe.train_loss, logmel.train_loss)
