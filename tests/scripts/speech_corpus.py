"""A small synthetic speech-like corpus for the speech recipe's tests (no apt packages needed).

Each utterance is a sequence of voiced segments (harmonics of a gliding pitch under a formant-like envelope) and
noise bursts (fricatives), 0.5 to 2 s long. Utterances alternate between 16 kHz mono WAV and 22.05 kHz stereo FLAC,
so reading, mixing to mono and resampling are all exercised. Imported by the tests with importlib.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def utterance(rng: np.random.Generator, sample_rate: int, seconds: float) -> np.ndarray:
    """A mono float32 speech-like signal of ``seconds`` at ``sample_rate``."""
    total = int(seconds * sample_rate)
    signal = np.zeros(total, dtype=np.float64)
    position = 0
    while position < total:
        length = min(int(rng.uniform(0.05, 0.25) * sample_rate), total - position)
        t = np.arange(length) / sample_rate
        if rng.random() < 0.7:  # voiced: harmonics of a gliding pitch, shaped by one "formant"
            f0 = rng.uniform(90, 220) * (1 + rng.uniform(-0.2, 0.2) * t / max(t[-1], 1e-3))
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate
            formant = rng.uniform(300, 2500)
            segment = sum(
                np.sin(k * phase) * np.exp(-(((k * f0.mean()) - formant) ** 2) / (2 * 400.0**2)) for k in range(1, 20)
            )
        else:  # unvoiced: filtered noise
            segment = np.convolve(rng.standard_normal(length), np.ones(4) / 4, mode="same")
        envelope = np.sin(np.pi * np.arange(length) / max(length, 1)) ** 2
        signal[position : position + length] = segment * envelope * rng.uniform(0.05, 0.3)
        position += length
    return signal.astype(np.float32)


def write_corpus(root: Path, *, num_train: int = 24, num_valid: int = 8, seed: int = 0) -> Path:
    """Write ``root/audio/{train,valid}/spk*/utt*.{wav,flac}`` and ``root/{train,valid}.tsv``; returns ``root``."""
    from simplexvq_recipes.speech.data.audio import audio_info
    from simplexvq_recipes.speech.data.manifest import ManifestEntry, write_manifest

    rng = np.random.default_rng(seed)
    audio = root / "audio"
    for split, count in (("train", num_train), ("valid", num_valid)):
        entries = []
        for index in range(count):
            relative = Path(split) / f"spk{index % 3}" / f"utt{index:03d}"
            path = audio / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            seconds = float(rng.uniform(0.5, 2.0))
            if index % 2 == 0:
                data, rate, suffix = utterance(rng, 16000, seconds), 16000, ".wav"
            else:
                mono = utterance(rng, 22050, seconds)
                data, rate, suffix = np.stack([mono, 0.5 * mono], axis=1), 22050, ".flac"
            sf.write(str(path.with_suffix(suffix)), data, rate)
            relative = relative.with_suffix(suffix)
            entries.append(ManifestEntry(relative.as_posix(), audio_info(audio / relative, 16000)))
        write_manifest(root / f"{split}.tsv", audio, entries)
    return root
