"""The reproduction study: every method of the paper's Tables 1 and 2, and the ablations its reviewers asked for,
trained through the project's real recipes on real data that exists offline.

    python benchmarks/reproduce.py                        # every study (hours on 2 CPU cores; resumable)
    python benchmarks/reproduce.py --studies speech vision --parallel 2
    python benchmarks/reproduce.py --dry-run              # print the commands only

Each run is one ``python -m simplexvq_recipes.<speech|vision>.train`` (or ``torchrun`` for the 2-process runs) in
its own folder under ``--out``; a finished run (its ``results.json`` exists) is not run
again, an interrupted one resumes from its last checkpoint, and runs with identical settings are shared between
studies. Each study writes ``<results>/<study>.json`` and ``.md`` (one row per run) and PNG plots (code usage
over training; final usage). Studies (see :data:`STUDIES`):

* ``speech``: Table 2 (its 13 rows + SimVQ) on 1 x 1024 and 2 x 320 codebooks, tiny wav2vec 2.0 on fillets-ng speech;
* ``vision``: Table 1 (the same 14 methods), 8x8x32 latent with M = 1024 on 32x32 photo tiles;
* ``k``, ``batch``, ``codebook``, ``scope``, ``subsample``, ``gumbel``: ablations on the speech 1 x 1024 setting
  (K; N below and above K M; M up to 16384 (65536 with ``--with-64k``) on the memory-efficient path; local vs
  global neighbours with 2 processes; vertex subsampling; Gumbel temperature), and ``long``: perplexity vs KNN-CE
  with 5x the step budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from simplexvq_recipes.patch_demo import TABLE1_METHODS  # noqa: E402
from simplexvq_recipes.training.loop import RESULTS_FILE  # noqa: E402
from simplexvq_recipes.training.tracking import HISTORY_FILE  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the large-codebook report module beside this file
import large_codebook_report  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results" / "study"
VISION_CONFIG = REPO_DIR / "recipes" / "simplexvq_recipes" / "configs" / "vision" / "photos_8x8x32.yaml"

TABLE_METHODS: tuple[str, ...] = TABLE1_METHODS
"""The 13 rows of Tables 1 and 2 (4 hard-assignment, 9 smoothed), and SimVQ."""

CODEBOOKS: dict[str, dict[str, int]] = {
    "1x1024": {"groups": 1, "codebook_size": 1024, "codebook_dim": 256},
    "2x320": {"groups": 2, "codebook_size": 320, "codebook_dim": 128},
}
"""Table 2's two settings (section 4.2: code vectors of 256 and 128 dimensions)."""

SPEECH_STEPS = 200
SPEECH_BATCH = 24
"""Utterances per step: 24 crops of 4 s hold about 2350 masked frames, more than K M = 2048 (1 x 1024, K = 2),
as in the paper (its N per GPU is about 12,000)."""
VISION_STEPS = 300

PATCH_SIZES: tuple[int, ...] = (1024, 4096, 16384, 65536)
PATCH_METHODS: tuple[str, ...] = ("softmax-knn_ce", "ste-cosine", "softmax-perplexity", "simvq")
PATCH_ROWS = 2048
"""Rows (8 x 8 patches) per step of the large-codebook study: N = K M at M = 1024, N = K M / 64 at M = 65536."""
PATCH_STEPS = 200
PATCH_LEVER_M = 16384
LARGE_CODEBOOK_SCRIPT = BENCH_DIR / "large_codebook.py"
PATCH_RUNS = "photo-blocks"
"""Folder of the large-codebook runs under ``--out`` (held-out 64 x 64 blocks of the training photographs)."""


@dataclass(frozen=True)
class Run:
    """One training run of a recipe: ``key`` names its folder (identical settings share it across studies)."""

    key: str
    recipe: str  # "speech" | "vision"
    overrides: tuple[str, ...]
    labels: tuple[tuple[str, Any], ...]
    processes: int = 1
    priority: int = 0
    """Runs start in order of priority (lowest first), so that a study cut short by its budget has its headline."""

    @property
    def label(self) -> dict[str, Any]:
        return dict(self.labels)


@dataclass
class Settings:
    corpus: Path
    out: Path
    speech_steps: int = SPEECH_STEPS
    vision_steps: int = VISION_STEPS
    methods: tuple[str, ...] = TABLE_METHODS
    with_64k: bool = False
    patch_rows: int = PATCH_ROWS
    patch_steps: int = PATCH_STEPS
    seeds: int = 2
    extra: dict[str, list[str]] = field(default_factory=dict)


