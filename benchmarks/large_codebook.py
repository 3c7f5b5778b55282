"""One run of the large-codebook study: a patch autoencoder with one quantizer of M codes on overlapping patches of
the bundled photographs, measured on every overlapping patch of the held-out photos.

    python benchmarks/large_codebook.py --output-dir runs/study/patches/x --method softmax-knn_ce \\
        --codebook-size 65536 --rows 4096 --steps 300 --option memory_efficient=true backend=cpu

Why this task. Code use at M = 65536 is only measurable with many held-out rows per code: every overlapping 8 x 8
patch of the five held-out photographs gives about 1.0 M rows (15 per code at M = 65536), which no bundled speech
corpus gives. What the quantizer sees is what it sees in speech or vision models: a stream of feature rows from a
trained encoder, N per step, quantized into M codes with K neighbours per vertex. The questions of the study (is
every code used at large M, what happens when N < K M, what a step costs) depend on M, N, K and the geometry of the
features, not on what the rows encode; the encoder here is small so that the quantizer dominates the cost, as it
does at large M in a real model.

The run writes ``results.json`` (final metrics), ``history.json`` (logged rows) and a resumable
``checkpoint.pt`` (model, optimizer, sampler state; loaded with ``weights_only=True``) in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import simplexvq
from simplexvq_recipes.natural_patches import TRAIN_PHOTOS, VAL_PHOTOS, load_photo
from simplexvq_recipes.patch_demo import DemoConfig, PatchAutoencoder, parse_option

RESULTS_FILE = "results.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
RUNNING_FILE = "running.pid"


class OverlappingPatches:
    """Every ``size`` x ``size`` patch (stride 1) of a set of photos, as views: nothing is copied until sampled."""

    def __init__(self, names: Sequence[str], size: int) -> None:
        self.size = size
        self.views = []  # (H', W', 3, p, p) per photo
        for name in names:
            image = torch.from_numpy(load_photo(name)).permute(2, 0, 1).contiguous()  # (3, H, W)
            self.views.append(image.unfold(1, size, 1).unfold(2, size, 1).permute(1, 2, 0, 3, 4))
        self.counts = torch.tensor([view.shape[0] * view.shape[1] for view in self.views])
        self.offsets = torch.cumsum(self.counts, 0) - self.counts

    def __len__(self) -> int:
        return int(self.counts.sum())

    @property
    def dim(self) -> int:
        return 3 * self.size * self.size

    def gather(self, flat: Tensor) -> Tensor:
        """The patches at flat indices ``flat`` (into all photos' patches, photo by photo, row-major)."""
        photo = torch.searchsorted(self.offsets, flat, right=True) - 1
        out = torch.empty(len(flat), self.dim)
        for index, view in enumerate(self.views):
            mask = photo == index
            if mask.any():
                local = flat[mask] - self.offsets[index]
                width = view.shape[1]
                out[mask] = view[local // width, local % width].reshape(-1, self.dim)
        return out

    def sample(self, count: int, generator: torch.Generator) -> Tensor:
        return self.gather(torch.randint(len(self), (count,), generator=generator))

    def chunks(self, size: int, stride: int = 1) -> Iterator[Tensor]:
        """Every ``stride``-th patch, in chunks of ``size`` rows."""
        flat = torch.arange(0, len(self), stride)
        for start in range(0, len(flat), size):
            yield self.gather(flat[start : start + size])


@dataclass(kw_only=True)
class RunConfig:
    """One run: the quantizer ``method`` with ``codebook_size`` codes, ``rows`` patches per step for ``steps``."""

    method: str
    codebook_size: int
    rows: int
    steps: int
    knn_k: int = 2
    seed: int = 0
    patch_size: int = 8
    latent_dim: int = 16
    hidden: int = 256
    lr: float = 2e-3
    options: dict[str, Any] = field(default_factory=dict)
    log_every: int = 10
    eval_every: int = 0
    """Held-out code use on every ``eval_stride``-th patch every ``eval_every`` steps (0: only at the end)."""
    eval_stride: int = 4
    checkpoint_every: int = 50
    cost_only: bool = False
    """Measure the step's time and memory only: no held-out evaluation (its metrics are NaN)."""

    def demo_config(self) -> DemoConfig:
        spec = simplexvq.QuantizerSpec.from_dict(
            {
                "method": self.method,
                "codebook_size": self.codebook_size,
                "groups": 1,
                "knn_k": self.knn_k,
                **self.options,
            }
        )
        spec.validate(dim=self.latent_dim)
        return DemoConfig(quantizer=spec, latent_dim=self.latent_dim, hidden=self.hidden, lr=self.lr, seed=self.seed)


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def hard_codes(quantizer: simplexvq.ProductQuantizer, latents: Tensor) -> Tensor:
    """Eval-mode hard codes (N, G) of ``latents`` without the smoothing methods' (N, M) softmax and statistics:
    the argmax of the logits is the nearest code under the quantizer's distance, for every method."""
    config = quantizer.config
    flat = latents.reshape(-1, config.groups, config.group_dim)
    codebook = quantizer.codebook()
    return torch.stack(
        [nearest_code(flat[:, group], codebook[group], config.distance) for group in range(config.groups)], dim=-1
    )


def nearest_code(rows: Tensor, codes: Tensor, distance: str, block: int = 512) -> Tensor:
    """Index of the nearest of ``codes`` (M, d) to each of ``rows`` (N, d): the largest cosine, or the smallest
    squared Euclidean distance (the largest ``2 x.q - |q|^2``). The search runs over blocks of ``block`` codes so
    that each (N, block) score matrix stays in cache instead of one (N, M) matrix, about 3x faster on a CPU."""
    if distance == "cosine":
        rows, codes = F.normalize(rows, dim=-1), F.normalize(codes, dim=-1)
        offset = codes.new_zeros(len(codes))
    else:
        rows, offset = 2 * rows, -codes.pow(2).sum(dim=-1)
    best = rows.new_full((len(rows),), -math.inf)
    index = torch.zeros(len(rows), dtype=torch.long, device=rows.device)
    for start in range(0, len(codes), block):
        values, local = torch.addmm(offset[start : start + block], rows, codes[start : start + block].T).max(dim=-1)
        better = values > best
        best = torch.where(better, values, best)
        index = torch.where(better, local + start, index)
    return index


@torch.no_grad()
def evaluate(model: PatchAutoencoder, patches: OverlappingPatches, codebook_size: int, stride: int = 1) -> dict:
    """Hard-code use, code perplexity and rMSE over every ``stride``-th held-out patch (eval mode).

    Codes come from :func:`hard_codes` and are decoded with ``quantizer.decode`` (eval mode's hard output); the
    first chunk is checked against the quantizer's own eval-mode forward."""
    model.eval()
    meter = simplexvq.CodebookUsageMeter(1, codebook_size)
    squared_error, values, rows = 0.0, 0, 0
    chunk = 1024
    for batch in patches.chunks(chunk, stride):
        latents = model.encoder(batch)
        indices = hard_codes(model.quantizer, latents)
        if rows == 0:
            check = model.quantizer(latents[:256])
            agree = (check.indices == indices[:256]).float().mean().item()
            if agree < 0.99:  # ties may differ in the last bits; a wrong distance would not
                raise RuntimeError(f"hard_codes agrees with the quantizer's eval forward on only {agree:.1%} of rows")
        reconstruction = model.decoder(model.quantizer.decode(indices))
        meter.update(indices.reshape(1, -1, 1))  # one "sample": no (rows, M) per-sample histogram
        squared_error += (reconstruction - batch).pow(2).sum().item()
        values += batch.numel()
        rows += len(batch)
    model.train()
    stats = meter.compute()
    return {
        "code_use": stats["usage"].item(),
        "perplexity": stats["perplexity"].item(),
        "dead_codes": int(stats["dead_codes"].item()),
        "rmse": (squared_error / values) ** 0.5,
        "rows": rows,
    }


def _save_atomic(state: dict, path: Path) -> None:
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def train(config: RunConfig, output_dir: Path) -> dict[str, Any]:
    """Train (or resume) one run and write its results; returns them. While it runs, ``running.pid`` in
    ``output_dir`` holds this process's id (the study driver does not start a run that is in progress)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    marker = output_dir / RUNNING_FILE
    marker.write_text(f"{os.getpid()}\n")
    try:
        return _train(config, output_dir)
    finally:
        marker.unlink(missing_ok=True)


def _train(config: RunConfig, output_dir: Path) -> dict[str, Any]:
    torch.manual_seed(config.seed)
    demo = config.demo_config()
    train_patches = OverlappingPatches(TRAIN_PHOTOS, config.patch_size)
    val_patches = OverlappingPatches(VAL_PHOTOS, config.patch_size)
    model = PatchAutoencoder(train_patches.dim, demo)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1, final_div_factor=100.0
    )
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    step_seconds: list[float] = []
    step_cpu_seconds: list[float] = []
    step = 0
    checkpoint = output_dir / CHECKPOINT_FILE
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        if state["config"] != asdict(config):
            raise ValueError(
                f"{checkpoint} was written by a run with other settings; use another --output-dir or delete it"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history, step_seconds, step = state["history"], state["step_seconds"], state["step"]
        step_cpu_seconds = state["step_cpu_seconds"]
        print(f"resumed at step {step}", flush=True)

    meter = simplexvq.CodebookUsageMeter(1, config.codebook_size)
    individual: list[float] = []
    baseline_rss = current_rss_bytes()
    model.train()
    while step < config.steps:
        batch = train_patches.sample(config.rows, generator)
        started, cpu_started = time.perf_counter(), time.process_time()
        reconstruction, quantized = model(batch)
        reconstruction_loss = (reconstruction - batch).pow(2).sum(dim=-1).mean()
        loss = reconstruction_loss + quantized.loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step_seconds.append(time.perf_counter() - started)
        step_cpu_seconds.append(time.process_time() - cpu_started)
        step += 1
        meter.update(quantized.indices.reshape(1, -1, 1))  # one "sample": no (rows, M) histogram
        if "individual_perplexity" in quantized.stats:
            individual.append(quantized.stats["individual_perplexity"].mean().item())
        if step % config.log_every == 0 or step == config.steps:
            usage = meter.compute()
            row = {
                "step": float(step),
                "train/usage": usage["usage"].item(),
                "train/reconstruction": reconstruction_loss.item(),
                "train/loss": loss.item(),
                "train/seconds_per_step": statistics.median(step_seconds[-config.log_every :]),
                "train/cpu_seconds_per_step": statistics.median(step_cpu_seconds[-config.log_every :]),
            }
            if individual:
                row["train/individual_perplexity"] = sum(individual) / len(individual)
            history.append(row)
            print(json.dumps(row), flush=True)
            meter.reset()
            individual = []
        if config.eval_every and not config.cost_only and (step % config.eval_every == 0 or step == config.steps):
            held_out = evaluate(model, val_patches, config.codebook_size, config.eval_stride)
            history.append({"step": float(step), **{f"val_subset/{k}": float(v) for k, v in held_out.items()}})
            print(json.dumps(history[-1]), flush=True)
        if step % config.checkpoint_every == 0 and step < config.steps:
            state = {
                "config": asdict(config),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "history": history,
                "step_seconds": step_seconds,
                "step_cpu_seconds": step_cpu_seconds,
                "step": step,
            }
            _save_atomic(state, checkpoint)
    step_peak = max(0, peak_rss_bytes() - baseline_rss)
    if config.cost_only:
        final = {"code_use": math.nan, "perplexity": math.nan, "dead_codes": -1, "rmse": math.nan, "rows": 0}
    else:
        final = evaluate(model, val_patches, config.codebook_size)
    individual_rows = [row["train/individual_perplexity"] for row in history if "train/individual_perplexity" in row]
    results = {
        **asdict(config),
        "val_code_use": final["code_use"],
        "val_perplexity": final["perplexity"],
        "val_dead_codes": final["dead_codes"],
        "val_rmse": final["rmse"],
        "val_rows": final["rows"],
        "val_rows_per_code": final["rows"] / config.codebook_size,
        "train_individual_perplexity": individual_rows[-1] if individual_rows else 1.0,
        "train_code_use_last_interval": next(r["train/usage"] for r in reversed(history) if "train/usage" in r),
        "seconds_per_step": statistics.median(step_seconds),
        "cpu_seconds_per_step": statistics.median(step_cpu_seconds),
        "step_peak_memory_mib": step_peak / 2**20,
        "rows_per_step_over_km": config.rows / (config.knn_k * config.codebook_size),
        "step": step,
        "train_seconds": sum(step_seconds),
        "threads": torch.get_num_threads(),
    }
    (output_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("val_code_use", "val_perplexity", "val_rmse", "seconds_per_step")}))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--codebook-size", type=int, required=True)
    parser.add_argument("--rows", type=int, required=True, help="patches per step (N)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--knn-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-stride", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost-only", action="store_true", help="time the steps only, no held-out evaluation")
    parser.add_argument("--option", nargs="*", type=parse_option, default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = RunConfig(
        method=args.method,
        codebook_size=args.codebook_size,
        rows=args.rows,
        steps=args.steps,
        knn_k=args.knn_k,
        seed=args.seed,
        patch_size=args.patch_size,
        options=dict(args.option),
        log_every=args.log_every,
        eval_every=args.eval_every,
        eval_stride=args.eval_stride,
        checkpoint_every=args.checkpoint_every,
        cost_only=args.cost_only,
    )
    try:
        config.demo_config()
    except (KeyError, ValueError, TypeError) as error:
        parser.error(f"quantizer {args.method!r}: {error}")
    return train(config, args.output_dir)


if __name__ == "__main__":
    main()
