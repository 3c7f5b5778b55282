"""A small English speech corpus with exact transcripts, synthesised by espeak-ng (for probes and tests).

Sentences come from a small hand-written grammar (about 150 words), so every word of a held-out sentence was heard
in training while the sentences themselves differ; each utterance gets its own voice (espeak-ng voice + variant),
speed and pitch. Writes 16 kHz mono WAV files and fairseq-style manifests with aligned transcripts::

    apt-get install -y espeak-ng
    python -m simplexvq_recipes.speech.data.synthetic OUT_DIR --train 400 --valid 60

    OUT_DIR/audio/{train,valid}/*.wav
    OUT_DIR/train.tsv, valid.tsv     manifests (first line the audio root, then ``path<TAB>num_samples``)
    OUT_DIR/train.wrd, valid.wrd     one lower-case transcript per manifest row, same order (fairseq's ``.wrd``)

Train and valid sentences are disjoint; ``--held-out-voices N`` also keeps the last N voices for valid only.
"""

from __future__ import annotations

import argparse
import io
import random
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
import torch

from simplexvq_recipes.speech.data.audio import resample
from simplexvq_recipes.speech.data.manifest import ManifestEntry, write_manifest
from simplexvq_recipes.training.atomic import atomic_write_text
from simplexvq_recipes.training.cli import run_cli

SAMPLE_RATE = 16000
TRANSCRIPT_SUFFIX = ".wrd"
INSTALL_HINT = "apt-get install -y espeak-ng"

VOICES = (
    "en-us+m1",
    "en-us+f2",
    "en-gb+m3",
    "en-gb+f3",
    "en-us+m5",
    "en-gb-scotland+m2",
    "en-029+f4",
    "en-gb-x-rp+m4",
    "en-us-nyc+f1",
    "en-us+m7",
)
"""espeak-ng voices with variants (``+m1`` ... ``+f4``): the "speakers" of the corpus."""

WORDS: dict[str, tuple[str, ...]] = {
    "name": ("anna", "peter", "maria", "john", "lucy", "david", "emma", "oscar", "sarah", "tom"),
    "adj": ("red", "small", "old", "happy", "green", "quiet", "heavy", "bright", "cold", "little", "yellow", "new"),
    "noun": ("dog", "cat", "boat", "house", "apple", "chair", "window", "garden", "letter", "table", "bird", "car"),
    "nouns": ("dogs", "cats", "boats", "apples", "chairs", "letters", "birds", "books", "flowers", "stones"),
    "verb": ("found", "painted", "carried", "washed", "opened", "sold", "watched", "moved", "cleaned", "bought"),
    "place": ("kitchen", "river", "market", "station", "forest", "school", "village", "harbour", "bridge", "park"),
    "prep": ("near", "behind", "under", "inside", "beside", "across"),
    "count": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "twelve"),
    "time": ("today", "tomorrow", "tonight", "in the morning", "after lunch", "on monday", "every day"),
    "order": ("open", "paint", "carry", "wash", "move", "clean", "close", "bring"),
}

TEMPLATES = (
    "the {adj} {noun} {verb} the {noun}",
    "{name} {verb} {count} {adj} {nouns}",
    "{name} and {name} {verb} the {noun} {prep} the {place}",
    "the {adj} {noun} was {prep} the {place} {time}",
    "{name} said the {noun} was {adj}",
    "please {order} the {adj} {noun} {time}",
    "there are {count} {nouns} {prep} the old {place}",
    "{name} {verb} one {adj} {noun} at the {place} {time}",
)


@dataclass(kw_only=True)
class SyntheticConfig:
    """Size, randomness and voices of a synthetic corpus."""

    out_dir: str
    num_train: int = 400
    num_valid: int = 60
    seed: int = 0
    voices: list[str] = field(default_factory=lambda: list(VOICES))
    held_out_voices: int = 0
    """The last ``held_out_voices`` voices speak only validation utterances (0: voices shared by both splits)."""
    speed: tuple[int, int] = (140, 185)
    """Words per minute, drawn uniformly per utterance."""
    pitch: tuple[int, int] = (30, 70)
    """espeak-ng pitch (0-99), drawn uniformly per utterance."""
    jobs: int = 2


@dataclass(frozen=True)
class Utterance:
    """One utterance to synthesise: its file name, exact transcript and how it is spoken."""

    name: str
    text: str
    voice: str
    speed: int
    pitch: int


def make_sentence(rng: random.Random) -> str:
    """One sentence of the grammar (lower case, no punctuation: exactly what espeak-ng is asked to say)."""
    template = rng.choice(TEMPLATES)
    words = []
    for piece in template.split():
        if piece.startswith("{") and piece.endswith("}"):
            words.append(rng.choice(WORDS[piece[1:-1]]))
        else:
            words.append(piece)
    return " ".join(words)


