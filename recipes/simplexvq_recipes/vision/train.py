"""Train a discrete image autoencoder (section 4.1) on the shared training loop: L2 reconstruction + the quantizer's
auxiliary loss.

    accelerate launch -m simplexvq_recipes.vision.train --preset imagenet_16x16x32 \\
        data.root=/data/imagenet model.quantizer.method=softmax-knn_ce training.output_dir=runs/16x16x32-knn_ce

Packaged presets (``--preset``): ``imagenet_16x16x32``, ``imagenet_64x64x3`` and ``imagenet_64x64x32`` (the paper's
Table 3), ``photos_8x8x32`` and ``photos_demo`` (CPU-sized, on offline photographs); ``--config FILE`` reads any
YAML file instead, and ``key=value`` arguments change any setting.

``torchrun --nproc_per_node N -m simplexvq_recipes.vision.train ...`` runs N CPU processes (gloo) where there is no
GPU. Writes under ``training.output_dir``: ``config.yaml``, ``train.log``, ``checkpoints/step_XXXXXXXX`` (atomic,
exact resume: re-running the same command continues from the newest intact one), ``tensorboard/``,
``reconstructions.png`` (originals next to reconstructions), ``code_histogram.png``, ``code_usage.png``,
``results.json`` and ``history.json`` (every logged metric).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import save_image

from simplexvq_recipes.training.atomic import atomic_write_bytes
from simplexvq_recipes.training.cli import run_cli
from simplexvq_recipes.training.config import parse_recipe_args
from simplexvq_recipes.training.loop import RunContext, StepOutput, TrainData, TrainingTask, run_training
from simplexvq_recipes.training.plots import plot_code_histogram, plot_code_usage
from simplexvq_recipes.training.quantizers import recipe_spec
from simplexvq_recipes.training.schedule import warmup_cosine_factor
from simplexvq_recipes.vision.config import VisionRecipeConfig, preset_paths
from simplexvq_recipes.vision.data import build_dataset, build_loader
from simplexvq_recipes.vision.evaluation import evaluate
from simplexvq_vision import AutoencoderConfig, DiscreteAutoencoder, Normalizer, reconstruction_grid


def build_autoencoder(config: AutoencoderConfig, num_processes: int = 1) -> DiscreteAutoencoder:
    """The autoencoder with the recipes' quantizer defaults (:func:`recipe_spec`: neighbours across ranks when
    several processes train a KNN method and ``knn_scope`` is unset)."""
    spec = recipe_spec(config.quantizer, num_processes)
    return DiscreteAutoencoder(dataclasses.replace(config, quantizer=spec))


def training_loss(model: torch.nn.Module, images: torch.Tensor) -> StepOutput:
    """Eq. 9: mean squared reconstruction error + the quantizer's (already weighted) auxiliary losses."""
    out = model(images)
    reconstruction = F.mse_loss(out.reconstruction.float(), images.float())
    loss = reconstruction + out.quantizer.loss
    metrics: dict[str, torch.Tensor] = {"reconstruction_mse": reconstruction.detach()}
    metrics.update({name: value.detach() for name, value in out.quantizer.losses.items()})
    metrics.update({name: value.detach() for name, value in out.quantizer.stats.items()})
    return StepOutput(loss=loss, metrics=metrics)