def speech_run(
    settings: Settings,
    method: str,
    codebooks: str = "1x1024",
    *,
    knn_k: int = 2,
    batch: int = SPEECH_BATCH,
    processes: int = 1,
    extra: Sequence[str] = (),
    tag: str = "",
    labels: Iterable[tuple[str, Any]] = (),
    steps: int | None = None,
) -> Run:
    """A tiny wav2vec 2.0 pretraining run on fillets-ng with ``method`` quantizing into ``codebooks``
    (``steps`` defaults to the study budget ``settings.speech_steps``)."""
    steps = steps or settings.speech_steps
    size = CODEBOOKS.get(codebooks)
    if size is None:  # "1x4096d64": one codebook of 4096 entries of 64 dimensions
        count, rest = codebooks.split("x")
        entries, dim = rest.split("d")
        size = {"groups": int(count), "codebook_size": int(entries), "codebook_dim": int(dim)}
    overrides = (
        f"data.manifest_dir={settings.corpus}",
        f"model.quantizer.method={method}",
        f"model.quantizer.groups={size['groups']}",
        f"model.quantizer.codebook_size={size['codebook_size']}",
        f"model.codebook_dim={size['codebook_dim']}",
        f"model.quantizer.knn_k={knn_k}",
        f"data.batch_size={batch}",
        "data.crop_samples=64000",
        f"training.steps={steps}",
        f"optim.warmup_steps={max(1, steps // 10)}",
        f"training.eval_every={max(1, steps // 2)}",
        "training.log_every=10",
        f"training.checkpoint_every={max(1, steps // 2)}",
        "training.threads=1",
        "training.progress_bar=false",
        *extra,
        *settings.extra.get("speech", []),
    )
    budget = "" if steps == settings.speech_steps else f"-{steps}steps"
    key = f"speech/{method}-{codebooks}-k{knn_k}-b{batch}x{processes}{tag}{budget}"
    return Run(key, "speech", overrides, (("method", method), ("codebooks", codebooks), *labels), processes)


def vision_run(settings: Settings, method: str) -> Run:
    """The 8x8x32 / M = 1024 photo autoencoder trained with ``method``."""
    overrides = (
        f"model.quantizer.method={method}",
        f"training.steps={settings.vision_steps}",
        f"training.eval_every={max(1, settings.vision_steps // 2)}",
        f"training.checkpoint_every={max(1, settings.vision_steps // 2)}",
        *settings.extra.get("vision", []),
    )
    return Run(f"vision/{method}", "vision", overrides, (("method", method),))


def patch_run(
    settings: Settings,
    method: str,
    codebook_size: int,
    *,
    rows: int | None = None,
    steps: int | None = None,
    knn_k: int = 2,
    seed: int = 0,
    options: Sequence[str] = (),
    tag: str = "",
    labels: Iterable[tuple[str, Any]] = (),
    priority: int = 0,
    cost: bool = False,
    lr_schedule: str = "one_cycle",
    processes: int = 1,
) -> Run:
    """One run of :mod:`large_codebook` (patch autoencoder on overlapping photo patches, one codebook of
    ``codebook_size``; ``rows`` per process and step); KNN-CE runs on the memory-efficient path with the CPU
    backend."""
    rows = rows or settings.patch_rows
    steps = steps or settings.patch_steps
    if method == "softmax-knn_ce":
        options = ("memory_efficient=true", "backend=cpu", *options)
    overrides = (
        f"--method={method}",
        f"--codebook-size={codebook_size}",
        f"--rows={rows}",
        f"--steps={steps}",
        f"--knn-k={knn_k}",
        f"--seed={seed}",
        f"--lr-schedule={lr_schedule}",
        f"--eval-every={max(1, steps // 4)}",
        "--eval-stride=8",
        f"--checkpoint-every={max(1, steps // 4)}",
        *(["--cost-only"] if cost else []),
        *(["--option", *options] if options else []),
    )
    schedule = "" if lr_schedule == "one_cycle" else f"-{lr_schedule}"
    world = "" if processes == 1 else f"-x{processes}"
    key = f"{PATCH_RUNS}/{method}-m{codebook_size}-n{rows}-s{steps}-k{knn_k}{tag}{schedule}{world}-seed{seed}"
    base = (
        ("method", method),
        ("M", codebook_size),
        ("N", rows),
        ("K", knn_k),
        ("steps", steps),
        ("schedule", lr_schedule),
        ("processes", processes),
    )
    return Run(key, "patches", overrides, (*base, *labels, ("seed", seed)), processes=processes, priority=priority)