def make_sentences(count: int, rng: random.Random, exclude: set[str] | None = None) -> list[str]:
    """``count`` distinct sentences, none of them in ``exclude``."""
    exclude = set(exclude or ())
    sentences: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(sentences) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"the grammar cannot produce {count} distinct new sentences")
        sentence = make_sentence(rng)
        if sentence not in seen and sentence not in exclude:
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def plan_corpus(config: SyntheticConfig) -> dict[str, list[Utterance]]:
    """The utterances of each split (deterministic in ``config.seed``); valid sentences never occur in train."""
    if config.num_train < 1 or config.num_valid < 1:
        raise ValueError("the corpus needs at least one train and one valid utterance")
    if not 0 <= config.held_out_voices < len(config.voices):
        raise ValueError(f"held_out_voices must be in [0, {len(config.voices) - 1}], got {config.held_out_voices}")
    rng = random.Random(config.seed)
    train_text = make_sentences(config.num_train, rng)
    valid_text = make_sentences(config.num_valid, rng, exclude=set(train_text))
    split_at = len(config.voices) - config.held_out_voices
    voices = {
        "train": config.voices[:split_at],
        "valid": config.voices[split_at:] if config.held_out_voices else config.voices,
    }
    plan: dict[str, list[Utterance]] = {}
    for split, texts in (("train", train_text), ("valid", valid_text)):
        plan[split] = [
            Utterance(
                name=f"{split}/{split}_{index:05d}.wav",
                text=text,
                voice=rng.choice(voices[split]),
                speed=rng.randint(*config.speed),
                pitch=rng.randint(*config.pitch),
            )
            for index, text in enumerate(texts)
        ]
    return plan


def espeak_binary() -> str:
    """Path of ``espeak-ng``; an error says how to install it."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise FileNotFoundError(f"espeak-ng is not installed; install it with `{INSTALL_HINT}`")
    return binary


def synthesize(utterance: Utterance, binary: str | None = None) -> torch.Tensor:
    """16 kHz mono float32 waveform of one utterance (espeak-ng speaks at 22.05 kHz; resampled here)."""
    command = [binary or espeak_binary(), "-v", utterance.voice, "-s", str(utterance.speed)]
    command += ["-p", str(utterance.pitch), "--stdout", utterance.text]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        message = result.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"espeak-ng failed for voice {utterance.voice!r} ({result.returncode}): {message}")
    data, rate = sf.read(io.BytesIO(result.stdout), dtype="float32", always_2d=True)
    return torch.from_numpy(resample(data.mean(axis=1, dtype="float32"), rate, SAMPLE_RATE))


def _write(job: tuple[Utterance, Path, str]) -> ManifestEntry:
    utterance, audio_dir, binary = job
    target = audio_dir / utterance.name
    if not target.is_file():
        waveform = synthesize(utterance, binary)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        sf.write(str(temporary), waveform.clamp(-1.0, 1.0).numpy(), SAMPLE_RATE, format="WAV", subtype="PCM_16")
        temporary.replace(target)
    return ManifestEntry(utterance.name, sf.info(str(target)).frames)


def build_corpus(config: SyntheticConfig) -> dict[str, Path]:
    """Synthesise the corpus (files already there are kept) and write manifests and transcripts.

    Returns the manifest path of each split (``train``, ``valid``); the transcripts are the same paths with the
    suffix ``.wrd``.
    """
    binary = espeak_binary()
    out_dir = Path(config.out_dir)
    audio_dir = out_dir / "audio"
    manifests: dict[str, Path] = {}
    for split, utterances in plan_corpus(config).items():
        jobs = [(utterance, audio_dir, binary) for utterance in utterances]
        with ThreadPoolExecutor(max(1, config.jobs)) as pool:  # the work happens in espeak-ng subprocesses
            entries = list(pool.map(_write, jobs))
        manifests[split] = write_manifest(out_dir / f"{split}.tsv", audio_dir, entries)
        atomic_write_text(transcript_path(manifests[split]), "".join(f"{u.text}\n" for u in utterances))
    return manifests


def transcript_path(manifest: str | Path) -> Path:
    """The transcript file that goes with a manifest: ``train.tsv`` -> ``train.wrd``."""
    return Path(manifest).with_suffix(TRANSCRIPT_SUFFIX)


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=400, help="training utterances (default 400)")
    parser.add_argument("--valid", type=int, default=60, help="held-out utterances (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out-voices", type=int, default=0, help="voices used for valid only (default 0)")
    parser.add_argument("--jobs", type=int, default=2, help="espeak-ng processes at a time")
    args = parser.parse_args(argv)
    config = SyntheticConfig(
        out_dir=str(args.out_dir),
        num_train=args.train,
        num_valid=args.valid,
        seed=args.seed,
        held_out_voices=args.held_out_voices,
        jobs=args.jobs,
    )
    manifests = build_corpus(config)
    for split, path in manifests.items():
        rows = path.read_text().splitlines()[1:]
        seconds = sum(int(row.split("\t")[1]) for row in rows) / SAMPLE_RATE
        print(f"{split}: {len(rows)} utterances, {seconds / 60:.1f} min -> {path}, {transcript_path(path)}")
    return manifests


if __name__ == "__main__":
    run_cli(main)
