"""fairseq-style audio manifests: the first line is the root folder, then ``relative_path<TAB>num_samples``.

``num_samples`` is the length at the recipe's sample rate (16 kHz), i.e. the file's own frame count for 16 kHz
audio as in fairseq. As a command, writes ``train.tsv`` and ``valid.tsv`` for a folder of audio files::

    python -m simplexvq_recipes.speech.data.manifest AUDIO_DIR OUT_DIR --valid-percent 0.05 [--group-depth 1]

``--group-depth N`` holds out whole folders (the first N path components: speakers, chapters, levels) instead
of single files, so no group is split between train and valid.

Every file is decoded in full and checked against its container's size fields
(:func:`~simplexvq_recipes.speech.data.audio.verify_audio`): a truncated or corrupt file is left out with a
warning that names it and says why (``--strict`` stops at it instead), so that it cannot stop a training run
midway. ``--header-only`` reads only the headers: much faster, but a file cut short after an intact header passes.
"""

from __future__ import annotations

import argparse
import random
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from simplexvq_recipes.speech.data.audio import AudioReadError, audio_info, verify_audio
from simplexvq_recipes.training.atomic import atomic_write_text
from simplexvq_recipes.training.cli import run_cli

AUDIO_EXTENSIONS = ("flac", "wav", "ogg", "mp3", "opus")


class ManifestError(ValueError):
    """A manifest file is malformed; the message names the file and the line."""


@dataclass(frozen=True)
class ManifestEntry:
    """One audio file: its path relative to the manifest root and its length in samples (at 16 kHz)."""

    path: str
    num_samples: int


@dataclass
class Manifest:
    """A parsed manifest; ``source`` is the file it was read from (for error messages)."""

    root: Path
    entries: list[ManifestEntry]
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def audio_path(self, index: int) -> Path:
        return self.root / self.entries[index].path

    def where(self, index: int) -> str:
        """Human-readable origin of an entry: ``train.tsv line 7``."""
        return f"{self.source or 'manifest'} line {index + 2}"


def read_manifest(path: str | Path) -> Manifest:
    """Parse a manifest; a missing or unreadable file or a malformed line raises an error naming the file (and line)
    and the fix. The audio files are not looked at (see :func:`missing_audio`)."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(child.name for child in path.glob("*.tsv"))
        hint = f" ({', '.join(inside)} are there)" if inside else ""
        raise ManifestError(f"{path} is a folder; give the manifest file inside it{hint}")
    if not path.is_file():
        folder = "" if path.parent.is_dir() else f"; its folder {path.parent} does not exist either"
        raise FileNotFoundError(f"manifest {path} does not exist{folder} (write one with python -m {__name__})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ManifestError(
            f"{path} is not a text manifest ({error.reason} at byte {error.start}); a manifest's first line is the "
            f"audio root, then one 'relative_path<TAB>num_samples' per file (write one with python -m {__name__})"
        ) from None
    if not lines or not lines[0].strip():
        raise ManifestError(f"{path}: the first line must be the root folder of the audio files")
    root = Path(lines[0].strip())
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    entries = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[1].strip().lstrip("-").isdigit():
            raise ManifestError(f"{path} line {number}: expected 'relative_path<TAB>num_samples', got {line!r}")
        num_samples = int(fields[1])
        if num_samples < 0:
            raise ManifestError(f"{path} line {number}: num_samples must be >= 0, got {num_samples}")
        entries.append(ManifestEntry(fields[0], num_samples))
    return Manifest(root=root, entries=entries, source=path)


def missing_audio(manifest: Manifest, rows: Iterable[int] | None = None) -> list[int]:
    """The rows (all, or those of ``rows``) whose audio file does not exist."""
    rows = range(len(manifest)) if rows is None else rows
    return [row for row in rows if not manifest.audio_path(row).is_file()]


def missing_audio_error(manifest: Manifest, missing: Sequence[int], skip_hint: str | None = None) -> Exception:
    """One-line error for audio files listed in ``manifest`` but missing on disk (``missing``: their rows, not
    empty): a :class:`ManifestError` when the root folder itself is gone (the audio moved), else an
    :class:`AudioReadError` naming the first missing file, its line and how many are missing. ``skip_hint`` says
    how the caller's command leaves missing files out (``data.on_error=skip``, ``--on-error skip``), if it can."""
    source = manifest.source or "the manifest"
    rewrite = f"write the manifest again with python -m {__name__} AUDIO_DIR OUT_DIR"
    if not manifest.root.is_dir():
        return ManifestError(
            f"{source} line 1: the audio root {manifest.root} does not exist, so none of its {len(manifest)} files "
            f"can be read; if the audio moved, put its new folder on line 1, or {rewrite}"
        )
    first = missing[0]
    fixes = (
        f"restore them, {rewrite}, or leave them out with {skip_hint}" if skip_hint else f"restore them or {rewrite}"
    )
    return AudioReadError(
        manifest.audio_path(first),
        f"no such file (listed in {manifest.where(first)}); {len(missing)} of the {len(manifest)} files listed "
        f"there are missing: {fixes}",
    )


