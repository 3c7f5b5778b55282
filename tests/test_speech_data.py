"""Speech data: manifests, audio reading and resampling, bad files, crops, length-aware sharded batching."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from simplexvq_recipes.speech.data import manifest as manifest_cli
from simplexvq_recipes.speech.data.audio import (
    AudioReadError,
    audio_info,
    read_audio,
    resample,
    resampled_length,
    verify_audio,
)
from simplexvq_recipes.speech.data.batching import ShardedBatchSampler, length_batches
from simplexvq_recipes.speech.data.dataset import AudioDataset, SkippedAudioWarning, collate, make_loader
from simplexvq_recipes.speech.data.manifest import (
    ManifestEntry,
    ManifestError,
    read_manifest,
    split_entries,
    write_manifest,
)

CORPUS = Path(__file__).parent / "scripts" / "speech_corpus.py"


def _corpus_module():
    spec = importlib.util.spec_from_file_location("speech_corpus", CORPUS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchaudio_or_skip():
    """torchaudio, the reference these tests compare against where it imports; skipped where it is not installed
    or does not load beside this torch (its wheels for torch 2.11 and later fail with OSError or undefined symbols)."""
    try:
        import torchaudio
        import torchaudio.functional
    except Exception as error:  # any failure to load means: no reference here
        pytest.skip(f"torchaudio does not import here ({type(error).__name__}: {error})")
    return torchaudio


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono, -0.5 * mono], axis=1)


# ---------------------------------------------------------------------------------------------------------------
# reading audio


def test_read_audio_16k_wav_exact_and_partial(tmp_path):
    data = _tone(1.0, 16000)
    sf.write(tmp_path / "a.wav", data, 16000, subtype="FLOAT")
    assert audio_info(tmp_path / "a.wav", 16000) == 16000
    full = read_audio(tmp_path / "a.wav", 16000)
    assert full.dtype == torch.float32 and torch.equal(full, torch.from_numpy(data))
    part = read_audio(tmp_path / "a.wav", 16000, start=1000, num_samples=500)
    assert torch.equal(part, torch.from_numpy(data[1000:1500]))


def test_read_audio_resamples_and_mixes_to_mono(tmp_path):
    stereo = _tone(0.5, 44100, channels=2)
    sf.write(tmp_path / "b.flac", stereo, 44100)
    decoded, _ = sf.read(tmp_path / "b.flac", dtype="float32")
    expected = torch.from_numpy(resample(decoded.mean(axis=1).astype(np.float32), 44100, 16000))
    waveform = read_audio(tmp_path / "b.flac", 16000)
    assert waveform.shape == expected.shape == (audio_info(tmp_path / "b.flac", 16000),)
    torch.testing.assert_close(waveform, expected)
    # the mono mix (x - x/2) / 2 of a 0.3 tone has amplitude 0.075: resampling keeps a 440 Hz tone's amplitude
    assert waveform[2000:-2000].abs().max().item() == pytest.approx(0.075, rel=0.02)
    segment = read_audio(tmp_path / "b.flac", 16000, start=100, num_samples=300)
    torch.testing.assert_close(segment, expected[100:400])


SINES = ((440.0, 0.2, 0.0), (1234.5, 0.2, 0.3), (3000.0, 0.2, 0.6), (6000.0, 0.2, 0.9))
"""(frequency, amplitude, phase) of a test signal; all below 0.75 x the Nyquist frequency of 16 kHz."""


def _sines(rate: int, num_samples: int, below: float) -> np.ndarray:
    """The components of :data:`SINES` under ``below`` Hz, sampled at ``rate``."""
    t = np.arange(num_samples) / rate
    return sum(a * np.sin(2 * np.pi * f * t + phase) for f, a, phase in SINES if f < below)


@pytest.mark.parametrize("source_rate", [8000, 22050, 44100, 48000])
def test_resample_equals_the_analytic_signal_at_the_new_rate(source_rate):
    """A sum of sines sampled at ``source_rate`` and resampled to 16 kHz is the same sum sampled at 16 kHz: no delay,
    no gain error. Measured interior error: 4.4e-5 (22.05 and 44.1 kHz), 2e-7 (8 and 48 kHz) for a signal of peak
    0.8; the bound 2e-4 is libsoxr HQ's 20-bit precision (1e-6 of full scale) with a margin for the 6 kHz component
    at 75% of the target Nyquist frequency. The first and last 50 ms are left out: there the resampler sees the
    zeros beyond the signal's ends, an analytic sine does not."""
    below = 0.4 * min(source_rate, 16000)
    source = _sines(source_rate, source_rate, below).astype(np.float32)
    resampled = resample(source, source_rate, 16000)
    assert resampled.dtype == np.float32 and resampled.shape == (16000,)
    expected = _sines(16000, 16000, below)
    interior = slice(800, -800)
    np.testing.assert_allclose(resampled[interior], expected[interior], rtol=0, atol=2e-4)


