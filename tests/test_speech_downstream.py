"""Downstream use of a pretrained speech model: feature extraction and an ASR probe (the exports: test_hf_export.py).

Everything runs on a real tiny model (the ``tiny`` preset, trained for a few steps here and saved in the layout
``load_pretrained`` reads) and on real synthetic speech from espeak-ng (skipped with the install command when the
binary is missing).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from simplexvq_recipes.speech.data import synthetic
from simplexvq_recipes.speech.data.audio import AudioReadError, read_audio
from simplexvq_recipes.speech.data.logmel import LogMel, mel_filterbank
from simplexvq_recipes.speech.data.manifest import ManifestEntry, ManifestError, read_manifest, write_manifest
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


def _naive_edit_distance(reference, hypothesis) -> int:
    """Wagner-Fischer dynamic programme over the full table."""
    table = [[i + j if i * j == 0 else 0 for j in range(len(hypothesis) + 1)] for i in range(len(reference) + 1)]
    for i in range(1, len(reference) + 1):
        for j in range(1, len(hypothesis) + 1):
            substitution = table[i - 1][j - 1] + (reference[i - 1] != hypothesis[j - 1])
            table[i][j] = min(substitution, table[i - 1][j] + 1, table[i][j - 1] + 1)
    return table[-1][-1]


def test_edit_distance_equals_the_naive_dynamic_programme():
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog"]
    for _ in range(300):
        reference = "".join(rng.choice(list("abc "), size=int(rng.integers(0, 12))))
        hypothesis = "".join(rng.choice(list("abc "), size=int(rng.integers(0, 12))))
        assert asr_probe.edit_distance(reference, hypothesis) == _naive_edit_distance(reference, hypothesis)
        reference_words = list(rng.choice(words, size=int(rng.integers(0, 8))))
        hypothesis_words = list(rng.choice(words, size=int(rng.integers(0, 8))))
        expected = _naive_edit_distance(reference_words, hypothesis_words)
        assert asr_probe.edit_distance(reference_words, hypothesis_words) == expected
    assert asr_probe.edit_distance("kitten", "sitting") == 3 and asr_probe.edit_distance("", "abc") == 3


def _torchaudio_or_skip():
    """torchaudio, the reference these tests compare against where it imports; skipped where it is not installed
    or does not load beside this torch (its wheels for torch 2.11 and later fail with OSError or undefined symbols)."""
    try:
        import torchaudio
        import torchaudio.functional
    except Exception as error:  # any failure to load means: no reference here
        pytest.skip(f"torchaudio does not import here ({type(error).__name__}: {error})")
    return torchaudio


def _naive_mel_bank(num_freqs: int, num_mels: int, rate: int) -> np.ndarray:
    """HTK triangles from their definition, one weight at a time: corners equally spaced on the mel scale
    ``2595 log10(1 + f / 700)`` from 0 Hz to Nyquist, filter ``m`` rising from corner ``m`` to a peak of 1 at corner
    ``m + 1`` and falling to 0 at corner ``m + 2``, evaluated at the bin frequencies ``k * rate / 2 / (bins - 1)``."""
    top = 2595.0 * math.log10(1.0 + rate / 2 / 700.0)
    corners = [700.0 * (10.0 ** (top * k / (num_mels + 1) / 2595.0) - 1.0) for k in range(num_mels + 2)]
    bank = np.zeros((num_freqs, num_mels))
    for k in range(num_freqs):
        frequency = k * (rate / 2) / (num_freqs - 1)
        for m in range(num_mels):
            left, centre, right = corners[m : m + 3]
            if left < frequency <= centre:
                bank[k, m] = (frequency - left) / (centre - left)
            elif centre < frequency < right:
                bank[k, m] = (right - frequency) / (right - centre)
    return bank


def _naive_log_mel(waveform: np.ndarray, rate: int, num_mels: int, window: int, hop: int) -> np.ndarray:
    """Log-mel features from their definition in float64: reflect padding of half a window, periodic Hann window,
    one explicit DFT per frame, power, :func:`_naive_mel_bank`, ``log(x + 1e-6)``."""
    bank = _naive_mel_bank(window // 2 + 1, num_mels, rate)
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * n / window) for n in range(window)])
    dft = np.exp(-2j * np.pi * np.outer(np.arange(window // 2 + 1), np.arange(window)) / window)
    padded = np.pad(waveform.astype(np.float64), window // 2, mode="reflect")
    frames = [padded[start : start + window] * hann for start in range(0, len(padded) - window + 1, hop)]
    return np.array([np.log(np.abs(dft @ frame) ** 2 @ bank + 1e-6) for frame in frames])


def test_mel_filterbank_equals_the_naive_triangles_and_torchaudio():
    for num_freqs, num_mels, rate in ((65, 12, 8000), (201, 80, 16000)):
        bank = mel_filterbank(num_freqs, num_mels, rate)
        assert bank.shape == (num_freqs, num_mels) and bank.dtype == torch.float32
        np.testing.assert_allclose(bank.numpy(), _naive_mel_bank(num_freqs, num_mels, rate), rtol=0, atol=1e-6)
    assert (bank.sum(dim=0) > 0).all()  # no empty band at 80 bands on 201 bins
    torchaudio_functional = _torchaudio_or_skip().functional  # the filterbank the probe used before
    reference = torchaudio_functional.melscale_fbanks(201, 0.0, 8000.0, 80, 16000, norm=None, mel_scale="htk")
    torch.testing.assert_close(bank, reference, rtol=0, atol=1e-5)  # torchaudio builds it in float32


def test_log_mel_equals_the_naive_definition_and_torchaudio():
    """The probe's log-mel features against a float64 loop over frames (tolerance: float32 STFT rounding, ~1e-6
    relative on the power, so ~1e-5 absolute on the log where the power is far above the 1e-6 floor) and against
    torchaudio's ``MelSpectrogram`` + log (skipped where torchaudio does not import)."""
    rate, window, hop, num_mels = 8000, 64, 24, 10
    rng = np.random.default_rng(0)
    t = np.arange(700) / rate
    waveform = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(700)).astype(np.float32)
    ours = LogMel(rate, num_mels=num_mels, window_samples=window, hop_samples=hop)(torch.from_numpy(waveform))
    expected = _naive_log_mel(waveform, rate, num_mels, window, hop)
    assert ours.shape == expected.shape == (700 // hop + 1, num_mels)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-4)

    probe_features = asr_probe.log_mel(50.0)
    speech_like = torch.from_numpy(rng.standard_normal(16000).astype(np.float32)) * 0.1
    ours = probe_features(speech_like)
    assert ours.shape == (16000 // 320 + 1, 80)
    torchaudio = _torchaudio_or_skip()
    transform = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, win_length=400, hop_length=320, n_mels=80
    )
    reference = (transform(speech_like) + 1e-6).log().T
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="log-mel frames need more than 200"):
        probe_features(torch.zeros(100))


