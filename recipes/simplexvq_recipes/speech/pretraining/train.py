"""Pretrain wav2vec 2.0 with any registered simplexvq quantizer, on the shared training loop.

    accelerate launch -m simplexvq_recipes.speech.pretraining.train --preset base data.manifest_dir=DIR [k=v ...]

The same command runs on one CPU, one or many GPUs and several nodes (Accelerate's own configuration decides);
``python -m simplexvq_recipes.speech.pretraining.train`` works on one device, and ``torchrun --nproc_per_node N -m
simplexvq_recipes.speech.pretraining.train`` runs several CPU processes (gloo) where there is no GPU. Packaged presets:
``--preset base`` (1 x 1024), ``base_2x320`` and ``tiny``. The run folder (``training.output_dir``) receives
``config.yaml``, ``train.log``, ``checkpoints/step_*`` (atomic, exact resume), ``tensorboard/``, ``code_usage.png``,
``code_usage_train.png``, ``code_histogram.png``, ``results.json`` and ``history.json`` (every logged metric);
re-running the same command resumes from the newest intact checkpoint (``training.resume_from`` picks another).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

import simplexvq
from simplexvq_recipes.speech.data.batching import ShardedBatchSampler
from simplexvq_recipes.speech.data.dataset import AudioDataset, Batch, make_loader
from simplexvq_recipes.speech.data.manifest import read_manifest
from simplexvq_recipes.speech.pretraining.config import PRESETS, PretrainConfig, preset_path
from simplexvq_recipes.speech.pretraining.evaluation import validate
from simplexvq_recipes.speech.pretraining.model import PretrainOutput, Wav2Vec2Pretrainer, build_model
from simplexvq_recipes.training.cli import run_cli
from simplexvq_recipes.training.config import parse_recipe_args
from simplexvq_recipes.training.loop import (
    RunContext,
    StepOutput,
    TrainData,
    TrainingTask,
    run_training,
    validation_batches,
)
from simplexvq_recipes.training.plots import plot_code_histogram, plot_code_usage
from simplexvq_recipes.training.schedule import warmup_cosine_factor


def parse_args(argv: Sequence[str] | None = None) -> PretrainConfig:
    """``[--preset NAME | --config FILE] key=value ...`` -> :class:`PretrainConfig`."""
    presets = {name: preset_path(name) for name in PRESETS}
    return parse_recipe_args(PretrainConfig, argv, __doc__, presets=presets)


def check_config(config: PretrainConfig) -> None:
    """Reject settings that would fail late, with the key to change."""
    if not config.data.manifest_dir:
        raise ValueError("set data.manifest_dir=<folder with train.tsv and valid.tsv>")
    config.training.validate()
    if config.optim.warmup_steps < 0:
        raise ValueError("optim.warmup_steps must be >= 0")
    if not 0.0 <= config.optim.final_lr <= config.optim.lr:
        raise ValueError("optim.final_lr must be in [0, optim.lr]")
    config.model.quantizer.validate(dim=config.model.quantizer_dim)


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


GUMBEL_METHODS: tuple[str, ...] = ("soft_gumbel", "hard_gumbel")
"""Smoothing methods whose Gumbel temperature follows a schedule (logged as ``train/gumbel_temperature``)."""


class SpeechTrainData(TrainData):
    """This rank's length-aware batches (:class:`ShardedBatchSampler`, the same count on every rank)."""

    def __init__(self, sampler: ShardedBatchSampler, loader: torch.utils.data.DataLoader) -> None:
        self.sampler = sampler
        self.loader = loader

    def batches(self, epoch: int, start: int) -> Iterable[Batch]:
        self.sampler.set_epoch(epoch)
        self.sampler.set_start(start)
        return self.loader

    def __len__(self) -> int:
        return len(self.sampler)


