"""Build the demo's speech corpus from Debian's ``fillets-ng-data-cs`` / ``-nl`` packages (Czech and Dutch dialogue).

The game's voiced dialogue lives in ``/usr/share/games/fillets-ng/sound/<level>/<language>/*.ogg`` (about 3 h of
human speech in 80 level folders, 22.05 or 44.1 kHz, mono or stereo Vorbis). This converts it to 16 kHz mono FLAC
under ``OUT_DIR/audio/<level>/<language>/`` and writes ``OUT_DIR/train.tsv`` / ``valid.tsv``, holding out whole
level folders (:data:`VALID_LEVELS`, every 10th level in alphabetical order) so no dialogue scene is in both::

    apt-get install -y fillets-ng-data-cs fillets-ng-data-nl
    python -m simplexvq_recipes.speech.data.prepare_fillets ~/.cache/simplexvq/fillets-16k

Files already converted are kept (re-running is cheap) as long as ``OUT_DIR/conversion.json`` says they were made
the way this version converts (:func:`conversion`: rate, resampler, format); a folder converted otherwise (or
before that file existed) is converted again, so every copy of the corpus holds the same samples. Empty or
unreadable files are left out with a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import soundfile as sf

from simplexvq_recipes.speech.data.audio import RESAMPLE_QUALITY, AudioReadError, read_audio
from simplexvq_recipes.speech.data.manifest import scan_audio, split_by_groups, write_split
from simplexvq_recipes.training.atomic import atomic_write_json
from simplexvq_recipes.training.cli import run_cli

SOURCE = Path("/usr/share/games/fillets-ng/sound")
LANGUAGES = ("cs", "nl")
SAMPLE_RATE = 16000
VALID_LEVELS = ("bathroom", "cellar", "dump", "floppy", "kitchen", "party2", "society", "viking2")
PACKAGES = "fillets-ng-data-cs fillets-ng-data-nl"
CONVERSION_FILE = "conversion.json"


def conversion() -> dict[str, str | int]:
    """How the files are converted; a folder whose ``conversion.json`` differs is converted again."""
    return {"sample_rate": SAMPLE_RATE, "resampler": f"soxr {RESAMPLE_QUALITY}", "format": "FLAC PCM_16 mono"}


def is_converted(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds manifests of audio converted the way :func:`prepare` converts now."""
    out_dir = Path(out_dir)
    stamp = out_dir / CONVERSION_FILE
    manifests = all((out_dir / f"{split}.tsv").is_file() for split in ("train", "valid"))
    return manifests and stamp.is_file() and json.loads(stamp.read_text()) == conversion()


def default_cache_dir() -> Path:
    """``$SIMPLEXVQ_CACHE/fillets-16k``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` + ``simplexvq/fillets-16k``."""
    if "SIMPLEXVQ_CACHE" in os.environ:
        return Path(os.environ["SIMPLEXVQ_CACHE"]) / "fillets-16k"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "simplexvq" / "fillets-16k"


def find_sources(
    source: Path = SOURCE, languages: Sequence[str] = LANGUAGES, levels: Sequence[str] | None = None
) -> list[Path]:
    """The ``.ogg`` speech files of the chosen languages (and levels), sorted; an error says what to install."""
    files = sorted(p for lang in languages for p in source.glob(f"*/{lang}/*.ogg"))
    if levels is not None:
        wanted = set(levels)
        files = [p for p in files if p.parent.parent.name in wanted]
    if not files:
        raise FileNotFoundError(
            f"no speech files for languages {', '.join(languages)} under {source}; install them with "
            f"`apt-get install -y {PACKAGES}`"
        )
    return files


def _convert(job: tuple[str, str, bool]) -> str | None:
    """Convert one file to 16 kHz mono FLAC (unless it is there and ``keep``); returns an error message instead of
    raising."""
    import torch

    torch.set_num_threads(1)
    source, target, keep = Path(job[0]), Path(job[1]), job[2]
    if keep and target.is_file():
        return None
    try:
        waveform = read_audio(source, SAMPLE_RATE)
    except AudioReadError as error:
        return str(error)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    sf.write(str(temporary), waveform.clamp(-1.0, 1.0).numpy(), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    os.replace(temporary, target)
    return None


def prepare(
    out_dir: str | Path,
    *,
    source: Path = SOURCE,
    languages: Sequence[str] = LANGUAGES,
    levels: Sequence[str] | None = None,
    valid_levels: Sequence[str] = VALID_LEVELS,
    jobs: int = 2,
) -> tuple[Path, Path]:
    """Convert the speech files and write the manifests; returns the paths of ``train.tsv`` and ``valid.tsv``."""
    out_dir = Path(out_dir)
    audio_dir = out_dir / "audio"
    files = find_sources(source, languages, levels)
    stamp = out_dir / CONVERSION_FILE
    keep = stamp.is_file() and json.loads(stamp.read_text()) == conversion()
    if audio_dir.is_dir() and not keep:
        print(f"converting {audio_dir} again: its files were not made by this conversion ({conversion()})")
    jobs_list = [(str(p), str(audio_dir / p.relative_to(source).with_suffix(".flac")), keep) for p in files]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            errors = list(pool.map(_convert, jobs_list, chunksize=16))
    else:
        errors = [_convert(job) for job in jobs_list]
    for error in errors:
        if error is not None:
            warnings.warn(f"left out of the corpus: {error}", stacklevel=2)
    atomic_write_json(stamp, conversion())
    entries, unreadable = scan_audio(audio_dir, extensions=("flac",), sample_rate=SAMPLE_RATE, jobs=jobs)
    for error in unreadable:
        warnings.warn(f"left out of the manifests: {error}", stacklevel=2)
    train, valid = split_by_groups(entries, valid_levels, group_depth=1)
    if not train or not valid:
        raise ValueError(
            f"the split by level folder is empty (train {len(train)}, valid {len(valid)} files); include at least "
            f"one of the validation levels {', '.join(valid_levels)} and one other level"
        )
    return write_split(out_dir, audio_dir, train, valid)


def main(argv: Sequence[str] | None = None) -> tuple[Path, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, nargs="?", default=None, help=f"default: {default_cache_dir()}")
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--languages", nargs="+", default=list(LANGUAGES))
    parser.add_argument("--levels", nargs="+", default=None, help="only these level folders (default: all)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    out_dir = args.out_dir or default_cache_dir()
    train, valid = prepare(out_dir, source=args.source, languages=args.languages, levels=args.levels, jobs=args.jobs)
    for path in (train, valid):
        lines = path.read_text().splitlines()[1:]
        hours = sum(int(line.split("\t")[1]) for line in lines) / SAMPLE_RATE / 3600
        print(f"{path}: {len(lines)} files, {hours:.2f} h")
    return train, valid


if __name__ == "__main__":
    run_cli(main)