def test_asr_probe_transcribes_held_out_speech_far_better_than_the_no_audio_prior(tiny_run, corpus, tmp_path, capsys):
    """The conv CTC probe on frozen log-mel features transcribes held-out sentences with a CER well under that of
    the best constant transcript (what a probe learns without hearing anything); the probe on the tiny model's
    layer-2 features (three pretraining steps: close to random, so no bound against the prior) runs the same way
    and emits real text. Measured here: log-mel 28.3% CER, tiny model 76.1%, prior 65.5%."""
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


# ------------------------------------------------------------------------------------------------------------------
# a user's folder shapes: errors before any work, naming the manifest and the fix


def _tone_manifest(folder, names=("a", "b", "c")) -> tuple:
    """Three short tone files and their manifest (with a transcript per file)."""
    audio = folder / "audio"
    audio.mkdir(parents=True)
    entries = []
    for index, name in enumerate(names):
        tone = (0.3 * np.sin(2 * np.pi * (300 + 100 * index) * np.arange(8000) / 16000)).astype(np.float32)
        sf.write(audio / f"{name}.wav", tone, 16000)
        entries.append(ManifestEntry(f"{name}.wav", 8000))
    manifest = write_manifest(folder / "split.tsv", audio, entries)
    synthetic.transcript_path(manifest).write_text("".join(f"{name} {name}\n" for name in names))
    return manifest, audio


def test_extract_features_stops_at_deleted_audio_before_writing_anything(tiny_run, tmp_path, capsys):
    manifest, audio = _tone_manifest(tmp_path / "data")
    (audio / "c.wav").unlink()
    out = tmp_path / "features"
    with pytest.raises(SystemExit):
        extract_features.main([str(tiny_run), str(manifest), str(out), "--layers", "1", "--no-progress"])
    error = capsys.readouterr().err
    assert "c.wav: no such file (listed in" in error and "split.tsv line 4); 1 of the 3 files" in error, error
    assert "--on-error skip" in error and not out.exists()
    skip = extract_features.ExtractConfig(
        checkpoint=str(tiny_run), manifest=str(manifest), out_dir=str(out), layers=[1], on_error="skip"
    )
    skip.progress_bar = False
    with pytest.warns(UserWarning, match=r"skipped: .*c\.wav: no such file"):
        index = extract_features.extract(skip)
    assert [row["id"] for row in index.utterances] == ["a", "b"]


def test_extract_features_refuses_an_empty_manifest(tiny_run, tmp_path, capsys):
    empty = write_manifest(tmp_path / "empty.tsv", tmp_path, [])
    out = tmp_path / "features"
    with pytest.raises(SystemExit):
        extract_features.main([str(tiny_run), str(empty), str(out), "--layers", "1", "--no-progress"])
    assert f"error: {empty} lists no audio files" in capsys.readouterr().err and not out.exists()


def test_asr_probe_checks_both_manifests_before_computing_features(tmp_path, monkeypatch):
    train, _ = _tone_manifest(tmp_path / "train")
    valid, valid_audio = _tone_manifest(tmp_path / "valid", names=("d", "e"))
    (valid_audio / "e.wav").unlink()

    def too_late(*args, **kwargs):
        raise AssertionError("features were computed before the manifests were checked")

    monkeypatch.setattr(asr_probe, "compute_features", too_late)
    with pytest.raises(AudioReadError, match=r"e\.wav: no such file \(listed in .*split\.tsv line 3\); 1 of the 2"):
        asr_probe.main([str(train), str(valid), "--features", "logmel", "--no-progress"])
    empty = write_manifest(tmp_path / "empty.tsv", tmp_path, [])
    (tmp_path / "empty.wrd").write_text("")
    with pytest.raises(ManifestError, match=r"empty\.tsv lists no audio files"):
        asr_probe.main([str(empty), str(train), "--features", "logmel", "--no-progress"])


def test_asr_probe_command_prints_a_bad_manifest_in_one_line(tmp_path):
    empty = write_manifest(tmp_path / "empty.tsv", tmp_path, [])
    (tmp_path / "empty.wrd").write_text("")
    command = [sys.executable, "-m", "simplexvq_recipes.speech.downstream.asr_probe", str(empty), str(empty)]
    result = subprocess.run([*command, "--features", "logmel"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: {empty} lists no audio files"), result.stderr