def test_resample_agrees_with_torchaudio_within_torchaudio_s_own_error():
    """Against ``torchaudio.functional.resample`` (the resampler the recipe used before soxr; skipped where
    torchaudio does not import): on the band-limited test signal the two agree to 5e-3 in the interior. That is the
    size of torchaudio's own error against the analytic signal (3.3e-3 at 44.1 and 22.05 kHz, 4.4e-3 at 8 kHz,
    measured): its short windowed-sinc filter (6 zero crossings, roll-off 0.99) attenuates the 6 kHz component,
    soxr's does not (the previous test bounds soxr's error by 2e-4), so the difference is torchaudio's error."""
    torchaudio_functional = _torchaudio_or_skip().functional
    for source_rate in (8000, 22050, 44100):
        below = 0.4 * min(source_rate, 16000)
        source = _sines(source_rate, source_rate, below).astype(np.float32)
        ours = resample(source, source_rate, 16000)
        theirs = torchaudio_functional.resample(torch.from_numpy(source), source_rate, 16000).numpy()
        assert abs(len(theirs) - len(ours)) <= 1  # torchaudio rounds the length up, soxr to the nearest
        reference_error = np.abs(theirs[800:15200] - _sines(16000, 16000, below)[800:15200]).max()
        difference = np.abs(ours[800:15200] - theirs[800:15200]).max()
        assert difference < 5e-3 and difference < reference_error + 2e-4, (source_rate, difference, reference_error)


def test_resampled_length_is_what_resample_returns():
    """Manifest lengths (:func:`audio_info`) must be the lengths read: a sweep of rates and lengths, including
    exact half-sample ties (1720 samples 12 -> 22.05 kHz: 3160.5), against soxr's output."""
    rates = (8000, 11025, 12000, 16000, 22050, 44100, 48000, 96000)
    cases = [(1720, 12000, 22050), (480, 96000, 44100), (999, 16000, 8000), (1, 44100, 16000), (3, 48000, 16000)]
    rng = np.random.default_rng(0)
    cases += [(int(rng.integers(1, 20000)), int(rng.choice(rates)), int(rng.choice(rates))) for _ in range(300)]
    for frames, source_rate, target_rate in cases:
        actual = len(soxr.resample(np.zeros(frames, np.float32), source_rate, target_rate))
        assert resampled_length(frames, source_rate, target_rate) == actual, (frames, source_rate, target_rate)
        assert len(resample(np.zeros(frames, np.float32), source_rate, target_rate)) == actual


def test_resample_rejects_bad_rates_and_shapes():
    with pytest.raises(ValueError, match="target sample rate must be a positive"):
        resample(np.zeros(10, np.float32), 16000, 0)
    with pytest.raises(ValueError, match="source sample rate must be a positive"):
        resampled_length(10, -1, 16000)
    with pytest.raises(ValueError, match=r"mono signal of shape \(samples,\)"):
        resample(np.zeros((10, 2), np.float32), 44100, 16000)


