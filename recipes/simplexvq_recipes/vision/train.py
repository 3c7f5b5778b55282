"""Train a discrete image autoencoder (section 4.1): L2 reconstruction + the quantizer's auxiliary loss.

    accelerate launch -m simplexvq_recipes.vision.train \\
        --config recipes/simplexvq_recipes/configs/vision/imagenet_16x16x32.yaml \\
        data.root=/data/imagenet model.method=softmax-knn_ce output_dir=runs/16x16x32-softmax-knn_ce

Writes under ``output_dir``: ``config.yaml``, ``checkpoints/step_XXXXXXXX`` (atomic, exact resume: re-running
the same command continues from the latest), ``tensorboard/``, ``reconstructions.png`` (originals next to
reconstructions), ``code_histogram.png``, ``code_usage.png``, ``final_metrics.json`` and ``history.json``
(every logged metric).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torchvision.utils import save_image
from tqdm.auto import tqdm

from simplexvq_recipes.training.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from simplexvq_recipes.training.checkpoint import CheckpointManager
from simplexvq_recipes.training.config import config_to_yaml, parse_recipe_args
from simplexvq_recipes.training.plots import plot_code_histogram, plot_code_usage
from simplexvq_recipes.training.schedule import warmup_cosine_scheduler
from simplexvq_recipes.training.tracking import HISTORY_FILE, MetricHistory
from simplexvq_recipes.vision.config import VisionRecipeConfig
from simplexvq_recipes.vision.data import build_dataset, build_loader
from simplexvq_recipes.vision.evaluation import evaluate
from simplexvq_vision import DiscreteAutoencoder, Normalizer, reconstruction_grid

FINAL_METRICS_FILE = "final_metrics.json"


def training_loss(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Eq. 9: mean squared reconstruction error + the quantizer's (already weighted) auxiliary losses."""
    out = model(images)
    reconstruction = F.mse_loss(out.reconstruction.float(), images.float())
    loss = reconstruction + out.quantizer.loss
    logs: dict[str, Any] = {"loss": loss.detach(), "reconstruction_mse": reconstruction.detach()}
    logs.update({name: value.detach() for name, value in out.quantizer.losses.items()})
    logs.update({name: value.detach() for name, value in out.quantizer.stats.items()})
    return loss, logs


