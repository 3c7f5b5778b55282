"""Audio datasets over manifests: random crops, bad files handled as configured, padded batches."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from simplexvq_recipes.speech.data.audio import AudioReadError, read_audio
from simplexvq_recipes.speech.data.batching import ShardedBatchSampler
from simplexvq_recipes.speech.data.manifest import Manifest, ManifestError, missing_audio, missing_audio_error

MANIFEST_COMMAND = Manifest.__module__
"""The module that writes manifests (python -m ...), named in errors."""

ON_ERROR = ("raise", "skip")


class SkippedAudioWarning(RuntimeWarning):
    """An unreadable or missing audio file was left out (``data.on_error=skip``)."""


@dataclass
class Batch:
    """Zero-padded waveforms (B, samples), their valid ``lengths`` (B,) and dataset ``indices``."""

    waveforms: Tensor
    lengths: Tensor
    indices: list[int]

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.waveforms.to(device), self.lengths.to(device), self.indices)


class AudioDataset(torch.utils.data.Dataset):
    """Utterances of a manifest, cropped to at most ``crop_samples`` samples.

    Items are addressed by ``(index, epoch)`` keys (see :class:`~simplexvq_recipes.speech.data.batching.
    ShardedBatchSampler`): with ``random_crop`` the crop offset is drawn from a generator seeded by
    ``(seed, epoch, index)``, so crops are random, differ between epochs, and do not depend on worker processes or
    on where a run was resumed. Without it the crop is centred.

    ``on_error="raise"``: a missing file (checked when the dataset is built) or an unreadable one (when read)
    raises :class:`AudioReadError` naming the file and its manifest line. ``"skip"``: such files are left out with
    a :class:`SkippedAudioWarning` naming them, and :meth:`__getitem__` returns ``None`` for them. A manifest left
    with no utterance (empty, every file missing or shorter than ``min_samples``) raises :class:`ManifestError`
    naming it and the fix, so that a training run stops before it writes anything.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        sample_rate: int = 16000,
        crop_samples: int | None = None,
        min_samples: int = 0,
        normalize: bool = False,
        on_error: str = "raise",
        random_crop: bool = True,
        seed: int = 0,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        if not sample_rate > 0:
            raise ValueError(
                f"sample_rate (data.sample_rate) must be a positive number of samples per second, got {sample_rate}"
            )
        if crop_samples is not None and crop_samples < 1:
            raise ValueError(
                f"crop_samples (data.crop_samples) must be a positive number of samples, got {crop_samples}"
            )
        self.manifest = manifest
        self.sample_rate = sample_rate
        self.crop_samples = crop_samples
        self.normalize = normalize
        self.on_error = on_error
        self.random_crop = random_crop
        self.seed = seed
        long_enough = [row for row, entry in enumerate(manifest.entries) if entry.num_samples >= max(min_samples, 1)]
        self.num_too_short = len(manifest) - len(long_enough)
        missing = missing_audio(manifest, long_enough)
        if missing and (on_error == "raise" or not manifest.root.is_dir()):
            raise missing_audio_error(manifest, missing, "on_error=skip (data.on_error=skip in the recipe)")
        for row in missing:
            self._fail(row, AudioReadError(manifest.audio_path(row), "no such file"))
        self.indices: list[int] = sorted(set(long_enough) - set(missing))  # manifest rows kept
        if not self.indices:
            raise ManifestError(self._nothing_left(min_samples, len(missing)))

    def _nothing_left(self, min_samples: int, num_missing: int) -> str:
        """Why no utterance of the manifest is usable, naming the file and the fix."""
        source = self.manifest.source or "the manifest"
        if not self.manifest.entries:
            return (
                f"{source} lists no audio files; write it with python -m {MANIFEST_COMMAND} AUDIO_DIR OUT_DIR "
                "(--valid-percent above 0 for a non-empty valid.tsv)"
            )
        if num_missing:
            return (
                f"none of the {len(self.manifest)} audio files listed in {source} can be used ({num_missing} missing, "
                f"{self.num_too_short} shorter than min_samples={min_samples}): restore the missing files, or write "
                f"the manifest again with python -m {MANIFEST_COMMAND} AUDIO_DIR OUT_DIR"
            )
        longest = max(entry.num_samples for entry in self.manifest.entries)
        return (
            f"all {len(self.manifest)} utterances listed in {source} are shorter than min_samples={min_samples} "
            f"samples (the longest has {longest}): lower min_samples (data.min_samples) or use longer recordings"
        )

    def _fail(self, row: int, error: AudioReadError) -> None:
        error = AudioReadError(error.path, f"{error.reason} (listed in {self.manifest.where(row)})")
        if self.on_error == "raise":
            raise error
        warnings.warn(f"skipping audio: {error}", SkippedAudioWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def lengths(self) -> list[int]:
        """Length of each item after cropping (what batching sees)."""
        crop = self.crop_samples
        lengths = [self.manifest.entries[row].num_samples for row in self.indices]
        return lengths if crop is None else [min(length, crop) for length in lengths]

    def crop_start(self, index: int, epoch: int) -> int:
        """First sample of the crop of item ``index`` in ``epoch``."""
        length = self.manifest.entries[self.indices[index]].num_samples
        if self.crop_samples is None or length <= self.crop_samples:
            return 0
        if not self.random_crop:
            return (length - self.crop_samples) // 2
        return int(np.random.default_rng([self.seed, epoch, index]).integers(0, length - self.crop_samples + 1))

    def __getitem__(self, key: tuple[int, int] | int) -> tuple[int, Tensor | None]:
        """``(index, waveform)``; the waveform is ``None`` when the file was skipped."""
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        row = self.indices[index]
        try:
            waveform = read_audio(
                self.manifest.audio_path(row),
                self.sample_rate,
                start=self.crop_start(index, epoch),
                num_samples=self.crop_samples,
            )
        except AudioReadError as error:
            self._fail(row, error)
            return index, None
        if self.normalize:
            waveform = (waveform - waveform.mean()) / (waveform.std() + 1e-5)
        return index, waveform


def collate(items: list[tuple[int, Tensor | None]]) -> Batch:
    """Pad waveforms with zeros to the longest; items that could not be read (``None``) are dropped."""
    kept = [(index, item) for index, item in items if item is not None]
    if not kept:
        return Batch(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), [])
    longest = max(item.shape[0] for _, item in kept)
    waveforms = torch.zeros(len(kept), longest)
    for row, (_, item) in enumerate(kept):
        waveforms[row, : item.shape[0]] = item
    lengths = torch.tensor([item.shape[0] for _, item in kept], dtype=torch.long)
    return Batch(waveforms, lengths, [i for i, _ in kept])


def make_loader(
    dataset: AudioDataset, sampler: ShardedBatchSampler, *, num_workers: int = 0, seed: int = 0
) -> torch.utils.data.DataLoader:
    """A DataLoader over ``sampler``'s batches with its own generator, so creating an iterator never draws from the
    global RNG (a resumed run must see the same random numbers as an uninterrupted one)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )
