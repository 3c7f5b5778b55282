"""Pretrain wav2vec 2.0 with any registered simplexvq quantizer, driven by Accelerate.

    accelerate launch -m simplexvq_recipes.speech.pretraining.train --config CONFIG.yaml data.manifest_dir=DIR [k=v ...]

The same command runs on one CPU, one or many GPUs and several nodes (Accelerate's own configuration decides);
``python -m simplexvq_recipes.speech.pretraining.train`` works on one device, and ``torchrun --nproc_per_node N -m
simplexvq_recipes.speech.pretraining.train`` runs several CPU processes (gloo) where there is no GPU. Packaged presets:
``--preset base`` (1 x 1024), ``base_2x320`` and ``tiny``. The run folder (``training.output_dir``) receives
``config.yaml``, ``checkpoints/step_*`` (atomic, exact resume), ``tensorboard/``, ``code_usage.png``,
``code_usage_train.png``, ``code_histogram.png``, ``results.json`` and ``history.json`` (every logged metric);
re-running the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm

import simplexvq
from simplexvq_recipes.speech.data.batching import ShardedBatchSampler
from simplexvq_recipes.speech.data.dataset import AudioDataset, make_loader
from simplexvq_recipes.speech.data.manifest import read_manifest
from simplexvq_recipes.speech.pretraining.config import PRESETS, PretrainConfig, preset_path
from simplexvq_recipes.speech.pretraining.evaluation import validate
from simplexvq_recipes.speech.pretraining.model import CHECKPOINTS, CONFIG_FILE, PretrainOutput, build_model
from simplexvq_recipes.training.atomic import atomic_write_json, atomic_write_text
from simplexvq_recipes.training.checkpoint import CheckpointManager
from simplexvq_recipes.training.config import config_to_yaml, load_config
from simplexvq_recipes.training.plots import plot_code_histogram, plot_code_usage
from simplexvq_recipes.training.schedule import warmup_cosine_scheduler
from simplexvq_recipes.training.tracking import HISTORY_FILE, MetricHistory

RESULTS_FILE = "results.json"
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


def parse_args(argv: Sequence[str] | None = None) -> PretrainConfig:
    """``[--preset NAME | --config FILE] key=value ...`` -> :class:`PretrainConfig`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="YAML file with the settings to change from the defaults")
    source.add_argument("--preset", choices=PRESETS, help="a packaged YAML preset")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied after the YAML file")
    args = parser.parse_args(argv)
    path = preset_path(args.preset) if args.preset else args.config
    return load_config(PretrainConfig, path, args.overrides)


def check_config(config: PretrainConfig) -> None:
    """Reject settings that would fail late, with the key to change."""
    if not config.data.manifest_dir:
        raise ValueError("set data.manifest_dir=<folder with train.tsv and valid.tsv>")
    if config.training.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"training.mixed_precision must be one of {', '.join(MIXED_PRECISION)}")
    if config.training.max_steps < 1 or config.optim.warmup_steps < 0:
        raise ValueError("training.max_steps must be >= 1 and optim.warmup_steps >= 0")
    for key in ("log_every", "valid_every", "checkpoint_every"):
        if getattr(config.training, key) < 1:
            raise ValueError(f"training.{key} must be >= 1")
    if not 0.0 <= config.optim.final_lr <= config.optim.lr:
        raise ValueError("optim.final_lr must be in [0, optim.lr]")


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """``auto``: bf16 on GPUs that support it, fp16 on other GPUs, none on CPU (the quantizer is float32 anyway)."""
    if requested != "auto":
        return requested
    if device_type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_datasets(config: PretrainConfig) -> tuple[AudioDataset, AudioDataset]:
    data = config.data
    manifest_dir = Path(data.manifest_dir)
    common = {"sample_rate": data.sample_rate, "normalize": data.normalize, "on_error": data.on_error}
    train = AudioDataset(
        read_manifest(manifest_dir / f"{data.train_subset}.tsv"),
        crop_samples=data.crop_samples,
        min_samples=data.min_samples,
        random_crop=True,
        seed=config.training.seed,
        **common,
    )
    valid = AudioDataset(
        read_manifest(manifest_dir / f"{data.valid_subset}.tsv"),
        crop_samples=data.valid_crop_samples or data.crop_samples,
        min_samples=data.min_samples,
        random_crop=False,
        **common,
    )
    return train, valid


