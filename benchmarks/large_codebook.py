"""One run of the large-codebook study: a patch autoencoder with one quantizer of M codes on overlapping patches of
the bundled photographs, measured on every overlapping patch of held-out regions of the same photographs.

    python benchmarks/large_codebook.py --output-dir runs/study/patches/x --method softmax-knn_ce \\
        --codebook-size 65536 --rows 4096 --steps 300 --option memory_efficient=true backend=cpu

Why this task. Code use at M = 65536 is only measurable with many held-out rows per code from the distribution the
codebook is trained on: every overlapping 8 x 8 patch of the held-out regions gives about 0.9 M rows (14 per code
at M = 65536), which no bundled speech corpus gives. The photographs are cut into 64 x 64 blocks and one block in
three (a diagonal pattern) is held out, so both sides hold every photograph's content; a patch belongs to a side
only if all its pixels do, so no held-out pixel is ever trained on. (Held-out *photographs* would measure how much
of a codebook transfers to other content, not whether its codes are alive: a code that serves a texture only the
training photographs have is unused there however well it is trained.)

What the quantizer sees is what it sees in speech or vision models: a stream of feature rows from a trained encoder,
N per step, quantized into M codes with K neighbours per vertex. The questions of the study (is every code used at
large M, what happens when N < K M, what a step costs) depend on M, N, K and the geometry of the features, not on
what the rows encode; the encoder here is small so that the quantizer dominates the cost, as it does at large M in
a real model.

Two processes (``torchrun --nproc_per_node 2 benchmarks/large_codebook.py ...``, gloo) each take ``--rows`` rows
per step; with ``--option knn_scope=global`` every vertex searches its K neighbours among the rows of both. The
ranks draw one batch of ``2 x rows`` from one shared generator and each trains on its half, so the rows seen match
a one-process run with twice the rows.

The run writes ``results.json`` (final metrics), ``history.json`` (logged rows) and a resumable
``checkpoint.pt`` (model, optimizer, sampler state; loaded with ``weights_only=True``) in ``--output-dir``, and
the trained model's state in ``final_model.pt``, so that a finished run can be measured again without training.
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
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import simplexvq
from simplexvq_recipes.natural_patches import TRAIN_PHOTOS, VAL_PHOTOS, load_photo
from simplexvq_recipes.patch_demo import DemoConfig, PatchAutoencoder, parse_option

RESULTS_FILE = "results.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
FINAL_MODEL_FILE = "final_model.pt"
RUNNING_FILE = "running.pid"
STUDY_PHOTOS: tuple[str, ...] = TRAIN_PHOTOS + VAL_PHOTOS
"""Every bundled photograph of the patch demo; each gives rows to both sides of the study's split."""
HELD_OUT_BLOCK = 64
HELD_OUT_EVERY = 3
"""Pixel (y, x) is held out when ``(y // 64 + x // 64) % 3 == 0``: one 64 x 64 block in three, on diagonals."""
REGIONS: tuple[str, ...] = ("train", "held_out")
LR_SCHEDULES: tuple[str, ...] = ("one_cycle", "constant")


def held_out_pixels(height: int, width: int) -> Tensor:
    """(H, W) bool: the held-out pixels of a photograph (:data:`HELD_OUT_BLOCK`, :data:`HELD_OUT_EVERY`)."""
    block_y = torch.arange(height) // HELD_OUT_BLOCK
    block_x = torch.arange(width) // HELD_OUT_BLOCK
    return (block_y[:, None] + block_x[None, :]) % HELD_OUT_EVERY == 0


def region_positions(held_out: Tensor, size: int, region: str) -> Tensor:
    """Flat indices into the (H - size + 1) x (W - size + 1) patch positions of the patches lying wholly in
    ``region``: every pixel held out (``held_out``) or none (``train``); patches across the border belong to
    neither side."""
    if region not in REGIONS:
        raise ValueError(f"region {region!r} is not one of {REGIONS}")
    counts = F.avg_pool2d(held_out.float()[None, None], size, stride=1, divisor_override=1)[0, 0]  # held-out pixels
    inside = counts == size * size if region == "held_out" else counts == 0
    return inside.flatten().nonzero().squeeze(1)


