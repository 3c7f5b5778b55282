"""Reading audio files as 16 kHz mono float32 waveforms, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import Tensor


class AudioReadError(RuntimeError):
    """An audio file is missing, unreadable or empty; ``path`` names it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read audio file {self.path}: {reason}")


def audio_info(path: str | Path, sample_rate: int) -> int:
    """Length in samples of ``path`` once resampled to ``sample_rate``; raises :class:`AudioReadError`."""
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(path, "no such file")
    try:
        info = sf.info(str(path))
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError or TypeError on bad files
        raise AudioReadError(path, f"{type(error).__name__}: {error}") from error
    if info.frames <= 0:
        raise AudioReadError(path, "the file holds no audio frames")
    return resampled_length(info.frames, info.samplerate, sample_rate)


def resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
    """Samples after resampling ``frames`` from ``source_rate`` to ``target_rate`` (torchaudio's ceil rule)."""
    return -(-frames * target_rate // source_rate)


def read_audio(
    path: str | Path,
    sample_rate: int,
    *,
    start: int = 0,
    num_samples: int | None = None,
) -> Tensor:
    """Mono float32 waveform of ``path`` at ``sample_rate``: channels averaged, resampled where needed.

    ``start`` / ``num_samples`` select a segment, in samples at ``sample_rate``; files already at that rate are
    read partially, others are read whole, resampled, then cut. Raises :class:`AudioReadError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioReadError(path, "no such file")
    try:
        with sf.SoundFile(str(path)) as file:
            source_rate = file.samplerate
            if source_rate == sample_rate:
                file.seek(min(start, file.frames))
                frames = -1 if num_samples is None else num_samples
                data = file.read(frames=frames, dtype="float32", always_2d=True)
            else:
                data = file.read(dtype="float32", always_2d=True)
    except Exception as error:  # LibsndfileError (a RuntimeError), TypeError on malformed headers, ...
        raise AudioReadError(path, f"{type(error).__name__}: {error}") from error
    if data.shape[0] == 0:
        raise AudioReadError(path, "the file holds no audio frames" if start == 0 else f"nothing after sample {start}")
    waveform = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))
    if source_rate != sample_rate:
        waveform = AF.resample(waveform, source_rate, sample_rate)
        stop = None if num_samples is None else start + num_samples
        waveform = waveform[start:stop]
    if not torch.isfinite(waveform).all():
        raise AudioReadError(path, "the decoded audio contains NaN or Inf samples")
    return waveform