HEADLINE_WEIGHTS: tuple[float, ...] = (1.0, 4.0)
"""KNN-CE's regularizer weight in the headline grid: the paper's 1, and 4 (the weight lever's best value at
M = 4096 and 16384: each vertex's few neighbour slots per step must pull harder when N < K M)."""


def knn_weight(settings: Settings, m: int, weight: float, **kwargs: Any) -> Run:
    """A KNN-CE run at M = ``m`` with ``regularizer_weight=weight`` (the weight is a setting of the table)."""
    options = [f"regularizer_weight={weight:g}"] if weight != 1.0 else []
    tag = f"-w{weight:g}" if weight != 1.0 else ""
    labels = [("weight", weight), *kwargs.pop("labels", [])]
    return patch_run(
        settings, "softmax-knn_ce", m, options=options, tag=tag + kwargs.pop("tag", ""), labels=labels, **kwargs
    )


SEEDED_UP_TO = 4096
"""The KNN-CE rows with more than one seed: a run at 16384 costs 4 CPU-minutes, at 65536 20 (with the final
measurements); the CPU budget of the study (about 2 CPU-hours on 2 cores) holds one seed there."""


def largest_m_steps(settings: Settings, method: str) -> int:
    """Steps at M = 65536: the full budget for KNN-CE and STE, half for SimVQ (its dense (N, M) distances cost
    about as much as KNN-CE's streamed step there), 20 for the dense perplexity loss (about 10 CPU seconds and
    several (N, M) buffers per step)."""
    if method == "softmax-perplexity":
        return 20
    return settings.patch_steps // 2 if method == "simvq" else settings.patch_steps


def large_codebook_runs(settings: Settings) -> list[Run]:
    """Every method at every M (KNN-CE with the weights of :data:`HEADLINE_WEIGHTS`; fewer steps at M = 65536 for
    the dense baselines, :func:`largest_m_steps`), then more seeds of the KNN-CE rows up to :data:`SEEDED_UP_TO`. Start
    order: seed 0 of KNN-CE, the baselines, the other seeds."""
    runs = []
    for seed in range(settings.seeds):
        for m in PATCH_SIZES:
            largest = m == PATCH_SIZES[-1]
            if seed > 0 and m > SEEDED_UP_TO:
                continue
            for weight in HEADLINE_WEIGHTS:
                runs.append(knn_weight(settings, m, weight, seed=seed, priority=0 if seed == 0 else 4))
            for method in PATCH_METHODS[1:] if seed == 0 else ():  # the baselines' 0-25% need no spread
                steps = largest_m_steps(settings, method) if largest else None
                priority = 1 if m <= 16384 else 3
                runs.append(patch_run(settings, method, m, steps=steps, priority=priority))
    return runs