class OverlappingPatches:
    """Every ``size`` x ``size`` patch (stride 1) of a set of photos that lies in ``region`` of the study's split,
    as views: nothing is copied until sampled."""

    def __init__(self, names: Sequence[str], size: int, region: str) -> None:
        self.size = size
        self.views = []  # (H', W', 3, p, p) per photo
        self.positions = []  # flat indices into H' x W' of the patches in the region
        for name in names:
            image = torch.from_numpy(load_photo(name)).permute(2, 0, 1).contiguous()  # (3, H, W)
            self.views.append(image.unfold(1, size, 1).unfold(2, size, 1).permute(1, 2, 0, 3, 4))
            self.positions.append(region_positions(held_out_pixels(*image.shape[1:]), size, region))
        self.counts = torch.tensor([len(positions) for positions in self.positions])
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
                local = self.positions[index][flat[mask] - self.offsets[index]]
                width = view.shape[1]
                out[mask] = view[local // width, local % width].reshape(-1, self.dim)
        return out

    def sample(self, count: int, generator: torch.Generator) -> Tensor:
        return self.gather(torch.randint(len(self), (count,), generator=generator))

    def chunks(self, size: int, stride: int = 1, part: int = 0, parts: int = 1) -> Iterator[Tensor]:
        """Every ``stride``-th patch, in chunks of ``size`` rows; with ``parts`` > 1 only every ``parts``-th chunk
        from chunk ``part`` on (one process's share)."""
        flat = torch.arange(0, len(self), stride)
        for start in range(part * size, len(flat), parts * size):
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
    lr_schedule: str = "one_cycle"
    """``one_cycle``: warm-up over 10% of the steps, then cosine decay to 1/100 of ``lr``; ``constant``: the same
    warm-up, then ``lr`` to the end."""
    options: dict[str, Any] = field(default_factory=dict)
    log_every: int = 10
    eval_every: int = 0
    """Held-out code use on every ``eval_stride``-th patch every ``eval_every`` steps (0: only at the end)."""
    eval_stride: int = 4
    train_eval_stride: int = 2
    """Code use is also measured at the end on every ``train_eval_stride``-th training patch (the rows the codebook
    was fitted to): a code unused there is dead; one used there but not on the held-out blocks serves content the
    held-out blocks happen to lack."""
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


def make_scheduler(optimizer: torch.optim.Optimizer, config: RunConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule ``config.lr_schedule`` (both warm up from ``lr / 25`` over the first 10% of the
    steps)."""
    if config.lr_schedule == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.steps, pct_start=0.1, final_div_factor=100.0
        )
    if config.lr_schedule == "constant":
        warmup = max(1, config.steps // 10)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (1 + 24 * step / warmup) / 25))
    raise ValueError(f"lr_schedule {config.lr_schedule!r} is not one of {LR_SCHEDULES}")


def resumable_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with the defaults of fields added since it was written (they did not exist then)."""
    return {**asdict(RunConfig(method="", codebook_size=1, rows=1, steps=1)), **saved}


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
def evaluate(
    model: PatchAutoencoder, patches: OverlappingPatches, codebook_size: int, stride: int = 1, world: int = 1
) -> dict:
    """Hard-code use, code perplexity and rMSE over every ``stride``-th patch of ``patches`` (eval mode). In a
    run of ``world`` > 1 processes every rank must call it: each takes a share of the chunks and the sums are
    all-reduced.

    Codes come from :func:`hard_codes` and are decoded with ``quantizer.decode`` (eval mode's hard output); the
    first rows are checked against the quantizer's own eval-mode forward, on every rank (under ``knn_scope=global``
    that forward is a collective)."""
    model.eval()
    rank = dist.get_rank() if world > 1 else 0
    first = model.encoder(next(patches.chunks(256, stride)))
    agree = (model.quantizer(first).indices == hard_codes(model.quantizer, first)).float().mean().item()
    if agree < 0.99:  # ties may differ in the last bits; a wrong distance would not
        raise RuntimeError(f"hard_codes agrees with the quantizer's eval forward on only {agree:.1%} of rows")
    meter = simplexvq.CodebookUsageMeter(1, codebook_size)  # its compute() all-reduces across ranks
    squared_error, values, rows = 0.0, 0, 0
    chunk = 1024
    for batch in patches.chunks(chunk, stride, rank, world):  # a rank may have no chunk: no collective in here
        latents = model.encoder(batch)
        indices = hard_codes(model.quantizer, latents)
        reconstruction = model.decoder(model.quantizer.decode(indices))
        meter.update(indices.reshape(1, -1, 1))  # one "sample": no (rows, M) per-sample histogram
        squared_error += (reconstruction - batch).pow(2).sum().item()
        values += batch.numel()
        rows += len(batch)
    model.train()
    stats = meter.compute()
    sums = torch.tensor([squared_error, values, rows], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sums)
    squared_error, values, rows = sums.tolist()
    return {
        "code_use": stats["usage"].item(),
        "perplexity": stats["perplexity"].item(),
        "dead_codes": int(stats["dead_codes"].item()),
        "rmse": (squared_error / values) ** 0.5,
        "rows": int(rows),
    }


def _save_atomic(state: dict, path: Path) -> None:
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def train(config: RunConfig, output_dir: Path) -> dict[str, Any]:
    """Train (or resume) one run and write its results; returns them (on rank 0; ``{}`` on the other ranks of a
    distributed run). While it runs, ``running.pid`` in ``output_dir`` holds rank 0's process id (the study driver
    does not start a run that is in progress)."""
    distributed = dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    output_dir.mkdir(parents=True, exist_ok=True)
    marker = output_dir / RUNNING_FILE
    if rank == 0:
        marker.write_text(f"{os.getpid()}\n")
    try:
        return _train(config, output_dir, rank, world)
    finally:
        if rank == 0:
            marker.unlink(missing_ok=True)


def _train(config: RunConfig, output_dir: Path, rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(config.seed)  # the same initial parameters on every rank
    demo = config.demo_config()
    train_patches = OverlappingPatches(STUDY_PHOTOS, config.patch_size, "train")
    val_patches = OverlappingPatches(STUDY_PHOTOS, config.patch_size, "held_out")
    model = PatchAutoencoder(train_patches.dim, demo)
    trained = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    scheduler = make_scheduler(optimizer, config)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    step_seconds: list[float] = []
    step_cpu_seconds: list[float] = []
    step = 0
    checkpoint = output_dir / CHECKPOINT_FILE
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        if resumable_config(state["config"]) != asdict(config):
            raise ValueError(
                f"{checkpoint} was written by a run with other settings; use another --output-dir or delete it"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        history, step_seconds, step = state["history"], state["step_seconds"], state["step"]
        step_cpu_seconds = state["step_cpu_seconds"]
        if rank == 0:
            print(f"resumed at step {step}", flush=True)

    meter = simplexvq.CodebookUsageMeter(1, config.codebook_size)
    individual: list[float] = []
    baseline_rss = current_rss_bytes()
    model.train()
    while step < config.steps:
        # every rank draws the same world x rows patches (one generator state to checkpoint) and takes its share
        batch = train_patches.sample(config.rows * world, generator)[rank * config.rows : (rank + 1) * config.rows]
        started, cpu_started = time.perf_counter(), time.process_time()
        reconstruction, quantized = trained(batch)
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
            if rank == 0:
                print(json.dumps(row), flush=True)
            meter.reset()
            individual = []
        if config.eval_every and not config.cost_only and (step % config.eval_every == 0 or step == config.steps):
            held_out = evaluate(model, val_patches, config.codebook_size, config.eval_stride, world)
            history.append({"step": float(step), **{f"val_subset/{k}": float(v) for k, v in held_out.items()}})
            if rank == 0:
                print(json.dumps(history[-1]), flush=True)
        if step % config.checkpoint_every == 0 and step < config.steps and rank == 0:
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
        if step % config.checkpoint_every == 0 and step < config.steps and world > 1:
            dist.barrier()  # the other ranks wait for rank 0's checkpoint
    step_peak = max(0, peak_rss_bytes() - baseline_rss)
    if rank == 0:
        final_state = {"config": asdict(config), "model": model.state_dict(), "step": step}
        _save_atomic(final_state, output_dir / FINAL_MODEL_FILE)
    if config.cost_only:
        final = {"code_use": math.nan, "perplexity": math.nan, "dead_codes": -1, "rmse": math.nan, "rows": 0}
        fitted = dict(final)
    else:
        final = evaluate(model, val_patches, config.codebook_size, world=world)
        fitted = evaluate(model, train_patches, config.codebook_size, config.train_eval_stride, world)
    if rank != 0:
        dist.barrier()  # rank 0 writes the results
        return {}
    individual_rows = [row["train/individual_perplexity"] for row in history if "train/individual_perplexity" in row]
    results = {
        **asdict(config),
        "val_code_use": final["code_use"],
        "val_perplexity": final["perplexity"],
        "val_dead_codes": final["dead_codes"],
        "val_rmse": final["rmse"],
        "val_rows": final["rows"],
        "val_rows_per_code": final["rows"] / config.codebook_size,
        "train_code_use": fitted["code_use"],
        "train_perplexity": fitted["perplexity"],
        "train_rows": fitted["rows"],
        "processes": world,
        "train_individual_perplexity": individual_rows[-1] if individual_rows else 1.0,
        "train_code_use_last_interval": next(r["train/usage"] for r in reversed(history) if "train/usage" in r),
        "seconds_per_step": statistics.median(step_seconds),
        "cpu_seconds_per_step": statistics.median(step_cpu_seconds),
        "step_peak_memory_mib": step_peak / 2**20,
        "rows_per_step_over_km": config.rows / (config.knn_k * config.codebook_size),
        "searched_rows_over_km": searched_rows(config, world) / (config.knn_k * config.codebook_size),
        "step": step,
        "train_seconds": sum(step_seconds),
        "threads": torch.get_num_threads(),
    }
    (output_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("val_code_use", "train_code_use", "val_rmse", "seconds_per_step")}))
    if world > 1:
        dist.barrier()
    return results


def searched_rows(config: RunConfig, world: int) -> int:
    """Rows among which a vertex's K neighbours are searched in one step: this rank's, or every rank's under
    ``knn_scope=global``."""
    return config.rows * (world if config.options.get("knn_scope") == "global" else 1)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--codebook-size", type=int, required=True)
    parser.add_argument("--rows", type=int, required=True, help="patches per step (N)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--knn-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="one_cycle")
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--eval-stride", type=int, default=4)
    parser.add_argument("--train-eval-stride", type=int, default=2, help="final code use on every k-th train patch")
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
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        patch_size=args.patch_size,
        options=dict(args.option),
        log_every=args.log_every,
        eval_every=args.eval_every,
        eval_stride=args.eval_stride,
        train_eval_stride=args.train_eval_stride,
        checkpoint_every=args.checkpoint_every,
        cost_only=args.cost_only,
    )
    try:
        config.demo_config()
    except (KeyError, ValueError, TypeError) as error:
        parser.error(f"quantizer {args.method!r}: {error}")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    try:
        return train(config, args.output_dir)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