def save_png(tensor: torch.Tensor, path: Path) -> None:
    buffer = io.BytesIO()
    save_image(tensor, buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


@torch.no_grad()
def save_reconstructions(
    model: DiscreteAutoencoder, dataset, normalizer: Normalizer, count: int, path: Path, title: str | None = None
) -> None:
    """PNG of the first ``count`` validation images next to their (hard-quantized) reconstructions, with column
    labels and ``title`` (the method and step) above."""
    device = next(model.parameters()).device
    pixels = torch.stack([dataset[i] for i in range(min(count, len(dataset)))]).to(device)
    was_training = model.training
    model.eval()
    reconstructed = normalizer.denormalize(model(normalizer.normalize(pixels)).reconstruction.float())
    model.train(was_training)
    save_png(reconstruction_grid(pixels, reconstructed, title=title), path)


class VisionTrainData(TrainData):
    """This rank's shard of the shuffled training images (Accelerate's seedable sampler: same order given the
    epoch on every run)."""

    def __init__(self, loader: DataLoader, accelerator: Accelerator) -> None:
        self.loader = loader
        self.accelerator = accelerator

    def batches(self, epoch: int, start: int) -> Iterable[torch.Tensor]:
        self.loader.set_epoch(epoch)
        return self.accelerator.skip_first_batches(self.loader, start) if start else self.loader

    def __len__(self) -> int:
        return len(self.loader)


class ImageAutoencoding(TrainingTask):
    """Discrete image autoencoding as a task of the shared loop."""

    safe_resume_keys = ("data.root", "data.num_workers", "data.eval_batch_size", "training.grid_images")

    def __init__(self, config: VisionRecipeConfig) -> None:
        config.validate()
        self.config = config
        self.name = config.model.quantizer.method
        self.normalizer = Normalizer(config.data.normalization)
        self.train_set: Dataset = build_dataset(config.data, "train")
        self.val_set: Dataset = build_dataset(config.data, "val")
        self.val_loader: DataLoader | None = None

    def build_model(self, accelerator: Accelerator) -> DiscreteAutoencoder:
        return build_autoencoder(self.config.model, accelerator.num_processes)

    def build_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        optim = self.config.optim
        lr, weight_decay = optim.resolved(self.config.model.quantizer.method)
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(optim.betas), weight_decay=weight_decay)

    def schedule(self, total_steps: int) -> Callable[[int], float]:
        return warmup_cosine_factor(self.config.optim.warmup_steps, total_steps, self.config.optim.final_lr_ratio)

    def train_data(self, accelerator: Accelerator) -> VisionTrainData:
        seed = self.config.training.seed
        train_loader = build_loader(self.train_set, self.config.data, train=True, seed=seed)
        val_loader = build_loader(self.val_set, self.config.data, train=False, seed=seed)
        train_loader, self.val_loader = accelerator.prepare(train_loader, val_loader)
        return VisionTrainData(train_loader, accelerator)

    def before_step(self, model: torch.nn.Module, step: int) -> None:
        model.set_num_updates(step)

    def train_step(self, model: torch.nn.Module, batch: torch.Tensor, accelerator: Accelerator) -> StepOutput:
        return training_loss(model, self.normalizer.normalize(batch))

    def validate(self, model: torch.nn.Module, context: RunContext, step: int) -> dict[str, Any]:
        accelerator, run_dir, method = context.accelerator, context.run_dir, self.config.model.quantizer.method
        result = evaluate(
            model, self.val_loader, accelerator, self.normalizer, max_batches=self.config.training.eval_max_batches
        )
        metrics = result.metrics
        logged = {k: metrics[k] for k in ("per_image_usage", "perplexity", "rmse", "psnr")}
        usage = torch.tensor(metrics["usage_per_group"])
        context.history.log(accelerator, step, {"usage": usage, **logged}, prefix="val/")
        if accelerator.is_main_process:
            grid = self.config.training.grid_images
            title = f"{method}, step {step}"
            save_reconstructions(model, self.val_set, self.normalizer, grid, run_dir / "reconstructions.png", title)
            plot_code_histogram(result.counts, run_dir / "code_histogram.png", title=f"step {step}", method=method)
            plot_code_usage(context.history, run_dir / "code_usage.png", prefix="val/usage", method=method)
        context.log.say(
            f"step {step}: code usage {metrics['usage']:.1%}, per-image usage {metrics['per_image_usage']:.1%}, "
            f"rMSE {metrics['rmse']:.4f}, PSNR {metrics['psnr']:.2f} dB on {metrics['num_images']} validation "
            f"images ({method})"
        )
        return metrics

    def results(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"method": self.config.model.quantizer.method, **metrics}

    def summary(self, model: torch.nn.Module) -> list[str]:
        height, width, channels = self.config.model.latent_shape(self.config.data.image_size)
        return [
            f"  latent {height}x{width}x{channels}, quantizer {type(model.quantizer).__name__}"
            f"({model.quantizer.extra_repr()})",
            f"  {len(self.train_set)} training and {len(self.val_set)} validation images",
        ]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = parse_recipe_args(VisionRecipeConfig, argv, description=__doc__, presets=preset_paths())
    return run_training(ImageAutoencoding(config), config, config.training)


if __name__ == "__main__":
    run_cli(main)
