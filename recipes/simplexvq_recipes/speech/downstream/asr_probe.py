"""ASR probe: how much speech content the frozen features of a pretrained model carry.

A small CTC head (linear, two 1-D convolutions, or one BiLSTM layer; then a linear layer) is trained on frozen
features of one layer to emit the pieces of a sentencepiece tokenizer trained on the training transcripts; greedy
CTC decoding of held-out utterances gives the character and word error rates. The same probe is trained on
baseline features so the numbers mean something: ``random`` (the same architecture, randomly initialised) and
``logmel`` (80 log-mel filterbanks at the model's frame rate); the best constant transcript (no audio at all) is
always reported. ``codes`` probes the model's discrete codes alone (one-hot, G x M dimensions)::

    python -m simplexvq_recipes.speech.data.synthetic data/synth                  # or any manifests + .wrd transcripts
    python -m simplexvq_recipes.speech.downstream.asr_probe data/synth/train.tsv data/synth/valid.tsv \
        --checkpoint RUN_DIR --layer 2 --features pretrained random codes logmel --output probe.json

Transcripts are read from the file next to each manifest with the suffix ``.wrd`` (one line per manifest row, as
written by :mod:`simplexvq_recipes.speech.data.synthetic`), or from ``--train-transcripts`` / ``--valid-transcripts``.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import editdistance
import sentencepiece as spm
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence
from tqdm.auto import tqdm

from simplexvq_recipes.speech.data.logmel import LogMel
from simplexvq_recipes.speech.data.manifest import Manifest, read_manifest
from simplexvq_recipes.speech.data.synthetic import transcript_path
from simplexvq_recipes.speech.downstream.extract_features import (
    CODES_KEY,
    FeatureExtractor,
    check_manifest_audio,
    iter_waveforms,
    layer_key,
)
from simplexvq_recipes.speech.pretraining.model import build_model, load_pretrained
from simplexvq_recipes.training.atomic import atomic_write_json
from simplexvq_recipes.training.cli import run_cli
from simplexvq_recipes.training.runlog import show_progress_bar

FEATURE_KINDS = ("pretrained", "random", "codes", "logmel")
HEADS = ("linear", "conv", "bilstm")
TOKENIZERS = ("unigram", "bpe", "char")
PRIOR = "no audio (best constant transcript)"
BLANK = 0
"""CTC blank index; sentencepiece id ``i`` is class ``i + 1``."""


@dataclass(kw_only=True)
class ProbeConfig:
    """Data, feature sources, tokenizer, head and optimisation of the probe."""

    train_manifest: str
    valid_manifest: str
    train_transcripts: str | None = None
    """Default: the train manifest with the suffix ``.wrd``."""
    valid_transcripts: str | None = None
    checkpoint: str | None = None
    """Run folder or ``checkpoints/step_*`` folder; needed for ``pretrained`` and ``random`` features."""
    layer: int | None = None
    """Transformer layer whose output is probed (0: its input); default: the last one."""
    features: list[str] = field(default_factory=lambda: list(FEATURE_KINDS))
    tokenizer: str = "char"
    vocab_size: int = 40
    """Upper bound on the pieces of ``unigram`` / ``bpe`` tokenizers (``char``: the characters of the transcripts)."""
    head: str = "conv"
    hidden_dim: int = 128
    dropout: float = 0.1
    epochs: int = 40
    batch_size: int = 16
    lr: float = 5e-3
    seed: int = 0
    device: str = "cpu"
    progress_bar: bool = True


@dataclass
class ProbeResult:
    """Held-out error rates of the probe on one feature source."""

    features: str
    dim: int
    cer: float
    wer: float
    train_loss: float
    seconds: float
    examples: list[tuple[str, str]] = field(default_factory=list)
    """First held-out (reference, hypothesis) pairs."""


# ---------------------------------------------------------------------------------------------------------------
# tokenizer and metrics


def train_tokenizer(
    texts: Sequence[str], model_type: str = "unigram", vocab_size: int = 40
) -> spm.SentencePieceProcessor:
    """A sentencepiece model trained in memory on ``texts`` (``vocab_size`` is an upper bound for small corpora)."""
    if model_type not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {model_type!r}")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buffer,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=buffer.getvalue())


def edit_distance(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """Levenshtein distance between two sequences: the fewest substitutions, insertions and deletions that turn
    ``reference`` into ``hypothesis`` (``editdistance``, a C++ implementation)."""
    return int(editdistance.eval(list(reference), list(hypothesis)))


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[float, float]:
    """(CER, WER): edit distances summed over utterances, divided by the reference characters / words."""
    chars = sum(edit_distance(r, h) for r, h in zip(references, hypotheses, strict=True))
    words = sum(edit_distance(r.split(), h.split()) for r, h in zip(references, hypotheses, strict=True))
    return chars / max(1, sum(len(r) for r in references)), words / max(1, sum(len(r.split()) for r in references))


def text_prior(train_texts: Sequence[str], valid_texts: Sequence[str]) -> tuple[str, float, float]:
    """The best answer without listening: the training transcript whose use as the hypothesis of *every* held-out
    utterance gives the lowest CER; returns it with its (CER, WER). A probe must beat this to have heard anything."""
    best = ("", 1.0, 1.0)
    for candidate in dict.fromkeys(train_texts):
        cer, wer = error_rates(valid_texts, [candidate] * len(valid_texts))
        if cer < best[1]:
            best = (candidate, cer, wer)
    return best


def greedy_decode(log_probs: Tensor, length: int) -> list[int]:
    """Best path of one utterance: argmax per frame, repeats merged, blanks removed; sentencepiece ids."""
    best = torch.unique_consecutive(log_probs[:length].argmax(dim=-1))
    return [int(i) - 1 for i in best if int(i) != BLANK]


# ---------------------------------------------------------------------------------------------------------------
# features


def log_mel(frame_rate: float = 50.0, sample_rate: int = 16000, n_mels: int = 80) -> Callable[[Tensor], Tensor]:
    """Log-mel filterbank features (T, n_mels): 25 ms windows at ``frame_rate`` frames per second
    (:class:`~simplexvq_recipes.speech.data.logmel.LogMel`)."""
    if not frame_rate > 0:
        raise ValueError(f"frame_rate must be positive, got {frame_rate}")
    window = round(0.025 * sample_rate)
    return LogMel(
        sample_rate, num_mels=n_mels, window_samples=window, hop_samples=max(1, round(sample_rate / frame_rate))
    )


def feature_sources(config: ProbeConfig) -> dict[str, Callable[[Tensor], Tensor]]:
    """Name -> function from one waveform to its (T, D) features, for each requested source."""
    unknown = sorted(set(config.features) - set(FEATURE_KINDS))
    if unknown or not config.features:
        raise ValueError(f"features must be among {', '.join(FEATURE_KINDS)}, got {config.features}")
    sources: dict[str, Callable[[Tensor], Tensor]] = {}
    needs_model = {"pretrained", "random", "codes"} & set(config.features)
    if needs_model and config.checkpoint is None:
        raise ValueError(f"{' and '.join(sorted(needs_model))} features need --checkpoint")
    frame_rate = 50.0
    if needs_model:
        model, pretrain = load_pretrained(config.checkpoint)
        layer = model.config.num_layers if config.layer is None else config.layer
        frame_rate = 16000 / model.config.downsampling
        normalize = pretrain.data.normalize
    for kind in config.features:
        if kind == "logmel":
            sources["logmel"] = log_mel(frame_rate)
        elif kind == "codes":
            extractor = FeatureExtractor(model, [0], normalize=normalize, device=config.device)
            sources["codes"] = _one_hot_codes(extractor, model.codebook_size)
        else:
            encoder = model
            if kind == "random":
                with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
                    torch.manual_seed(config.seed)
                    encoder = build_model(pretrain)
            extractor = FeatureExtractor(encoder, [layer], normalize=normalize, codes=False, device=config.device)
            sources[f"{kind}:layer_{layer}"] = _select(extractor, layer_key(layer))
    return sources


def _select(extractor: FeatureExtractor, key: str) -> Callable[[Tensor], Tensor]:
    return lambda waveform: extractor(waveform)[key]


def _one_hot_codes(extractor: FeatureExtractor, codebook_size: int) -> Callable[[Tensor], Tensor]:
    """(T, G * M) one-hot codes: what the discrete units alone tell the probe."""

    def features(waveform: Tensor) -> Tensor:
        codes = extractor(waveform)[CODES_KEY].long()
        return nn.functional.one_hot(codes, codebook_size).flatten(1).float()

    return features


def read_split(manifest_path: str, transcripts_path: str | None) -> tuple[Manifest, list[str]]:
    """A manifest and its transcripts (one per row); an empty manifest, missing audio or a count mismatch is an error
    naming the files, raised before any feature is computed."""
    manifest = read_manifest(manifest_path)
    check_manifest_audio(manifest, "raise")
    path = Path(transcripts_path) if transcripts_path else transcript_path(manifest_path)
    if not path.is_file():
        raise FileNotFoundError(f"transcripts {path} do not exist (one line per row of {manifest_path})")
    texts = [" ".join(line.split()) for line in path.read_text(encoding="utf-8").splitlines()]
    if len(texts) != len(manifest):
        raise ValueError(f"{path} has {len(texts)} transcripts but {manifest_path} lists {len(manifest)} files")
    return manifest, texts


@torch.no_grad()
def compute_features(
    manifest: Manifest, sources: dict[str, Callable[[Tensor], Tensor]], *, progress_bar: bool = True
) -> dict[str, list[Tensor]]:
    """Features of every utterance for every source (audio is read once)."""
    features: dict[str, list[Tensor]] = {name: [] for name in sources}
    rows = iter_waveforms(manifest)
    for _, waveform in tqdm(rows, total=len(manifest), desc="features", disable=not progress_bar, leave=False):
        for name, source in sources.items():
            features[name].append(source(waveform).float().cpu())
    return features


# ---------------------------------------------------------------------------------------------------------------
# CTC head


class CTCHead(nn.Module):
    """Per-dimension standardisation (training-set statistics), a small context model, linear layer to CTC classes.

    ``kind``: ``linear`` (no context), ``conv`` (two 1-D convolutions of width 5 with GELU: 9 frames of context,
    fast on CPUs) or ``bilstm`` (one bidirectional LSTM layer: the whole utterance).
    """

    def __init__(
        self,
        mean: Tensor,
        std: Tensor,
        num_classes: int,
        *,
        kind: str = "conv",
        hidden_dim: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {kind!r}")
        self.kind = kind
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.dropout = nn.Dropout(dropout)
        input_dim = mean.numel()
        if kind == "conv":
            self.context: nn.Module | None = nn.Sequential(
                nn.Conv1d(input_dim, hidden_dim, 5, padding=2),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Conv1d(hidden_dim, hidden_dim, 5, padding=2),
                nn.GELU(),
            )
            output_dim = hidden_dim
        elif kind == "bilstm":
            self.context = nn.LSTM(input_dim, hidden_dim, batch_first=True, bidirectional=True)
            output_dim = 2 * hidden_dim
        else:
            self.context = None
            output_dim = input_dim
        self.output = nn.Linear(output_dim, num_classes)

    def forward(self, features: Tensor, lengths: Tensor) -> Tensor:
        """(B, T, D) padded features -> (B, T, classes) log-probabilities."""
        padded = (
            torch.arange(features.shape[1], device=features.device)[None, :] >= lengths.to(features.device)[:, None]
        )
        x = ((features - self.mean) / self.std).masked_fill(padded[..., None], 0.0)
        x = self.dropout(x)
        if self.kind == "conv":
            x = self.context(x.transpose(1, 2)).transpose(1, 2).masked_fill(padded[..., None], 0.0)
        elif self.kind == "bilstm":
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            x, _ = pad_packed_sequence(self.context(packed)[0], batch_first=True, total_length=features.shape[1])
        return self.output(self.dropout(x) if self.context is not None else x).log_softmax(dim=-1)


def _batches(features: list[Tensor], order: Sequence[int], size: int) -> list[tuple[Tensor, Tensor, list[int]]]:
    batches = []
    for start in range(0, len(order), size):
        rows = list(order[start : start + size])
        items = [features[row] for row in rows]
        lengths = torch.tensor([item.shape[0] for item in items])
        batches.append((pad_sequence(items, batch_first=True), lengths, rows))
    return batches


def train_head(
    features: list[Tensor], targets: list[list[int]], num_classes: int, config: ProbeConfig
) -> tuple[CTCHead, float]:
    """Train a CTC head on frozen features; returns it (eval mode) and the mean loss of the last epoch.

    Deterministic in ``config.seed`` on the CPU; the caller's global RNG state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return _train_head(features, targets, num_classes, config)