def test_read_audio_errors_name_the_file(tmp_path):
    with pytest.raises(AudioReadError, match="missing.wav.*no such file"):
        read_audio(tmp_path / "missing.wav", 16000)
    (tmp_path / "garbage.wav").write_bytes(b"RIFF this is not audio" * 10)
    with pytest.raises(AudioReadError, match="garbage.wav"):
        read_audio(tmp_path / "garbage.wav", 16000)
    with pytest.raises(AudioReadError, match="garbage.wav"):
        audio_info(tmp_path / "garbage.wav", 16000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioReadError, match="empty.wav: the file holds no audio frames"):
        audio_info(tmp_path / "empty.wav", 16000)


def _truncate(path: Path, fraction: float) -> Path:
    """A copy of ``path`` cut after ``fraction`` of its bytes (a partial download or an interrupted copy)."""
    data = path.read_bytes()
    cut = path.with_name(f"cut_{path.name}")
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


@pytest.mark.parametrize(
    ("suffix", "format_", "subtype", "evidence"),
    [
        ("wav", "WAV", "PCM_16", "WAV data chunk declares 32000 bytes but the file holds"),
        ("flac", "FLAC", "PCM_16", "decoding failed after"),
        ("ogg", "OGG", "VORBIS", "Ogg page is cut off"),
        ("mp3", "MP3", "MPEG_LAYER_III", "Xing header declares"),
    ],
)
def test_verify_audio_finds_truncated_files_whose_header_reads_fine(tmp_path, suffix, format_, subtype, evidence):
    noise = np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32)
    whole = tmp_path / f"a.{suffix}"
    sf.write(whole, noise, 16000, format=format_, subtype=subtype)
    assert verify_audio(whole, 16000) == audio_info(whole, 16000) == 16000
    cut = _truncate(whole, 0.9)
    with pytest.raises(AudioReadError, match=rf"cut_a\.{suffix}: truncated or corrupt: .*{evidence}"):
        verify_audio(cut, 16000)
    if suffix in ("flac", "mp3"):  # the header still promises the whole length: the case the check exists for
        assert audio_info(cut, 16000) == 16000


def test_verify_audio_accepts_a_wav_with_an_unset_data_size_and_rejects_a_missing_data_chunk(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(0.25, 16000), 16000, subtype="PCM_16")
    data = bytearray((tmp_path / "a.wav").read_bytes())
    position = data.find(b"data")
    streamed = data[:]
    streamed[position + 4 : position + 8] = b"\xff\xff\xff\xff"  # written by a streaming encoder: size unknown
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    assert verify_audio(tmp_path / "streamed.wav", 16000) == 4000
    (tmp_path / "headless.wav").write_bytes(bytes(data[:position]))
    with pytest.raises(AudioReadError, match="headless.wav"):
        verify_audio(tmp_path / "headless.wav", 16000)


# ---------------------------------------------------------------------------------------------------------------
# manifests