class IntervalMeter:
    """Sums of training metrics since the last log, averaged over steps and ranks when logged."""

    def __init__(self, groups: int, codebook_size: int, device: torch.device) -> None:
        self.usage = simplexvq.CodebookUsageMeter(groups, codebook_size, device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.device = device

    def update(self, out: PretrainOutput, grad_norm: torch.Tensor | None) -> None:
        values: dict[str, torch.Tensor] = {"loss": out.loss, "accuracy": out.accuracy}
        values.update({f"loss_{name}": value for name, value in out.losses.items()})
        values.update(out.quantizer.stats)
        if grad_norm is not None:
            values["grad_norm"] = torch.as_tensor(grad_norm)
        for name, value in values.items():
            value = value.detach().float().to(self.device).reshape(-1)
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.usage.update(out.quantizer.indices[None])
        self.steps += 1

    def compute(self, accelerator: Accelerator) -> dict[str, torch.Tensor]:
        """Averages over the interval and all ranks (two collectives, on every rank), then reset."""
        names = sorted(self.sums)
        sizes = [self.sums[name].numel() for name in names]
        packed = torch.cat([self.sums[name] for name in names]) / max(self.steps, 1)
        packed = accelerator.reduce(packed, reduction="mean")
        metrics = dict(zip(names, packed.split(sizes), strict=True))
        usage = self.usage.compute()
        metrics["usage"] = usage["usage"]
        metrics["perplexity_interval"] = usage["perplexity"]
        self.usage.reset()
        self.sums, self.steps = {}, 0
        return metrics


def make_accelerator(config: PretrainConfig) -> Accelerator:
    """CPU (gloo across processes) where there is no GPU or ``training.cpu``; mixed precision as configured."""
    settings = config.training
    cpu = settings.cpu or not torch.cuda.is_available()  # cpu=True gives MULTI_CPU under torchrun
    return Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(settings.mixed_precision, "cpu" if cpu else "cuda"),
        log_with="tensorboard" if settings.tensorboard else None,
        project_dir=settings.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.model.layer_drop > 0)],
        step_scheduler_with_optimizer=False,  # one schedule step per optimizer step, whatever the process count
    )