def save_png(tensor: torch.Tensor, path: Path) -> None:
    buffer = io.BytesIO()
    save_image(tensor, buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


@torch.no_grad()
def save_reconstructions(model: DiscreteAutoencoder, dataset, normalizer: Normalizer, count: int, path: Path) -> None:
    """PNG of the first ``count`` validation images next to their (hard-quantized) reconstructions."""
    device = next(model.parameters()).device
    pixels = torch.stack([dataset[i] for i in range(min(count, len(dataset)))]).to(device)
    was_training = model.training
    model.eval()
    reconstructed = normalizer.denormalize(model(normalizer.normalize(pixels)).reconstruction.float())
    model.train(was_training)
    save_png(reconstruction_grid(pixels, reconstructed), path)


def check_launch(accelerator: Accelerator) -> None:
    """Refuse to run N independent copies writing the same files when a multi-process launch was not picked up
    (torchrun on CPU without ``ACCELERATE_USE_CPU=1``: Accelerate then runs every process on its own)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched with WORLD_SIZE={world_size} but Accelerate runs {accelerator.num_processes} process(es); on "
            "CPU launch with: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N -m simplexvq_recipes.vision.train ..."
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = parse_recipe_args(VisionRecipeConfig, argv, description=__doc__)
    config.validate()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        log_with="tensorboard",
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_launch(accelerator)
    set_seed(config.training.seed)
    normalizer = Normalizer(config.data.normalization)
    train_set = build_dataset(config.data, "train")
    val_set = build_dataset(config.data, "val")
    train_loader = build_loader(train_set, config.data, train=True, seed=config.training.seed)
    val_loader = build_loader(val_set, config.data, train=False, seed=config.training.seed)
    model = DiscreteAutoencoder(config.model)
    lr, weight_decay = config.optim.resolved(config.model.method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(config.optim.betas), weight_decay=weight_decay)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    total_steps = config.training.steps or config.training.epochs * len(train_loader)  # per-process batches
    # a plain LambdaLR stepped once per optimizer step (Accelerate's prepared scheduler would step once per process)
    scheduler = warmup_cosine_scheduler(optimizer, config.optim.warmup_steps, total_steps, config.optim.final_lr_ratio)
    accelerator.register_for_checkpointing(scheduler)
    unwrapped: DiscreteAutoencoder = accelerator.unwrap_model(model)
    manager = CheckpointManager(accelerator, output_dir / "checkpoints", keep_last=config.training.keep_last)
    if accelerator.is_main_process:
        atomic_write_text(output_dir / "config.yaml", config_to_yaml(config))
    accelerator.init_trackers("tensorboard", config={"method": config.model.method, "lr": lr})

    state = manager.load() or {"step": 0, "epoch": 0, "batch": 0, "history": []}
    step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch"]
    history = MetricHistory(state["history"])
    if step:
        accelerator.print(f"resumed from step {step} (epoch {epoch}, batch {batch_in_epoch})")

    def validate() -> dict[str, Any]:
        result = evaluate(unwrapped, val_loader, accelerator, normalizer, max_batches=config.training.eval_max_batches)
        metrics = result.metrics
        logged = {k: metrics[k] for k in ("per_image_usage", "perplexity", "rmse", "psnr")}
        history.log(accelerator, step, {"usage": torch.tensor(metrics["usage_per_group"]), **logged}, prefix="val/")
        if accelerator.is_main_process:
            save_reconstructions(
                unwrapped, val_set, normalizer, config.training.grid_images, output_dir / "reconstructions.png"
            )
            plot_code_histogram(result.counts, output_dir / "code_histogram.png", title=f"step {step}")
            plot_code_usage(history, output_dir / "code_usage.png", prefix="val/usage")
        return metrics

    def checkpoint() -> None:
        manager.save(step, {"epoch": epoch, "batch": batch_in_epoch, "history": history.rows})

    progress = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    if step == 0 and config.training.eval_at_start:
        validate()
    model.train()
    timer = (time.perf_counter(), step)
    while step < total_steps:
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, batch_in_epoch) if batch_in_epoch else train_loader
        for pixels in batches:
            unwrapped.set_num_updates(step)
            loss, logs = training_loss(model, normalizer.normalize(pixels))
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if config.optim.grad_clip_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.optim.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            batch_in_epoch += 1
            progress.update(1)
            if step % config.training.log_every == 0 or step == total_steps:
                logs["lr"] = scheduler.get_last_lr()[0]
                logs["seconds_per_step"] = (time.perf_counter() - timer[0]) / max(1, step - timer[1])
                timer = (time.perf_counter(), step)
                scalars = history.log(accelerator, step, logs, prefix="train/")
                progress.set_postfix(loss=f"{scalars['train/loss']:.4f}")
            if config.training.eval_every and step % config.training.eval_every == 0 and step < total_steps:
                metrics = validate()
                progress.set_postfix(usage=f"{metrics['usage']:.1%}", rmse=f"{metrics['rmse']:.4f}")
            if step % config.training.checkpoint_every == 0 and step < total_steps:
                checkpoint()
            if step == total_steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    progress.close()

    final = validate()
    if not any(path.name == f"step_{step:08d}" for path in manager.checkpoints()):
        checkpoint()
    final = {"step": step, "method": config.model.method, **final}
    if accelerator.is_main_process:
        atomic_write_json(output_dir / FINAL_METRICS_FILE, final)
        atomic_write_json(output_dir / HISTORY_FILE, history.rows)
        accelerator.print(
            f"step {step}: code usage {final['usage']:.1%}, per-image usage {final['per_image_usage']:.1%}, "
            f"rMSE {final['rmse']:.4f}, PSNR {final['psnr']:.2f} dB on {final['num_images']} validation images"
        )
    accelerator.end_training()
    return final


if __name__ == "__main__":
    main()