def large_codebook_lever_runs(settings: Settings) -> list[Run]:
    """KNN-CE at M = 16384 with N < K M (N = K M / 16 at the headline's N): the regularizer weight (1, 4, 16); the
    same rows seen split into fewer larger steps or more smaller ones (N / (K M) from 1/64 to 1/4); K = 1; 4096 of
    the 16384 vertices per step; a constant learning rate after warm-up; two processes, each with the headline's
    N, searching neighbours locally or globally. And at M = 65536, weight 4 with four times the headline's steps at
    a constant rate."""
    m, rows, steps = PATCH_LEVER_M, settings.patch_rows, settings.patch_steps
    runs = [knn_weight(settings, m, weight, labels=[("lever", "weight")], priority=2) for weight in (1.0, 4.0, 16.0)]
    seen = rows * steps
    fixed_seen = [("lever", "N at fixed rows seen")]
    runs += [
        knn_weight(settings, m, 1.0, rows=n, steps=seen // n, labels=fixed_seen, priority=2)
        for n in (rows // 4, rows, rows * 4)
    ]
    runs.append(knn_weight(settings, m, 1.0, knn_k=1, labels=[("lever", "K")], priority=2))
    subsample = [("lever", "vertex_subsample=4096")]
    runs.append(
        patch_run(
            settings,
            "softmax-knn_ce",
            m,
            options=["vertex_subsample=4096"],
            tag="-v4096",
            labels=[("weight", 1.0), *subsample],
            priority=2,
        )
    )
    constant = [("lever", "constant LR")]
    runs.append(knn_weight(settings, m, 1.0, lr_schedule="constant", labels=constant, priority=2))
    # the largest codebook with the headline's weight 4: four times the rows seen, at a constant rate
    longer = [("lever", "4x steps, constant LR")]
    runs.append(
        knn_weight(settings, PATCH_SIZES[-1], 4.0, steps=4 * steps, lr_schedule="constant", labels=longer, priority=2)
    )
    for scope in ("local", "global"):
        runs.append(
            patch_run(
                settings,
                "softmax-knn_ce",
                m,
                options=[f"knn_scope={scope}"],
                tag=f"-{scope}",
                processes=2,
                labels=[("weight", 1.0), ("lever", f"2 processes, {scope} neighbours")],
                priority=2,
            )
        )
    return runs


COST_STEPS = 6


def large_codebook_cost_runs(settings: Settings) -> list[Run]:
    """The cost of a training step (CPU and wall seconds, peak memory) of every method at M = 16384 and 65536, with
    the headline's N, from a few steps without held-out evaluation: what the 200-step runs would cost."""
    return [
        patch_run(
            settings, method, m, steps=COST_STEPS, options=(), tag="-cost", labels=[("lever", "cost only")], cost=True
        )
        for m in PATCH_SIZES[2:]
        for method in PATCH_METHODS
    ]


def study_runs(study: str, settings: Settings) -> list[Run]:
    """The runs of one study, in table order."""
    methods = settings.methods
    if study == "speech":
        return [speech_run(settings, m, cb) for cb in CODEBOOKS for m in methods]
    if study == "vision":
        return [vision_run(settings, m) for m in methods]
    if study == "k":
        return [speech_run(settings, "softmax-knn_ce", knn_k=k, labels=[("K", k)]) for k in (1, 2, 4, 8)]
    if study == "batch":  # 8 crops of 4 s: ~780 masked frames < K M = 2048; 24 crops: ~2350 > K M
        return [speech_run(settings, "softmax-knn_ce", batch=batch, labels=[("batch", batch)]) for batch in (8, 24)]
    if study == "codebook":
        sizes = (1024, 16384, 65536) if settings.with_64k else (1024, 16384)
        runs = [
            speech_run(
                settings,
                "softmax-knn_ce",
                f"1x{m}d64",
                extra=["model.quantizer.memory_efficient=true"],
                tag="-me",
                labels=[("M", m), ("memory_efficient", True)],
            )
            for m in sizes
        ]
        runs.append(speech_run(settings, "ste-cosine", "1x16384d64", labels=[("M", 16384)]))
        return runs
    if study == "scope":
        # per rank 12 utterances (~1180 masked frames < K M = 2048); both ranks together ~2350 > 2048
        def scoped(scope: str, k: int) -> Run:
            extra = [f"model.quantizer.knn_scope={scope}"]
            labels = [("scope", scope), ("K per search", k), ("processes", 2)]
            return speech_run(
                settings, "softmax-knn_ce", knn_k=k, batch=12, processes=2, extra=extra, tag=f"-{scope}", labels=labels
            )

        return [scoped("local", 1), scoped("local", 2), scoped("global", 2)]
    if study == "subsample":
        runs = [speech_run(settings, "softmax-knn_ce", labels=[("vertices per step", 1024)])]
        for count in (128,):
            runs.append(
                speech_run(
                    settings,
                    "softmax-knn_ce",
                    extra=[f"model.quantizer.vertex_subsample={count}"],
                    tag=f"-s{count}",
                    labels=[("vertices per step", count)],
                )
            )
        return runs
    if study == "gumbel":
        runs = []
        for method in ("hard_gumbel-perplexity",):
            for tau in (0.5, 1.0, 2.0):
                schedule = f"{{start: {tau}, end: {tau}, decay: 1.0}}"
                extra = [] if tau == 1.0 else [f"model.quantizer.gumbel_temperature={schedule}"]
                tag = "" if tau == 1.0 else f"-tau{tau:g}"
                runs.append(speech_run(settings, method, extra=extra, tag=tag, labels=[("tau", tau)]))
        return runs
    if study == "large_codebook":
        return large_codebook_runs(settings)
    if study == "large_codebook_levers":
        return large_codebook_lever_runs(settings)
    if study == "large_codebook_cost":
        return large_codebook_cost_runs(settings)
    if study == "long":  # does the perplexity loss collapse with 5x the budget? (the paper trains ~30,000x longer)
        steps = 5 * settings.speech_steps
        return [
            speech_run(settings, method, steps=steps, labels=[("steps", steps)])
            for method in ("softmax-perplexity", "softmax-knn_ce")
        ]
    raise ValueError(f"unknown study {study!r}; choose from {', '.join(STUDIES)}")


STUDIES: tuple[str, ...] = (
    "speech",
    "vision",
    "k",
    "batch",
    "codebook",
    "scope",
    "subsample",
    "gumbel",
    "long",
    "large_codebook",
    "large_codebook_levers",
    "large_codebook_cost",
)
DEFAULT_STUDIES: tuple[str, ...] = STUDIES[:-3]
"""``large_codebook*`` (about 2 CPU-hours) run only when named."""


def command(run: Run, settings: Settings) -> list[str]:
    run_dir = settings.out / run.key
    launcher = [sys.executable]
    if run.processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.processes}"]
    if run.recipe == "patches":
        return [*launcher, str(LARGE_CODEBOOK_SCRIPT), f"--output-dir={run_dir}", *run.overrides]
    if run.recipe == "speech":
        recipe = [
            "-m",
            "simplexvq_recipes.speech.pretraining.train",
            "--preset",
            "tiny",
            f"training.output_dir={run_dir}",
        ]
    else:
        recipe = [
            "-m",
            "simplexvq_recipes.vision.train",
            "--config",
            str(VISION_CONFIG),
            f"training.output_dir={run_dir}",
        ]
    return [*launcher, *recipe, *run.overrides]


CONSOLE_FILE = "console.log"
"""The recipe's printed output (its own messages are also in ``train.log``)."""


RUNNING_FILE = "running.pid"
"""Written by a large-codebook run while it trains (its process id), so that a second driver skips it."""


def running_pid(run_dir: Path) -> int | None:
    """The id of the live process training in ``run_dir`` (its ``running.pid``), or None."""
    try:
        pid = int((run_dir / RUNNING_FILE).read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def result_file(run: Run, settings: Settings) -> Path:
    return settings.out / run.key / RESULTS_FILE


def execute(run: Run, settings: Settings) -> dict[str, Any]:
    """Run (or resume) one recipe run unless it has finished; returns its results, history and wall time."""
    run_dir = settings.out / run.key
    done = result_file(run, settings)
    if not done.is_file():
        if (owner := running_pid(run_dir)) is not None:
            raise RuntimeError(f"run {run.key} is running in process {owner}; not started twice")
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        started = time.perf_counter()
        with open(run_dir / CONSOLE_FILE, "a") as log:
            code = subprocess.run(command(run, settings), stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            tail = "\n".join((run_dir / CONSOLE_FILE).read_text().splitlines()[-15:])
            raise RuntimeError(f"run {run.key} failed (exit code {code}); output {run_dir / CONSOLE_FILE}:\n{tail}")
        seconds = time.perf_counter() - started
        (run_dir / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
        print(f"finished {run.key} in {seconds:.0f} s", flush=True)
    wall = run_dir / "wall_seconds.txt"
    return {
        "results": json.loads(done.read_text()),
        "history": json.loads((run_dir / HISTORY_FILE).read_text()),
        "wall_seconds": float(wall.read_text()) if wall.is_file() else math.nan,
    }


def execute_or_report(run: Run, settings: Settings) -> dict[str, Any] | None:
    """:func:`execute`, printing a failure instead of raising so that the other runs go on."""
    try:
        return execute(run, settings)
    except (RuntimeError, OSError, ValueError) as error:
        print(f"FAILED {run.key}: {error}", file=sys.stderr, flush=True)
        return None


def execute_all(runs: Sequence[Run], settings: Settings, parallel: int) -> dict[str, dict[str, Any]]:
    """Single-process runs ``parallel`` at a time, then multi-process runs one at a time (they use every core).

    Returns the outcome of every run that finished; failed runs are reported on stderr and left out."""
    unique = sorted({run.key: run for run in runs}.values(), key=lambda run: run.priority)
    single = [run for run in unique if run.processes == 1]
    multi = [run for run in unique if run.processes > 1]
    outcomes: dict[str, dict[str, Any] | None] = {}
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        for run, outcome in zip(single, pool.map(lambda r: execute_or_report(r, settings), single), strict=True):
            outcomes[run.key] = outcome
    for run in multi:
        outcomes[run.key] = execute_or_report(run, settings)
    return {key: outcome for key, outcome in outcomes.items() if outcome is not None}


# ----------------------------------------------------------------------------------------------------- tables


def _per_group(row: dict[str, float], key: str) -> list[float]:
    """``key`` of a history row: one value (``key``) or one per group (``key/0``, ``key/1``, ...)."""
    if key in row:
        return [row[key]]
    values, group = [], 0
    while f"{key}/{group}" in row:
        values.append(row[f"{key}/{group}"])
        group += 1
    return values


def last_logged(history: Sequence[dict[str, float]], key: str) -> list[float]:
    for row in reversed(history):
        values = _per_group(row, key)
        if values:
            return values
    return []


def usage_curve(history: Sequence[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    """(steps, usage averaged over groups) of every row holding ``key``."""
    steps, values = [], []
    for row in history:
        groups = _per_group(row, key)
        if groups:
            steps.append(row["step"])
            values.append(sum(groups) / len(groups))
    return steps, values


def speech_row(run: Run, outcome: dict[str, Any]) -> dict[str, Any]:
    results, history = outcome["results"], outcome["history"]
    individual = last_logged(history, "train/individual_perplexity")
    return {
        **run.label,
        "val_code_use": results["val_usage"],
        "val_perplexity": results["val_perplexity"],
        "val_dead_codes": results["val_dead_codes"],
        "train_code_use_last_interval": last_logged(history, "train/usage"),
        "train_individual_perplexity": individual or [1.0] * len(results["val_usage"]),
        "val_contrastive": results["val_contrastive"],
        "val_accuracy": results["val_accuracy"],
        "codebook_size": results["codebook_size"],
        "val_frames": results["val_frames"],
        "steps": results["step"],
        # wall time of the whole run; the training loop's own time where the driver did not see the run end
        "wall_seconds": outcome["wall_seconds"] if math.isfinite(outcome["wall_seconds"]) else results["train_seconds"],
    }


def vision_row(run: Run, outcome: dict[str, Any]) -> dict[str, Any]:
    results, history = outcome["results"], outcome["history"]
    individual = last_logged(history, "train/individual_perplexity")
    return {
        **run.label,
        "val_code_use": results["usage_per_group"],
        "val_per_image_use": results["per_image_usage"],
        "val_perplexity": results["perplexity"] if isinstance(results["perplexity"], list) else [results["perplexity"]],
        "train_individual_perplexity": individual or [1.0],
        "rmse": results["rmse"],
        "psnr": results["psnr"],
        "val_images": results["num_images"],
        "steps": results["step"],
        "wall_seconds": outcome["wall_seconds"],
    }


def _fmt_groups(values: Sequence[float | None], spec: str) -> str:
    return " / ".join(
        "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec) for v in values
    )


def markdown_table(rows: Sequence[dict[str, Any]], recipe: str) -> str:
    """One Markdown row per run; label columns first, then the metrics."""
    if not rows:
        return ""
    metric_keys = {
        "val_code_use",
        "val_perplexity",
        "val_dead_codes",
        "train_code_use_last_interval",
        "train_individual_perplexity",
        "val_contrastive",
        "val_accuracy",
        "codebook_size",
        "val_frames",
        "steps",
        "wall_seconds",
        "val_per_image_use",
        "rmse",
        "psnr",
        "val_images",
    }
    labels = list(dict.fromkeys(key for row in rows for key in row if key not in metric_keys))
    if recipe == "speech":
        header = [
            "code use (val)",
            "code perplexity (val)",
            "individual perplexity (train)",
            "contrastive loss (val)",
            "accuracy (val)",
            "steps",
            "minutes",
        ]
    else:
        header = [
            "code use (val)",
            "per-image use",
            "code perplexity (val)",
            "individual perplexity (train)",
            "rMSE",
            "PSNR (dB)",
            "steps",
            "minutes",
        ]
    lines = ["| " + " | ".join(labels + header) + " |", "|" + "---|" * (len(labels) + len(header))]
    for row in rows:
        cells = [str(row.get(key, "")) for key in labels]
        minutes = row["wall_seconds"] / 60
        if recipe == "speech":
            cells += [
                _fmt_groups(row["val_code_use"], ".1%"),
                _fmt_groups(row["val_perplexity"], ".1f"),
                _fmt_groups(row["train_individual_perplexity"], ".2f"),
                f"{row['val_contrastive']:.3f}",
                f"{row['val_accuracy']:.3f}",
                str(row["steps"]),
                f"{minutes:.1f}",
            ]
        else:
            cells += [
                _fmt_groups(row["val_code_use"], ".1%"),
                f"{row['val_per_image_use']:.1%}",
                _fmt_groups(row["val_perplexity"], ".1f"),
                _fmt_groups(row["train_individual_perplexity"], ".2f"),
                f"{row['rmse']:.4f}",
                f"{row['psnr']:.2f}",
                str(row["steps"]),
                f"{minutes:.1f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _line_style(method: str) -> str:
    """Dashed for hard assignment (STE, rotation, SimVQ), dotted for the perplexity regularizer, solid for KNN."""
    if method.startswith(("ste-", "rotation-")) or method == "simvq":
        return "--"
    return ":" if method.endswith("-perplexity") else "-"


def plot_study(study: str, runs: Sequence[Run], outcomes: dict[str, dict[str, Any]], rows, path: Path) -> None:
    """Code use over training (one line per run; one panel per codebook setting when there are several) and the
    final validation code use (bars).

    Speech: code use of the training batches over each 10-step logging interval; vision: validation code use."""
    panels = list(dict.fromkeys(run.label.get("codebooks", "") for run in runs)) if study == "speech" else [""]
    fig, axes = plt.subplots(
        1, len(panels) + 1, figsize=(6 * len(panels) + 5, 5), gridspec_kw={"width_ratios": [3] * len(panels) + [2]}
    )
    curves_by_panel = dict(zip(panels, axes[:-1], strict=True))
    bars = axes[-1]
    if runs[0].recipe == "speech":
        key, what = "train/usage", "training code use per 10 steps"
    else:
        key, what = "val/usage", "validation code use"
    colors = plt.get_cmap("tab20").colors
    names = []
    for index, run in enumerate(runs):
        name = ", ".join(f"{value}" for _, value in run.labels)
        names.append(name)
        panel = run.label.get("codebooks", "") if study == "speech" else ""
        steps, usage = usage_curve(outcomes[run.key]["history"], key)
        style = _line_style(run.label["method"])
        color = colors[(index % (len(runs) // len(panels) or 1)) % len(colors)]
        curves_by_panel[panel].plot(
            steps, [100 * u for u in usage], style, marker="o", markersize=2, color=color, label=name
        )
    for panel, curves in curves_by_panel.items():
        title = f"study: {study}" + (f" ({panel})" if panel else "")
        curves.set(xlabel="training step", ylabel=f"{what} (%)", ylim=(0, 102), title=title)
        curves.legend(fontsize=6, ncol=2, loc="lower left")
    finals = [100 * sum(row["val_code_use"]) / len(row["val_code_use"]) for row in rows]
    bars.barh(range(len(rows)), finals, color="tab:blue")
    bars.set_yticks(range(len(rows)), names, fontsize=6)
    bars.invert_yaxis()
    bars.set(xlabel="final validation code use (%, mean over codebooks)", xlim=(0, 100))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hardware() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads_per_run": 1,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_study(
    study: str, runs: Sequence[Run], outcomes: dict[str, dict[str, Any]], settings: Settings, results_dir: Path
) -> str:
    runs = [run for run in runs if run.key in outcomes]  # failed runs are missing (reported when they failed)
    if not runs:
        return "(no finished runs)\n"
    recipe = runs[0].recipe
    if recipe == "patches":
        return write_patch_study(study, runs, outcomes, settings, results_dir)
    rows = [(speech_row if recipe == "speech" else vision_row)(run, outcomes[run.key]) for run in runs]
    table = markdown_table(rows, recipe)
    payload = {
        "study": study,
        "recipe": recipe,
        "rows": rows,
        "commands": [" ".join(command(run, settings)) for run in runs],
        "hardware": hardware(),
        "total_wall_minutes": sum(row["wall_seconds"] for row in rows if math.isfinite(row["wall_seconds"])) / 60,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{study}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (results_dir / f"{study}.md").write_text(f"## Study `{study}`\n\n{table}")
    plot_study(study, runs, outcomes, rows, results_dir / f"{study}.png")
    return table


def write_patch_study(
    study: str, runs: Sequence[Run], outcomes: dict[str, dict[str, Any]], settings: Settings, results_dir: Path
) -> str:
    """The large-codebook studies: one row per setting (mean and spread over seeds), sorted by method and M for
    ``large_codebook``; plots of code use against M or, for the levers, over rows seen."""
    report = large_codebook_report
    single = [report.patch_row(run.label, outcomes[run.key]["results"], outcomes[run.key]["history"]) for run in runs]
    rows = report.aggregate(single)
    if study == "large_codebook":
        order = {method: index for index, method in enumerate(PATCH_METHODS)}
        rows.sort(key=lambda row: (order.get(row["method"], len(order)), row["M"]))
    table = report.markdown_table(rows)
    wall = [outcomes[run.key]["wall_seconds"] for run in runs]
    payload = {
        "study": study,
        "recipe": "patches",
        "rows": rows,
        "runs": single,
        "commands": [" ".join(command(run, settings)) for run in runs],
        "hardware": hardware(),
        "total_wall_minutes": sum(w for w in wall if math.isfinite(w)) / 60,
        "total_train_cpu_minutes": sum(
            outcomes[run.key]["results"]["cpu_seconds_per_step"] * outcomes[run.key]["results"]["step"] for run in runs
        )
        / 60,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{study}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (results_dir / f"{study}.md").write_text(f"## Study `{study}`\n\n{table}")
    plots = {"large_codebook": report.plot_code_use_vs_m, "large_codebook_cost": report.plot_step_cost}
    plot = plots.get(study, report.plot_levers)
    plot(rows, results_dir / f"{study}.png")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--studies", nargs="+", default=list(DEFAULT_STUDIES), choices=STUDIES, help="default: all but large_codebook*"
    )
    parser.add_argument("--methods", nargs="+", default=list(TABLE_METHODS), help="rows of the speech/vision tables")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="run folders")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="tables and plots")
    parser.add_argument("--corpus", type=Path, default=None, help="fillets manifests (default: prepared on demand)")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="single-process runs at once")
    parser.add_argument("--speech-steps", type=int, default=SPEECH_STEPS)
    parser.add_argument("--vision-steps", type=int, default=VISION_STEPS)
    parser.add_argument("--with-64k", action="store_true", help="add M = 65536 to the codebook study (slow on CPU)")
    parser.add_argument("--patch-rows", type=int, default=PATCH_ROWS, help="rows per step of large_codebook runs")
    parser.add_argument("--patch-steps", type=int, default=PATCH_STEPS, help="steps of large_codebook runs")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the large_codebook headline rows")
    parser.add_argument("--speech-override", action="append", default=[], help="extra key=value for speech runs")
    parser.add_argument("--vision-override", action="append", default=[], help="extra key=value for vision runs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    parser.add_argument("--report-only", action="store_true", help="write the tables of finished runs, run nothing")
    args = parser.parse_args(argv)

    corpus = args.corpus
    if corpus is None and not args.dry_run and set(args.studies) - {"vision", *STUDIES[-3:]}:
        from simplexvq_recipes.speech.data.prepare_fillets import default_cache_dir
        from simplexvq_recipes.speech.demo import ensure_corpus

        corpus = ensure_corpus(default_cache_dir())
    settings = Settings(
        corpus=corpus or Path("FILLETS_MANIFESTS"),
        out=args.out,
        speech_steps=args.speech_steps,
        vision_steps=args.vision_steps,
        methods=tuple(args.methods),
        with_64k=args.with_64k,
        patch_rows=args.patch_rows,
        patch_steps=args.patch_steps,
        seeds=args.seeds,
        extra={"speech": args.speech_override, "vision": args.vision_override},
    )
    plan = {study: study_runs(study, settings) for study in args.studies}
    if args.dry_run:
        for study, runs in plan.items():
            print(f"# {study}")
            for run in runs:
                print(" ".join(command(run, settings)))
        return
    every_run = [run for runs in plan.values() for run in runs]
    if args.report_only:
        outcomes = {run.key: execute(run, settings) for run in every_run if result_file(run, settings).is_file()}
    else:
        outcomes = execute_all(every_run, settings, args.parallel)
    for study, runs in plan.items():
        print(f"\n## {study}\n")
        print(write_study(study, runs, outcomes, settings, args.results))
    print(f"tables, JSON and plots in {args.results}/")


if __name__ == "__main__":
    main()