def test_manifest_roundtrip_and_errors(tmp_path):
    entries = [ManifestEntry("x/a.wav", 16000), ManifestEntry("y/b.flac", 8000)]
    path = write_manifest(tmp_path / "m.tsv", tmp_path / "audio", entries)
    lines = path.read_text().splitlines()
    assert lines == [str((tmp_path / "audio").resolve()), "x/a.wav\t16000", "y/b.flac\t8000"]
    manifest = read_manifest(path)
    assert manifest.entries == entries and manifest.root == (tmp_path / "audio").resolve()
    assert manifest.audio_path(1) == (tmp_path / "audio" / "y" / "b.flac").resolve()
    assert manifest.where(1).endswith("m.tsv line 3")

    (tmp_path / "bad.tsv").write_text("/root\nok.wav\t10\nbroken line without tab\n")
    with pytest.raises(ManifestError, match=r"bad.tsv line 3: expected 'relative_path<TAB>num_samples'"):
        read_manifest(tmp_path / "bad.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ManifestError, match="first line must be the root"):
        read_manifest(tmp_path / "empty.tsv")
    with pytest.raises(FileNotFoundError, match="nothing.tsv"):
        read_manifest(tmp_path / "nothing.tsv")


def test_split_holds_out_whole_groups():
    entries = [ManifestEntry(f"spk{s}/utt{u}.wav", 100) for s in range(10) for u in range(5)]
    train, valid = split_entries(entries, 0.2, seed=3, group_depth=1)
    assert len(train) + len(valid) == 50 and len(valid) == 10
    train_groups = {e.path.split("/")[0] for e in train}
    valid_groups = {e.path.split("/")[0] for e in valid}
    assert not train_groups & valid_groups and len(valid_groups) == 2
    assert split_entries(entries, 0.2, seed=3, group_depth=1) == (train, valid)  # deterministic
    by_file_train, by_file_valid = split_entries(entries, 0.1, seed=0)
    assert len(by_file_valid) == 5 and not {e.path for e in by_file_train} & {e.path for e in by_file_valid}


def test_manifest_command_writes_split_and_warns_about_unreadable_files(tmp_path, capsys):
    audio = tmp_path / "audio"
    for speaker in range(4):
        for utt in range(3):
            (audio / f"spk{speaker}").mkdir(parents=True, exist_ok=True)
            sf.write(audio / f"spk{speaker}" / f"u{utt}.wav", _tone(0.25 + 0.25 * utt, 16000), 16000)
    sf.write(audio / "spk0" / "hi.flac", _tone(0.5, 32000), 32000)
    (audio / "spk1" / "broken.wav").write_bytes(b"not audio at all")
    with pytest.warns(UserWarning, match="broken.wav"):
        train_path, valid_path = manifest_cli.main(
            [str(audio), str(tmp_path / "out"), "--valid-percent", "0.25", "--group-depth", "1"]
        )
    train, valid = read_manifest(train_path), read_manifest(valid_path)
    assert len(train) + len(valid) == 13  # 12 WAV + 1 FLAC, the broken file left out
    assert {e.path.split("/")[0] for e in train.entries}.isdisjoint({e.path.split("/")[0] for e in valid.entries})
    lengths = {e.path: e.num_samples for e in train.entries + valid.entries}
    assert lengths["spk0/hi.flac"] == 8000 and lengths["spk2/u2.wav"] == 12000  # counted at 16 kHz
    assert f"{len(train)} train and {len(valid)} valid files" in capsys.readouterr().out
    with pytest.raises(AudioReadError, match="broken.wav"):
        manifest_cli.main([str(audio), str(tmp_path / "strict"), "--strict"])


def test_manifest_command_says_when_it_writes_an_empty_valid_manifest(tmp_path, capsys):
    """A folder of one file (or --valid-percent 0) gives an empty valid.tsv, which the pretraining recipe refuses:
    the tool says so when it writes it, not the training run later."""
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "only.wav", _tone(0.5, 16000), 16000)
    _, valid_path = manifest_cli.main([str(audio), str(tmp_path / "out"), "--valid-percent", "0.1"])
    assert len(read_manifest(valid_path)) == 0
    assert f"note: {valid_path} lists no files (--valid-percent 0.1 of 1 file(s)" in capsys.readouterr().out