class SpeechPretraining(TrainingTask):
    """wav2vec 2.0 pretraining as a task of the shared loop."""

    safe_resume_keys = ("data.manifest_dir", "data.num_workers")

    def __init__(self, config: PretrainConfig) -> None:
        check_config(config)
        self.config = config
        self.datasets = build_datasets(config)  # a bad manifest or a missing file stops the run before anything
        self.name = config.model.quantizer.method
        self.find_unused_parameters = config.model.layer_drop > 0
        self.skip_empty_batches = config.data.on_error == "skip"
        self.valid_loader: torch.utils.data.DataLoader | None = None
        self.usage: simplexvq.CodebookUsageMeter | None = None
        self.quantizer: torch.nn.Module | None = None

    def build_model(self, accelerator: Accelerator) -> Wav2Vec2Pretrainer:
        model = build_model(self.config, accelerator.num_processes)
        if self.config.training.activation_checkpointing:
            model.enable_activation_checkpointing()
        self.usage = simplexvq.CodebookUsageMeter(model.num_groups, model.codebook_size, device=accelerator.device)
        self.quantizer = model.quantizer
        return model

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        optim = self.config.optim
        return torch.optim.AdamW(
            model.parameters(), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay
        )

    def schedule(self, total_steps: int) -> Callable[[int], float]:
        optim = self.config.optim
        return warmup_cosine_factor(optim.warmup_steps, total_steps, optim.final_lr / optim.lr)

    def train_data(self, accelerator: Accelerator) -> SpeechTrainData:
        train_sampler, train_loader, self.valid_loader = make_loaders(self.config, self.datasets, accelerator)
        return SpeechTrainData(train_sampler, train_loader)

    def before_step(self, model: torch.nn.Module, step: int) -> None:
        model.set_num_updates(step)

    def batch_is_empty(self, batch: Batch) -> bool:
        return len(batch) == 0

    def train_step(self, model: torch.nn.Module, batch: Batch, accelerator: Accelerator) -> StepOutput:
        batch = batch.to(accelerator.device)
        out: PretrainOutput = model(batch.waveforms, batch.lengths)
        metrics = {"accuracy": out.accuracy.detach()}
        metrics.update({f"loss_{name}": value.detach() for name, value in out.losses.items()})
        metrics.update(out.quantizer.stats)
        self.usage.update(out.quantizer.indices[None])
        return StepOutput(loss=out.loss, metrics=metrics)

    def interval_metrics(self, accelerator: Accelerator) -> dict[str, torch.Tensor]:
        usage = self.usage.compute()  # collective
        self.usage.reset()
        metrics = {"usage": usage["usage"], "perplexity_interval": usage["perplexity"]}
        quantizer = self.quantizer
        if isinstance(quantizer, simplexvq.ProductQuantizer) and quantizer.config.method in GUMBEL_METHODS:
            metrics["gumbel_temperature"] = torch.tensor(quantizer.gumbel_temperature)
        return metrics

    def validate(self, model: torch.nn.Module, context: RunContext, step: int) -> dict[str, Any]:
        accelerator = context.accelerator
        batches = validation_batches(self.valid_loader, self.config.training.eval_max_batches)
        metrics = validate(model, batches, accelerator)
        loggable = {key: value for key, value in metrics.items() if key != "counts"}
        context.history.log(accelerator, step, loggable, prefix="val/")
        method = self.config.model.quantizer.method
        if accelerator.is_main_process:
            plot_code_usage(context.history, context.run_dir / "code_usage.png", prefix="val/usage", method=method)
            if any(key.startswith("train/usage") for key in context.history.keys()):
                train_png = context.run_dir / "code_usage_train.png"
                plot_code_usage(context.history, train_png, prefix="train/usage", method=method)
        usage = ", ".join(f"{value:.1%}" for value in metrics["usage"].tolist())
        context.log.say(
            f"step {step}: validation code usage {usage}, contrastive {metrics['contrastive'].item():.3f}, "
            f"accuracy {metrics['accuracy'].item():.3f} ({method})"
        )
        return metrics

    def results(self, metrics: dict[str, Any]) -> dict[str, Any]:
        def as_list(value: torch.Tensor) -> list[float | None]:
            return [float(v) if math.isfinite(float(v)) else None for v in value.reshape(-1).tolist()]

        model = self.config.model
        return {
            "quantizer": model.quantizer.method,
            "groups": model.groups,
            "codebook_size": model.codebook_size,
            "val_usage": as_list(metrics["usage"]),
            "val_per_sample_usage": as_list(metrics["per_sample_usage"]),
            "val_perplexity": as_list(metrics["perplexity"]),
            "val_dead_codes": as_list(metrics["dead_codes"]),
            "val_frames": as_list(metrics["frames"]),
            "val_contrastive": float(metrics["contrastive"]),
            "val_accuracy": float(metrics["accuracy"]),
        }

    def finish(self, metrics: dict[str, Any], context: RunContext) -> None:
        if context.accelerator.is_main_process:
            plot_code_histogram(
                metrics["counts"],
                context.run_dir / "code_histogram.png",
                title="validation codes",
                method=self.config.model.quantizer.method,
            )

    def summary(self, model: torch.nn.Module) -> list[str]:
        return [f"  quantizer {type(model.quantizer).__name__}({model.quantizer.extra_repr()})"]


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
    """Run (or resume) a pretraining run; returns the final results (also in ``results.json``)."""
    return run_training(SpeechPretraining(config), config, config.training)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return train(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