def write_manifest(path: str | Path, root: str | Path, entries: Iterable[ManifestEntry]) -> Path:
    """Write a manifest atomically; ``root`` is stored as an absolute path."""
    path = Path(path)
    lines = [str(Path(root).resolve())] + [f"{entry.path}\t{entry.num_samples}" for entry in entries]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _measure(job: tuple[str, str, int, bool]) -> tuple[str, int | None, str | None]:
    root, relative, sample_rate, decode = job
    measure = verify_audio if decode else audio_info
    try:
        return relative, measure(Path(root) / relative, sample_rate), None
    except AudioReadError as error:
        return relative, None, str(error)


def scan_audio(
    audio_dir: str | Path,
    *,
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
    sample_rate: int = 16000,
    jobs: int = 1,
    decode: bool = True,
) -> tuple[list[ManifestEntry], list[str]]:
    """Every audio file under ``audio_dir`` (sorted) with its length; unreadable, empty, truncated or corrupt files
    are returned separately as error messages (so the caller decides whether to warn or stop). ``decode=False``
    reads only the headers (fast, but a file cut short after an intact header passes)."""
    audio_dir = Path(audio_dir)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"audio folder {audio_dir} does not exist")
    suffixes = {"." + ext.lower().lstrip(".") for ext in extensions}
    files = sorted(p.relative_to(audio_dir).as_posix() for p in audio_dir.rglob("*") if p.suffix.lower() in suffixes)
    jobs_list = [(str(audio_dir), relative, sample_rate, decode) for relative in files]
    if jobs > 1 and len(files) > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_measure, jobs_list, chunksize=64))
    else:
        results = [_measure(job) for job in jobs_list]
    entries = [ManifestEntry(relative, length) for relative, length, _ in results if length is not None]
    errors = [error for _, _, error in results if error is not None]
    return entries, errors


def group_of(entry: ManifestEntry, depth: int) -> str:
    """The first ``depth`` folders of an entry's path (the entry itself for depth 0)."""
    if depth <= 0:
        return entry.path
    return "/".join(Path(entry.path).parts[:depth])


def split_entries(
    entries: Sequence[ManifestEntry], valid_percent: float, *, seed: int = 0, group_depth: int = 0
) -> tuple[list[ManifestEntry], list[ManifestEntry]]:
    """Random (train, valid) split holding out about ``valid_percent`` of the files, whole groups at a time."""
    if not 0.0 <= valid_percent < 1.0:
        raise ValueError(f"valid_percent must be in [0, 1), got {valid_percent}")
    groups = sorted({group_of(entry, group_depth) for entry in entries})
    random.Random(seed).shuffle(groups)
    wanted = valid_percent * len(entries)
    held_out: set[str] = set()
    sizes = {group: 0 for group in groups}
    for entry in entries:
        sizes[group_of(entry, group_depth)] += 1
    count = 0
    for group in groups:
        if count >= wanted or len(held_out) == len(groups) - 1:
            break
        held_out.add(group)
        count += sizes[group]
    train = [entry for entry in entries if group_of(entry, group_depth) not in held_out]
    valid = [entry for entry in entries if group_of(entry, group_depth) in held_out]
    return train, valid


