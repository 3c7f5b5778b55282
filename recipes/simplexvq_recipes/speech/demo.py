"""The README's main job: wav2vec 2.0 pretraining on real speech, KNN-CE next to a collapsing baseline.

    python -m simplexvq_recipes.speech.demo [--methods softmax-knn_ce ste-cosine ...] [--steps 200]

Prepares the fillets-ng corpus if needed (``apt-get install -y fillets-ng-data-cs fillets-ng-data-nl``; see
:mod:`~simplexvq_recipes.speech.data.prepare_fillets`), then pretrains the ``tiny`` preset once per quantizer with the
recipe's own entry point (``python -m simplexvq_recipes.speech.pretraining.train``), the runs side by side in separate
processes of one thread each, and prints the code usage on the held-out level folders. Runs land in
``OUT/<method>/`` (logs, TensorBoard, checkpoints, ``code_usage.png``); re-running resumes finished runs instantly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from simplexvq_recipes.speech.data import prepare_fillets
from simplexvq_recipes.training.atomic import atomic_write_json, atomic_write_text
from simplexvq_recipes.training.loop import RESULTS_FILE

DEFAULT_METHODS = ("softmax-knn_ce", "ste-cosine")


def ensure_corpus(corpus: Path) -> Path:
    """The fillets manifests folder, converting the audio first when it is missing or was converted another way."""
    if not prepare_fillets.is_converted(corpus):
        print(f"preparing the fillets-ng speech corpus in {corpus} (once, about a minute)", flush=True)
        prepare_fillets.prepare(corpus, jobs=min(2, os.cpu_count() or 1))
    return corpus


def train_command(
    method: str, corpus: Path, run_dir: Path, steps: int, threads: int, extra: Sequence[str]
) -> list[str]:
    """The recipe command line of one demo run."""
    return [
        sys.executable,
        "-m",
        "simplexvq_recipes.speech.pretraining.train",
        "--preset",
        "tiny",
        f"data.manifest_dir={corpus}",
        f"training.output_dir={run_dir}",
        f"model.quantizer.method={method}",
        f"training.steps={steps}",
        f"training.threads={threads}",
        "training.progress_bar=false",
        *extra,
    ]


def run_one(command: list[str], run_dir: Path, threads: int) -> dict[str, Any]:
    """Run the recipe in a subprocess (its output in ``run_dir/console.log``, its messages also in ``train.log``)
    and return its ``results.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(run_dir / "console.log", "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = (run_dir / "console.log").read_text().splitlines()[-20:]
        raise RuntimeError(f"{' '.join(command)} failed with exit code {code}:\n" + "\n".join(tail))
    return json.loads((run_dir / RESULTS_FILE).read_text())


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table of validation code usage per codebook (and the contrastive task) per method."""
    lines = [
        "| quantizer | val code use | val code perplexity | dead codes | val contrastive loss | val accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        size = result["codebook_size"]
        usage = " / ".join(f"{u:.1%}" for u in result["val_usage"])
        perplexity = " / ".join(f"{p:.1f}" for p in result["val_perplexity"])
        dead = " / ".join(f"{int(d)}" for d in result["val_dead_codes"])
        lines.append(
            f"| {result['quantizer']} | {usage} (of {size}) | {perplexity} | {dead} | "
            f"{result['val_contrastive']:.3f} | {result['val_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="registered quantizer names")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/speech-demo"))
    parser.add_argument("--corpus", type=Path, default=None, help="fillets manifests (default: the cache folder)")
    parser.add_argument("--parallel", type=int, default=None, help="runs at once (default: one per CPU core)")
    parser.add_argument("overrides", nargs="*", help="extra key=value settings for every run")
    args = parser.parse_args(argv)

    corpus = ensure_corpus(args.corpus or prepare_fillets.default_cache_dir())
    cores = os.cpu_count() or 1
    parallel = args.parallel or max(1, min(len(args.methods), cores))
    threads = max(1, cores // parallel)
    started = time.perf_counter()
    jobs = []
    for method in args.methods:
        run_dir = args.out / method
        jobs.append((train_command(method, corpus, run_dir, args.steps, threads, args.overrides), run_dir))
    print(f"pretraining {', '.join(args.methods)} ({args.steps} steps each, {parallel} at a time)", flush=True)
    with ThreadPoolExecutor(parallel) as pool:
        results = list(pool.map(lambda job: run_one(job[0], job[1], threads), jobs))
    table = format_table(results)
    seconds = time.perf_counter() - started
    print(f"\nValidation on held-out fillets-ng levels after {args.steps} steps ({seconds:.0f} s):")
    print(table)
    if any(min(r["val_usage"]) < 0.5 for r in results):
        print(
            "\nA collapsed codebook makes the contrastive task trivial: distractors equal to the target are excluded, "
            "so the loss falls toward 0 and the accuracy toward 1 while the targets carry no information."
        )
    print(f"\nruns, TensorBoard logs and code_usage.png under {args.out}/<method>/")
    atomic_write_json(args.out / "results.json", results)
    atomic_write_text(args.out / "results.md", table + "\n")
    return results


if __name__ == "__main__":
    main()
