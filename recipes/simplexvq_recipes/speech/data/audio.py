"""Reading audio files as 16 kHz mono float32 waveforms, with errors that name the file.

Files at another rate are resampled with soxr (libsoxr's "HQ" linear-phase band-limited resampler, which installs
beside any torch): :func:`resample`, whose output length :func:`resampled_length` predicts.

:func:`audio_info` reads the header only; :func:`verify_audio` also decodes the whole file and checks the container
against the file's size, so that truncated or corrupt files are found before training rather than in the middle
of it (a cut FLAC file has an intact header and fails only once its missing part is decoded).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor

RESAMPLE_QUALITY = "HQ"
"""libsoxr's quality preset: 20-bit precision, passband to 91% of the lower Nyquist frequency (its default)."""


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


def verify_audio(path: str | Path, sample_rate: int, *, block_frames: int = 1 << 16) -> int:
    """:func:`audio_info` after checking that the whole file is there and decodes; raises :class:`AudioReadError`
    saying ``truncated or corrupt`` with the evidence.

    Checks, in order: the container's own size fields (:func:`container_truncation`: a WAV data chunk longer than
    the file, an Ogg stream without its last page, an MP3 shorter than its Xing/Info header says); then every frame
    is decoded (block by block) and must be finite, and the decoded count must equal the header's.
    """
    path = Path(path)
    problem = container_truncation(path) if path.is_file() else None
    if problem is not None:
        raise AudioReadError(path, f"truncated or corrupt: {problem}")
    length = audio_info(path, sample_rate)
    declared = sf.info(str(path)).frames
    decoded = 0
    try:
        with sf.SoundFile(str(path)) as file:
            for block in file.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    raise AudioReadError(path, f"NaN or Inf samples within frames {decoded}-{decoded + len(block)}")
                decoded += len(block)
    except AudioReadError:
        raise
    except Exception as error:  # LibsndfileError, RuntimeError from the decoders
        raise AudioReadError(
            path,
            f"truncated or corrupt: decoding failed after {decoded} of {declared} frames "
            f"({type(error).__name__}: {error})",
        ) from error
    if decoded != declared:
        raise AudioReadError(path, f"truncated or corrupt: the header declares {declared} frames, {decoded} decode")
    return length


def container_truncation(path: str | Path) -> str | None:
    """Why the container says ``path`` is cut short, or ``None``. Decoding alone misses these cases, because the
    decoders stop quietly at the end of the file: a WAV whose data chunk declares more bytes than follow (libsndfile
    shortens its frame count to what is there), an Ogg (Vorbis, Opus) stream whose last page is incomplete or lacks
    the end-of-stream flag, and an MP3 with a Xing/Info header declaring more bytes than the file holds (MP3s
    without that header cannot be checked this way). Other formats return ``None`` (FLAC fails when decoded)."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(12)
        handle.seek(0, 2)
        size = handle.tell()
        if head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
            return _riff_truncation(handle, size, big_endian=head[:4] == b"RIFX")
        if head[:4] == b"OggS":
            handle.seek(max(0, size - _OGG_TAIL_BYTES))
            return _ogg_truncation(handle.read())
        if path.suffix.lower() == ".mp3":
            handle.seek(0)
            return _mp3_truncation(handle.read(1 << 16), size)
    return None


_UNKNOWN_SIZES = (0, 0xFFFFFFFF)  # streamed WAVs leave the data size unset
_OGG_TAIL_BYTES = 27 + 255 + 255 * 255  # the largest possible Ogg page: its header, segment table and body


def _riff_truncation(handle, size: int, *, big_endian: bool) -> str | None:
    order = ">" if big_endian else "<"
    offset = 12
    while offset + 8 <= size:
        handle.seek(offset)
        chunk_id, chunk_size = struct.unpack(order + "4sI", handle.read(8))
        available = size - offset - 8
        if chunk_id == b"data":
            if chunk_size not in _UNKNOWN_SIZES and chunk_size > available:
                return f"the WAV data chunk declares {chunk_size} bytes but the file holds {available}"
            return None
        offset += 8 + chunk_size + (chunk_size & 1)
    return "the WAV file ends before its data chunk"


def _ogg_truncation(tail: bytes) -> str | None:
    """The last page must end exactly at the end of the file and carry the end-of-stream flag (0x04)."""
    position = tail.rfind(b"OggS")
    while position >= 0:
        if position + 27 <= len(tail) and tail[position + 4] == 0:  # stream structure version 0
            segments = tail[position + 26]
            table = tail[position + 27 : position + 27 + segments]
            end = position + 27 + segments + sum(table)
            if len(table) == segments and end == len(tail):
                if tail[position + 5] & 0x04:
                    return None
                return "the Ogg stream has no end-of-stream page (the file stops in the middle of the stream)"
        position = tail.rfind(b"OggS", 0, position)
    return "the last Ogg page is cut off"


def _mp3_truncation(head: bytes, size: int) -> str | None:
    """Compare the byte count of a Xing/Info header (flag 0x2) with the bytes from its MPEG frame to the end. The
    tag counts only inside an MPEG frame: a frame sync (``0xFF``, then 3 set bits) at most 40 bytes before it."""
    for tag in (b"Xing", b"Info"):
        position = head.find(tag)
        if position < 0 or position + 16 > len(head):
            continue
        frame_start = head.rfind(b"\xff", max(0, position - 40), position)
        if frame_start < 0 or head[frame_start + 1] & 0xE0 != 0xE0:
            continue
        (flags,) = struct.unpack(">I", head[position + 4 : position + 8])
        if not flags & 0x2:
            return None
        field = position + 8 + (4 if flags & 0x1 else 0)
        (declared,) = struct.unpack(">I", head[field : field + 4])
        available = size - frame_start
        if declared > available:
            return f"the MP3's {tag.decode()} header declares {declared} bytes but {available} follow"
        return None
    return None


def resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
    """Samples :func:`resample` returns for ``frames`` samples: ``frames * target_rate / source_rate`` rounded to the
    nearest integer, computed in floating point as libsoxr computes it (``frames / (source / target) + 0.5``,
    truncated), so the lengths a manifest records are the lengths read."""
    _check_rates(source_rate, target_rate)
    if source_rate == target_rate:
        return frames
    return int(frames / (source_rate / target_rate) + 0.5)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited resampling of a mono float32 signal (samples,) from ``source_rate`` to ``target_rate`` Hz with
    soxr (:data:`RESAMPLE_QUALITY`); linear phase with its delay removed, so sample ``i`` of the output is the
    signal at time ``i / target_rate``. Returns :func:`resampled_length` samples (float32)."""
    _check_rates(source_rate, target_rate)
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"resample takes one mono signal of shape (samples,), got shape {samples.shape}")
    if source_rate == target_rate:
        return samples
    return soxr.resample(samples, source_rate, target_rate, quality=RESAMPLE_QUALITY)


def _check_rates(source_rate: int, target_rate: int) -> None:
    for name, rate in (("source", source_rate), ("target", target_rate)):
        if not rate > 0:
            raise ValueError(f"the {name} sample rate must be a positive number of samples per second, got {rate}")


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
    samples = data.mean(axis=1, dtype=np.float32)
    if source_rate != sample_rate:
        stop = None if num_samples is None else start + num_samples
        samples = resample(samples, source_rate, sample_rate)[start:stop]
    waveform = torch.from_numpy(np.ascontiguousarray(samples))
    if not torch.isfinite(waveform).all():
        raise AudioReadError(path, "the decoded audio contains NaN or Inf samples")
    return waveform