def split_by_groups(
    entries: Sequence[ManifestEntry], valid_groups: Iterable[str], *, group_depth: int = 1
) -> tuple[list[ManifestEntry], list[ManifestEntry]]:
    """(train, valid) with the named groups (first ``group_depth`` folders) held out."""
    held_out = set(valid_groups)
    train = [entry for entry in entries if group_of(entry, group_depth) not in held_out]
    valid = [entry for entry in entries if group_of(entry, group_depth) in held_out]
    return train, valid


def write_split(
    out_dir: str | Path,
    root: str | Path,
    train: Sequence[ManifestEntry],
    valid: Sequence[ManifestEntry],
    *,
    train_name: str = "train",
    valid_name: str = "valid",
) -> tuple[Path, Path]:
    """Write ``<train_name>.tsv`` and ``<valid_name>.tsv`` into ``out_dir``."""
    out_dir = Path(out_dir)
    return (
        write_manifest(out_dir / f"{train_name}.tsv", root, train),
        write_manifest(out_dir / f"{valid_name}.tsv", root, valid),
    )


def main(argv: Sequence[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("audio_dir", type=Path, help="folder searched recursively for audio files")
    parser.add_argument("out_dir", type=Path, help="where train.tsv and valid.tsv are written")
    parser.add_argument("--valid-percent", type=float, default=0.01, help="fraction held out (default 0.01)")
    parser.add_argument("--group-depth", type=int, default=0, help="hold out whole folders of this depth")
    parser.add_argument("--ext", nargs="+", default=list(AUDIO_EXTENSIONS), help="audio file extensions")
    parser.add_argument("--sample-rate", type=int, default=16000, help="rate the lengths are counted at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="processes reading (and decoding) the files")
    parser.add_argument("--strict", action="store_true", help="stop at the first unreadable or truncated file")
    parser.add_argument(
        "--header-only",
        action="store_true",
        help="read only the headers (fast; does not detect files cut short after an intact header)",
    )
    args = parser.parse_args(argv)

    entries, errors = scan_audio(
        args.audio_dir, extensions=args.ext, sample_rate=args.sample_rate, jobs=args.jobs, decode=not args.header_only
    )
    if errors and args.strict:
        raise AudioReadError(args.audio_dir, f"{len(errors)} unreadable or truncated file(s), first: {errors[0]}")
    for error in errors:
        warnings.warn(f"left out of the manifest: {error}", stacklevel=1)
    if errors:
        print(
            f"left out {len(errors)} unreadable or truncated file(s), listed in the warnings: copy or decode them "
            "again (or delete them) and re-run to include them; --strict stops at the first one instead"
        )
    if not entries:
        raise FileNotFoundError(f"no readable audio files ({', '.join(args.ext)}) under {args.audio_dir}")
    train, valid = split_entries(entries, args.valid_percent, seed=args.seed, group_depth=args.group_depth)
    paths = write_split(args.out_dir, args.audio_dir, train, valid)
    hours = sum(entry.num_samples for entry in entries) / args.sample_rate / 3600
    print(f"{len(train)} train and {len(valid)} valid files ({hours:.2f} h) -> {paths[0]}, {paths[1]}")
    if not valid:
        print(
            f"note: {paths[1]} lists no files (--valid-percent {args.valid_percent} of {len(entries)} file(s), "
            f"{'groups' if args.group_depth else 'files'} held out whole): the pretraining recipe validates on it, so "
            "raise --valid-percent, or add audio"
        )
    return paths


if __name__ == "__main__":
    run_cli(main)