def make_loaders(
    config: PretrainConfig, datasets: tuple[AudioDataset, AudioDataset], accelerator: Accelerator
) -> tuple[ShardedBatchSampler, torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    """(train sampler, train loader, valid loader) over (train, valid) datasets, sharded over the processes."""
    train_set, valid_set = datasets
    seed = config.training.seed
    common = {
        "batch_size": config.data.batch_size,
        "max_tokens": config.data.max_tokens,
        "num_replicas": accelerator.num_processes,
        "rank": accelerator.process_index,
    }
    train_sampler = ShardedBatchSampler(train_set.lengths, shuffle=True, seed=seed, even=True, **common)
    valid_sampler = ShardedBatchSampler(valid_set.lengths, shuffle=False, even=False, **common)
    workers = config.data.num_workers
    return (
        train_sampler,
        make_loader(train_set, train_sampler, num_workers=workers, seed=seed),
        make_loader(valid_set, valid_sampler, num_workers=workers, seed=seed),
    )


def train(config: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the final validation metrics (also in ``results.json``)."""
    check_config(config)
    datasets = build_datasets(config)  # first: a bad manifest or a missing file stops the run before anything else
    settings, optim = config.training, config.optim
    if settings.threads:
        torch.set_num_threads(settings.threads)
    run_dir = Path(settings.output_dir)
    accelerator = make_accelerator(config)
    set_seed(settings.seed)
    model = build_model(config)
    set_seed(settings.seed, device_specific=True)  # different masks and dropout on each rank from here on
    train_sampler, train_loader, valid_loader = make_loaders(config, datasets, accelerator)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
    )
    scheduler = warmup_cosine_scheduler(optimizer, optim.warmup_steps, settings.max_steps, optim.final_lr / optim.lr)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    if accelerator.is_main_process:
        atomic_write_text(run_dir / CONFIG_FILE, config_to_yaml(config))
    manager = CheckpointManager(accelerator, run_dir / CHECKPOINTS, keep_last=settings.keep_last)
    resumed = manager.load() if settings.resume else None
    state = resumed or {"step": 0, "epoch": 0, "batch": 0, "history": []}
    step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch"]
    history = MetricHistory(state["history"])
    if settings.tensorboard:
        accelerator.init_trackers("tensorboard")
    if resumed:
        accelerator.print(f"resumed from {manager.latest()} at step {step}")

    interval = IntervalMeter(unwrapped.num_groups, unwrapped.codebook_size, accelerator.device)
    progress = tqdm(
        total=settings.max_steps,
        initial=step,
        disable=not (settings.progress_bar and accelerator.is_local_main_process),
        desc=config.model.quantizer.name,
        dynamic_ncols=True,
    )
    final_metrics: dict[str, Any] = {}
    started = time.perf_counter()
    if step == 0:  # code usage of the untrained model: where every curve starts
        _validate_and_plot(unwrapped, valid_loader, accelerator, history, step, run_dir)
    while step < settings.max_steps:
        train_sampler.set_epoch(epoch)
        train_sampler.set_start(batch_in_epoch)
        for batch in train_loader:
            batch_in_epoch += 1
            if config.data.on_error == "skip" and _any_rank_empty(accelerator, len(batch) == 0):
                warnings.warn(f"step {step + 1}: no readable audio in a rank's batch; batch skipped", stacklevel=1)
                continue
            batch = batch.to(accelerator.device)
            unwrapped.set_num_updates(step)
            with accelerator.autocast():
                out = model(batch.waveforms, batch.lengths)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(out.loss)
            grad_norm = None
            if optim.clip_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            interval.update(out, grad_norm)
            progress.update(1)

            last = step == settings.max_steps
            if step % settings.log_every == 0 or step % settings.checkpoint_every == 0 or last:
                _log_interval(interval, accelerator, history, step, scheduler, unwrapped, progress)
            if step % settings.valid_every == 0 or last:
                final_metrics = _validate_and_plot(unwrapped, valid_loader, accelerator, history, step, run_dir)
            if step % settings.checkpoint_every == 0 or last:
                manager.save(step, {"epoch": epoch, "batch": batch_in_epoch, "history": history.rows})
            if last:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    progress.close()

    if not final_metrics:  # resumed a run that had already finished
        final_metrics = _validate_and_plot(unwrapped, valid_loader, accelerator, history, step, run_dir)
    results = _results(config, final_metrics, step, time.perf_counter() - started)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / RESULTS_FILE, results)
        atomic_write_json(run_dir / HISTORY_FILE, history.rows)
        plot_code_histogram(final_metrics["counts"], run_dir / "code_histogram.png", title="validation codes")
    accelerator.end_training()
    return results


def _log_interval(
    interval: IntervalMeter,
    accelerator: Accelerator,
    history: MetricHistory,
    step: int,
    scheduler: Any,
    model: torch.nn.Module,
    progress: tqdm,
) -> None:
    """Training metrics of the interval (averaged over steps and ranks) to TensorBoard, the history and the bar."""
    metrics = interval.compute(accelerator)
    metrics["lr"] = torch.tensor(scheduler.get_last_lr()[0])
    method = getattr(getattr(model.quantizer, "config", None), "method", "")
    if method in ("soft_gumbel", "hard_gumbel"):
        metrics["gumbel_temperature"] = torch.tensor(model.quantizer.gumbel_temperature)
    history.log(accelerator, step, metrics, prefix="train/")
    progress.set_postfix(
        loss=f"{metrics['loss'].item():.3f}",
        acc=f"{metrics['accuracy'].item():.2f}",
        use=f"{metrics['usage'].mean().item():.0%}",
    )


def _any_rank_empty(accelerator: Accelerator, empty: bool) -> bool:
    """One all-reduce so that every rank skips a step together when any rank has nothing to train on."""
    flag = torch.tensor([1.0 if empty else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _validate_and_plot(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    accelerator: Accelerator,
    history: MetricHistory,
    step: int,
    run_dir: Path,
) -> dict[str, torch.Tensor]:
    metrics = validate(model, loader, accelerator)
    loggable = {key: value for key, value in metrics.items() if key != "counts"}
    history.log(accelerator, step, loggable, prefix="val/")
    if accelerator.is_main_process:
        plot_code_usage(history, run_dir / "code_usage.png", prefix="val/usage")
        if any(key.startswith("train/usage") for key in history.keys()):
            plot_code_usage(history, run_dir / "code_usage_train.png", prefix="train/usage")
    usage = ", ".join(f"{value:.1%}" for value in metrics["usage"].tolist())
    accelerator.print(
        f"step {step}: validation code usage {usage}, contrastive {metrics['contrastive'].item():.3f}, "
        f"accuracy {metrics['accuracy'].item():.3f}"
    )
    return metrics


def _results(config: PretrainConfig, metrics: dict[str, torch.Tensor], step: int, seconds: float) -> dict[str, Any]:
    def as_list(value: torch.Tensor) -> list[float]:
        return [float(v) if math.isfinite(float(v)) else None for v in value.reshape(-1).tolist()]

    quantizer = config.model.quantizer
    return {
        "quantizer": quantizer.name,
        "groups": quantizer.groups,
        "codebook_size": quantizer.codebook_size,
        "step": step,
        "train_seconds": seconds,
        "val_usage": as_list(metrics["usage"]),
        "val_per_sample_usage": as_list(metrics["per_sample_usage"]),
        "val_perplexity": as_list(metrics["perplexity"]),
        "val_dead_codes": as_list(metrics["dead_codes"]),
        "val_frames": as_list(metrics["frames"]),
        "val_contrastive": float(metrics["contrastive"]),
        "val_accuracy": float(metrics["accuracy"]),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
