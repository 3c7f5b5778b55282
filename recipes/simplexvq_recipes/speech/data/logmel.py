"""Log-mel filterbank features from torch's own STFT (no torchaudio): the classic input of speech recognisers.

The filterbank is HTK's (Young et al., *The HTK Book*, section 5.4): triangular filters whose corners are equally
spaced on the mel scale ``mel(f) = 2595 log10(1 + f / 700)``, peak 1, applied to the power spectrum of periodic-Hann
windowed frames (centred, reflect-padded at the ends), then ``log(x + floor)``. With the defaults these are the
features of ``torchaudio.transforms.MelSpectrogram`` (HTK scale, no filter normalisation) followed by that log.
"""

from __future__ import annotations

import torch
from torch import Tensor


def hz_to_mel(frequency: Tensor | float) -> Tensor:
    """HTK's mel scale: ``2595 log10(1 + f / 700)``."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(frequency, dtype=torch.float64) / 700.0)


def mel_to_hz(mel: Tensor | float) -> Tensor:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (torch.as_tensor(mel, dtype=torch.float64) / 2595.0) - 1.0)


def mel_filterbank(
    num_freqs: int, num_mels: int, sample_rate: int, *, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """(num_freqs, num_mels) float32 weights mapping a one-sided power spectrum (``num_freqs`` bins from 0 Hz to the
    Nyquist frequency) to ``num_mels`` triangular mel bands between ``f_min`` and ``f_max`` (default: Nyquist).

    Band ``m`` rises linearly from 0 at corner ``m`` to 1 at corner ``m + 1`` and falls back to 0 at corner
    ``m + 2``, the ``num_mels + 2`` corners equally spaced in mel. Computed in float64, returned as float32.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if num_freqs < 2 or num_mels < 1:
        raise ValueError(f"need num_freqs >= 2 and num_mels >= 1, got {num_freqs} and {num_mels}")
    if not 0.0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= sample_rate / 2, got f_min={f_min}, f_max={f_max}")
    frequencies = torch.linspace(0.0, sample_rate / 2, num_freqs, dtype=torch.float64)
    mels = torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), num_mels + 2, dtype=torch.float64)
    corners = mel_to_hz(mels)
    left, centre, right = corners[:-2], corners[1:-1], corners[2:]
    rising = (frequencies[:, None] - left) / (centre - left)
    falling = (right - frequencies[:, None]) / (right - centre)
    return torch.minimum(rising, falling).clamp_min(0.0).float()


class LogMel:
    """``features(waveform)``: (frames, num_mels) log-mel features of one waveform (samples,).

    Frames of ``window_samples`` (25 ms at 16 kHz) every ``hop_samples``; frame ``t`` is centred on sample
    ``t * hop_samples``, so there are ``samples // hop_samples + 1`` frames.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        *,
        num_mels: int = 80,
        window_samples: int = 400,
        hop_samples: int = 320,
        floor: float = 1e-6,
    ) -> None:
        if window_samples < 2 or hop_samples < 1:
            raise ValueError(f"need window_samples >= 2 and hop_samples >= 1, got {window_samples}, {hop_samples}")
        self.window_samples = window_samples
        self.hop_samples = hop_samples
        self.floor = floor
        self.window = torch.hann_window(window_samples, periodic=True)
        self.filterbank = mel_filterbank(window_samples // 2 + 1, num_mels, sample_rate)

    def power_spectrum(self, waveform: Tensor) -> Tensor:
        """(frames, window_samples // 2 + 1) squared STFT magnitudes."""
        if waveform.dim() != 1:
            raise ValueError(f"expected one waveform of shape (samples,), got {tuple(waveform.shape)}")
        if waveform.shape[0] <= self.window_samples // 2:
            raise ValueError(
                f"the waveform has {waveform.shape[0]} samples; log-mel frames need more than "
                f"{self.window_samples // 2} (half a window)"
            )
        spectrum = torch.stft(
            waveform.float(),
            n_fft=self.window_samples,
            hop_length=self.hop_samples,
            window=self.window.to(waveform.device),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        return spectrum.abs().pow(2).T

    def __call__(self, waveform: Tensor) -> Tensor:
        mel = self.power_spectrum(waveform) @ self.filterbank.to(waveform.device)
        return (mel + self.floor).log()