def _train_head(
    features: list[Tensor], targets: list[list[int]], num_classes: int, config: ProbeConfig
) -> tuple[CTCHead, float]:
    stacked = torch.cat(features)
    generator = torch.Generator().manual_seed(config.seed)
    head = CTCHead(
        stacked.mean(dim=0),
        stacked.std(dim=0).clamp_min(1e-5),
        num_classes,
        kind=config.head,
        hidden_dim=config.hidden_dim,
        dropout=config.dropout,
    ).to(config.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=config.epochs * -(-len(features) // config.batch_size),
        pct_start=0.1,
    )
    target_tensors = [torch.tensor(t, dtype=torch.long) + 1 for t in targets]
    last_loss = float("nan")
    head.train()
    epochs = tqdm(range(config.epochs), desc=f"CTC {config.head}", disable=not config.progress_bar, leave=False)
    for _ in epochs:
        order = torch.randperm(len(features), generator=generator).tolist()
        losses = []
        for x, lengths, rows in _batches(features, order, config.batch_size):
            log_probs = head(x.to(config.device), lengths.to(config.device))
            labels = [target_tensors[row] for row in rows]
            loss = nn.functional.ctc_loss(
                log_probs.transpose(0, 1),
                torch.cat(labels).to(config.device),
                lengths,
                torch.tensor([len(label) for label in labels]),
                blank=BLANK,
                zero_infinity=True,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(head.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        last_loss = sum(losses) / len(losses)
        epochs.set_postfix(loss=f"{last_loss:.3f}")
    return head.eval(), last_loss


@torch.no_grad()
def transcribe(head: CTCHead, features: list[Tensor], tokenizer: spm.SentencePieceProcessor, device: str) -> list[str]:
    """Greedy CTC transcripts of each utterance."""
    texts = []
    for x, lengths, _ in _batches(features, range(len(features)), 32):
        log_probs = head(x.to(device), lengths.to(device)).cpu()
        texts += [tokenizer.decode(greedy_decode(lp, int(n))) for lp, n in zip(log_probs, lengths, strict=True)]
    return texts


# ---------------------------------------------------------------------------------------------------------------
# command


def run_probe(config: ProbeConfig) -> list[ProbeResult]:
    """Train and evaluate the probe on each feature source (in the order of ``config.features``); the last result is
    the no-audio baseline :func:`text_prior`."""
    train_manifest, train_texts = read_split(config.train_manifest, config.train_transcripts)
    valid_manifest, valid_texts = read_split(config.valid_manifest, config.valid_transcripts)
    tokenizer = train_tokenizer(train_texts, config.tokenizer, config.vocab_size)
    targets = [tokenizer.encode(text) for text in train_texts]
    num_classes = tokenizer.get_piece_size() + 1
    sources = feature_sources(config)
    train_features = compute_features(train_manifest, sources, progress_bar=config.progress_bar)
    valid_features = compute_features(valid_manifest, sources, progress_bar=config.progress_bar)
    results = []
    for name in sources:
        started = time.perf_counter()
        head, loss = train_head(train_features[name], targets, num_classes, config)
        hypotheses = transcribe(head, valid_features[name], tokenizer, config.device)
        cer, wer = error_rates(valid_texts, hypotheses)
        results.append(
            ProbeResult(
                features=name,
                dim=train_features[name][0].shape[1],
                cer=cer,
                wer=wer,
                train_loss=loss,
                seconds=time.perf_counter() - started,
                examples=list(zip(valid_texts[:3], hypotheses[:3], strict=True)),
            )
        )
    guess, cer, wer = text_prior(train_texts, valid_texts)
    results.append(ProbeResult(PRIOR, 0, cer, wer, float("nan"), 0.0, [(valid_texts[0], guess)]))
    return results


def format_table(results: Sequence[ProbeResult]) -> str:
    """Markdown table of the results."""
    lines = ["| features | dim | CER | WER | final train CTC loss |", "|---|---|---|---|---|"]
    for r in results:
        loss = "-" if r.features == PRIOR else f"{r.train_loss:.3f}"
        lines.append(f"| {r.features} | {r.dim or '-'} | {r.cer:.1%} | {r.wer:.1%} | {loss} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[ProbeResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_manifest")
    parser.add_argument("valid_manifest")
    parser.add_argument("--checkpoint", help="run folder or checkpoints/step_* folder of the pretrained model")
    parser.add_argument("--layer", type=int, default=None, help="layer to probe (default: the last)")
    parser.add_argument("--features", nargs="+", choices=FEATURE_KINDS, default=None, help="feature sources")
    parser.add_argument("--train-transcripts", default=None)
    parser.add_argument("--valid-transcripts", default=None)
    defaults = ProbeConfig(train_manifest="", valid_manifest="")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default=defaults.tokenizer)
    parser.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="unigram / bpe only")
    parser.add_argument("--head", choices=HEADS, default=defaults.head)
    parser.add_argument("--hidden-dim", type=int, default=defaults.hidden_dim)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 is fastest on busy CPUs)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    features = args.features or (list(FEATURE_KINDS) if args.checkpoint else ["logmel"])
    config = ProbeConfig(
        train_manifest=args.train_manifest,
        valid_manifest=args.valid_manifest,
        train_transcripts=args.train_transcripts,
        valid_transcripts=args.valid_transcripts,
        checkpoint=args.checkpoint,
        layer=args.layer,
        features=features,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        head=args.head,
        hidden_dim=args.hidden_dim,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        progress_bar=show_progress_bar(False if args.no_progress else None),
    )
    results = run_probe(config)
    print(format_table(results))
    for result in results:
        reference, hypothesis = result.examples[0]
        print(f"{result.features}: ref {reference!r}\n{' ' * len(result.features)}  hyp {hypothesis!r}")
    if args.output:
        atomic_write_json(args.output, {"config": asdict(config), "results": [asdict(r) for r in results]})
    return results


if __name__ == "__main__":
    run_cli(main)