def test_manifest_command_leaves_out_truncated_audio_with_a_message_naming_it(tmp_path, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    for index in range(3):
        sf.write(audio / f"u{index}.flac", _tone(0.5, 16000), 16000)
    truncated = _truncate(audio / "u1.flac", 0.6)  # header intact: the header-only scan measured it as whole
    with pytest.warns(UserWarning, match=r"cut_u1\.flac: truncated or corrupt"):
        train_path, valid_path = manifest_cli.main([str(audio), str(tmp_path / "out"), "--valid-percent", "0.3"])
    listed = {e.path for e in read_manifest(train_path).entries + read_manifest(valid_path).entries}
    assert listed == {"u0.flac", "u1.flac", "u2.flac"}
    assert "left out 1 unreadable or truncated file(s)" in capsys.readouterr().out
    with pytest.raises(AudioReadError, match=r"1 unreadable or truncated file\(s\), first: .*cut_u1\.flac"):
        manifest_cli.main([str(audio), str(tmp_path / "strict"), "--strict"])
    train_path, valid_path = manifest_cli.main([str(audio), str(tmp_path / "fast"), "--header-only"])
    listed = {e.path for e in read_manifest(train_path).entries + read_manifest(valid_path).entries}
    assert truncated.name in listed  # the documented trade-off of --header-only


# ---------------------------------------------------------------------------------------------------------------
# datasets


@pytest.fixture
def corpus(tmp_path):
    return _corpus_module().write_corpus(tmp_path / "corpus", num_train=10, num_valid=4)


def test_dataset_crops_are_random_per_epoch_deterministic_and_in_range(corpus):
    manifest = read_manifest(corpus / "train.tsv")
    dataset = AudioDataset(manifest, crop_samples=8000, seed=5)
    long_index = max(range(len(dataset)), key=lambda i: manifest.entries[dataset.indices[i]].num_samples)
    full = read_audio(manifest.audio_path(dataset.indices[long_index]), 16000)
    starts = {dataset.crop_start(long_index, epoch) for epoch in range(8)}
    assert len(starts) > 1 and all(0 <= s <= full.shape[0] - 8000 for s in starts)
    index, crop = dataset[(long_index, 3)]
    start = dataset.crop_start(long_index, 3)
    assert index == long_index and crop.shape == (8000,)
    torch.testing.assert_close(crop, full[start : start + 8000])
    assert torch.equal(dataset[(long_index, 3)][1], crop)
    assert dataset.lengths == [min(manifest.entries[row].num_samples, 8000) for row in dataset.indices]
    centred = AudioDataset(manifest, crop_samples=8000, random_crop=False)
    assert centred.crop_start(long_index, 0) == centred.crop_start(long_index, 9) == (full.shape[0] - 8000) // 2


def test_dataset_min_samples_and_normalize(corpus):
    manifest = read_manifest(corpus / "train.tsv")
    dataset = AudioDataset(manifest, min_samples=20000, normalize=True)
    kept = [manifest.entries[row].num_samples for row in dataset.indices]
    assert all(length >= 20000 for length in kept) and dataset.num_too_short == len(manifest) - len(kept)
    _, waveform = dataset[0]
    assert abs(waveform.mean().item()) < 1e-4 and waveform.std().item() == pytest.approx(1.0, abs=1e-3)


def test_missing_file_raises_naming_file_and_manifest_line(corpus):
    manifest = read_manifest(corpus / "train.tsv")
    missing = manifest.audio_path(3)
    missing.unlink()
    with pytest.raises(AudioReadError, match=rf"{missing.name}: no such file \(listed in .*train.tsv line 5\)"):
        AudioDataset(manifest)
    with pytest.warns(SkippedAudioWarning, match=missing.name):
        dataset = AudioDataset(manifest, on_error="skip")
    assert len(dataset) == len(manifest) - 1 and 3 not in dataset.indices


def test_unreadable_file_raises_or_is_skipped_when_read(corpus):
    manifest = read_manifest(corpus / "train.tsv")
    broken = manifest.audio_path(2)
    broken.write_bytes(b"definitely not audio" * 50)
    dataset = AudioDataset(manifest)  # the file exists: the problem shows when it is read
    with pytest.raises(AudioReadError, match=rf"{broken.name}.*listed in .*train.tsv line 4"):
        dataset[(2, 0)]
    skipping = AudioDataset(manifest, on_error="skip")
    with pytest.warns(SkippedAudioWarning, match=broken.name):
        assert skipping[(2, 0)] == (2, None)
    batch = collate([skipping[(1, 0)], (2, None), skipping[(0, 0)]])
    assert batch.indices == [1, 0] and batch.waveforms.shape[0] == 2
    assert collate([(2, None)]).waveforms.shape == (0, 0)


def test_collate_pads_with_zeros():
    batch = collate([(0, torch.ones(3)), (5, torch.full((5,), 2.0))])
    assert batch.lengths.tolist() == [3, 5] and batch.indices == [0, 5]
    assert batch.waveforms.tolist() == [[1, 1, 1, 0, 0], [2, 2, 2, 2, 2]]


# ---------------------------------------------------------------------------------------------------------------
# batching


def test_length_batches_respect_limits_and_group_similar_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1000, 50000, size=200).tolist()
    batches = length_batches(lengths, batch_size=8, max_tokens=120_000, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= 8 and (len(batch) == 1 or len(batch) * longest <= 120_000)
    padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    assert padding < 0.05 * sum(lengths)  # similar lengths batched together
    assert batches == length_batches(lengths, batch_size=8, max_tokens=120_000, seed=1, epoch=0)
    assert batches != length_batches(lengths, batch_size=8, max_tokens=120_000, seed=1, epoch=1)
    assert length_batches([5, 100, 7], batch_size=2, shuffle=False) == [[1, 2], [0]]


def test_sharded_sampler_even_shards_disjoint_and_resumable():
    lengths = [1000 + 10 * i for i in range(23)]
    shards = [ShardedBatchSampler(lengths, batch_size=4, seed=0, num_replicas=2, rank=r) for r in range(2)]
    for sampler in shards:
        sampler.set_epoch(2)
    per_rank = [list(sampler) for sampler in shards]
    assert len(per_rank[0]) == len(per_rank[1]) == len(shards[0]) == 3  # 6 batches, 3 each
    assert all(epoch == 2 for batch in per_rank[0] for _, epoch in batch)
    seen = [index for batches in per_rank for batch in batches for index, _ in batch]
    assert sorted(seen) == list(range(23))  # every utterance once
    shards[1].set_start(1)
    assert list(shards[1]) == per_rank[1][1:]

    uneven = ShardedBatchSampler(lengths, batch_size=5, num_replicas=2, rank=0)  # 5 batches -> 3 + 3 with padding
    assert len(uneven) == 3 == len(ShardedBatchSampler(lengths, batch_size=5, num_replicas=2, rank=1))
    validation = [
        ShardedBatchSampler(lengths, batch_size=5, shuffle=False, even=False, num_replicas=2, rank=r) for r in range(2)
    ]
    assert [len(v) for v in validation] == [3, 2]
    assert sorted(i for v in validation for batch in v for i, _ in batch) == list(range(23))
    with pytest.raises(ValueError, match="no utterances"):
        ShardedBatchSampler([], batch_size=2)


def test_loader_does_not_touch_the_global_rng(corpus):
    dataset = AudioDataset(read_manifest(corpus / "train.tsv"), crop_samples=8000)
    loader = make_loader(dataset, ShardedBatchSampler(dataset.lengths, batch_size=3))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(loader)
    assert torch.equal(torch.rand(3), expected)
    assert sum(len(b) for b in batches) == len(dataset)
    assert all(b.waveforms.shape[1] == b.lengths.max().item() <= 8000 for b in batches)


# ---------------------------------------------------------------------------------------------------------------
# a user's folder shapes: one clear line naming the file and the fix, before anything is written

TINY_RUN = ["--preset", "tiny", "data.batch_size=4", "data.min_samples=4000", "training.progress_bar=false"]


def _manifest_dir_with(corpus: Path, tmp_path: Path, empty: str) -> Path:
    """A copy of the corpus manifests with ``<empty>.tsv`` listing no files (as the manifest tool writes it)."""
    folder = tmp_path / "manifests"
    for split in ("train", "valid"):
        entries = [] if split == empty else read_manifest(corpus / f"{split}.tsv").entries
        write_manifest(folder / f"{split}.tsv", corpus / "audio", entries)
    return folder


@pytest.mark.parametrize("empty", ["train", "valid"])
def test_an_empty_manifest_stops_training_with_its_name_before_anything_is_written(corpus, tmp_path, empty):
    from simplexvq_recipes.speech.pretraining import train as train_module

    folder = _manifest_dir_with(corpus, tmp_path, empty)
    run_dir = tmp_path / "run"
    with pytest.raises(ManifestError, match=rf"{empty}\.tsv lists no audio files; write it with python -m "):
        train_module.main([*TINY_RUN, f"data.manifest_dir={folder}", f"training.output_dir={run_dir}"])
    assert not run_dir.exists()


def test_the_training_command_reports_an_empty_manifest_in_one_line(corpus, tmp_path):
    folder = _manifest_dir_with(corpus, tmp_path, "train")
    command = [sys.executable, "-m", "simplexvq_recipes.speech.pretraining.train", *TINY_RUN]
    command += [f"data.manifest_dir={folder}", f"training.output_dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_one_thread_env())
    assert result.returncode == 2, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and f"{folder / 'train.tsv'} lists no audio files" in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def _one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_a_manifest_whose_utterances_are_all_too_short_names_min_samples(corpus):
    manifest = read_manifest(corpus / "train.tsv")
    longest = max(entry.num_samples for entry in manifest.entries)
    with pytest.raises(
        ManifestError,
        match=rf"all 10 utterances listed in .*train\.tsv are shorter than "
        rf"min_samples={longest + 1} samples \(the longest has {longest}\): lower min_samples",
    ):
        AudioDataset(manifest, min_samples=longest + 1)


def test_a_missing_manifest_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/train\.tsv does not exist; its folder .*nowhere does not"):
        read_manifest(tmp_path / "nowhere" / "train.tsv")


def test_a_folder_given_as_manifest_names_the_manifests_inside(corpus):
    with pytest.raises(ManifestError, match=r"is a folder; give the manifest file inside it \(train\.tsv, valid\.tsv"):
        read_manifest(corpus)


def test_a_binary_file_given_as_manifest_is_named(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(0.1, 16000), 16000)
    with pytest.raises(ManifestError, match=r"a\.wav is not a text manifest"):
        read_manifest(tmp_path / "a.wav")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_manifest_whose_audio_root_moved_names_line_1(corpus, tmp_path, on_error):
    moved = tmp_path / "moved"
    (corpus / "audio").rename(moved)
    with pytest.raises(
        ManifestError,
        match=r"train\.tsv line 1: the audio root .*audio does not exist, so none of "
        r"its 10 files can be read; if the audio moved, put its new folder on line 1",
    ):
        AudioDataset(read_manifest(corpus / "train.tsv"), on_error=on_error)


def test_audio_deleted_after_the_manifest_was_made_is_counted_and_named(corpus):
    manifest = read_manifest(corpus / "train.tsv")
    for row in (3, 6):
        manifest.audio_path(row).unlink()
    with pytest.raises(
        AudioReadError,
        match=r"no such file \(listed in .*train\.tsv line 5\); 2 of the 10 files "
        r"listed there are missing: restore them, write the manifest again .*data\.on_error=skip",
    ):
        AudioDataset(manifest)
    with pytest.warns(SkippedAudioWarning):
        assert len(AudioDataset(manifest, on_error="skip")) == 8
    for row in range(len(manifest)):
        manifest.audio_path(row).unlink(missing_ok=True)
    with pytest.raises(ManifestError, match=r"none of the 10 audio files listed in .*train\.tsv can be used \(10 miss"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedAudioWarning)
            AudioDataset(manifest, on_error="skip")


def test_dataset_rejects_a_non_positive_sample_rate_or_crop(corpus):
    manifest = read_manifest(corpus / "train.tsv")
    with pytest.raises(ValueError, match=r"sample_rate \(data\.sample_rate\) must be a positive number"):
        AudioDataset(manifest, sample_rate=0)
    with pytest.raises(ValueError, match=r"crop_samples \(data\.crop_samples\) must be a positive number"):
        AudioDataset(manifest, crop_samples=0)


def test_the_manifest_command_reports_a_missing_audio_folder_in_one_line(tmp_path):
    command = [sys.executable, "-m", "simplexvq_recipes.speech.data.manifest", str(tmp_path / "nowhere")]
    result = subprocess.run([*command, str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: audio folder {tmp_path / 'nowhere'} does not exist"), result.stderr
    assert not (tmp_path / "out").exists()
