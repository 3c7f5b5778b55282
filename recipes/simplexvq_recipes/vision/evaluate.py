"""Evaluate a trained autoencoder checkpoint on the validation set; write JSON and a Markdown row of Table 1.

    python -m simplexvq_recipes.vision.evaluate --run-dir runs/16x16x32-knn_ce \\
        [--checkpoint runs/.../checkpoints/step_00500000] [eval.inception_weights=/path/inception.pth] [data.root=...]

Reads ``<run-dir>/config.yaml`` (``key=value`` arguments override it) and the newest checkpoint unless one is
given. Reports code usage over the whole validation set, per-image code usage, rMSE, PSNR and FID / Inception
Score with torchvision's Inception-v3; without its weights it says so and reports ``fd_random_inception_v3``
instead (not FID). Runs under ``accelerate launch`` on several processes too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.utils.data import Dataset, Subset

from simplexvq_recipes.training.atomic import atomic_write_json, atomic_write_text
from simplexvq_recipes.training.checkpoint import (
    TRAINER_STATE,
    CheckpointError,
    checkpoint_problem,
    latest_complete,
)
from simplexvq_recipes.training.cli import run_cli
from simplexvq_recipes.training.config import load_config
from simplexvq_recipes.training.loop import CHECKPOINTS
from simplexvq_recipes.training.plots import plot_code_histogram
from simplexvq_recipes.vision.config import DataConfig, VisionRecipeConfig
from simplexvq_recipes.vision.data import build_dataset, build_loader
from simplexvq_recipes.vision.evaluation import evaluate
from simplexvq_recipes.vision.table import table1_markdown
from simplexvq_vision import DiscreteAutoencoder, Normalizer, load_inception


def load_weights(model: DiscreteAutoencoder, checkpoint: Path) -> None:
    """Load the model weights that ``accelerator.save_state`` wrote into ``checkpoint``."""
    safetensors_file, torch_file = checkpoint / "model.safetensors", checkpoint / "pytorch_model.bin"
    if safetensors_file.is_file():
        state = load_file(str(safetensors_file))
    elif torch_file.is_file():
        try:
            state = torch.load(torch_file, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 (the unpickler's errors have no common base class)
            raise CheckpointError(
                f"refusing to load {torch_file}: it is not a plain state dict ({type(error).__name__}); only tensors "
                "are read from a checkpoint, never code"
            ) from error
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in checkpoint {checkpoint}")
    model.load_state_dict(state)


def limited(val_set: Dataset, config: VisionRecipeConfig, num_processes: int) -> tuple[Dataset, DataConfig]:
    """The images ``eval.max_batches`` batches per process can reach, and at most that many loader workers: the
    loader's workers then neither start nor decode more than the evaluation reads (with 8 workers, each prefetching
    2 batches of full-size images, a one-batch evaluation otherwise decodes 16 batches)."""
    max_batches = config.eval.max_batches
    if not max_batches:
        return val_set, config.data
    count = min(len(val_set), max_batches * config.data.eval_batch_size * num_processes)
    workers = min(config.data.num_workers, max_batches)
    return Subset(val_set, range(count)), dataclasses.replace(config.data, num_workers=workers)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True, help="output_dir of the training run")
    parser.add_argument("--checkpoint", type=Path, help="a step_XXXXXXXX folder (default: the newest)")
    parser.add_argument("--output-dir", type=Path, help="where to write the results (default: <run-dir>/eval)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the run's config.yaml")
    args = parser.parse_args(argv)

    # the config a chosen checkpoint carries (it may come from another run); else the run folder's
    own_config = args.checkpoint / "config.yaml" if args.checkpoint else None
    config_file = own_config if own_config is not None and own_config.is_file() else args.run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: --run-dir must be the output_dir of a training run")
    config = load_config(VisionRecipeConfig, config_file, args.overrides)
    config.validate()
    accelerator = Accelerator(cpu=config.training.cpu or not torch.cuda.is_available())  # gloo on CPU machines
    checkpoint = args.checkpoint or latest_complete(args.run_dir / CHECKPOINTS)
    if checkpoint is None:
        raise FileNotFoundError(f"no intact checkpoint under {args.run_dir / CHECKPOINTS}")
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise FileNotFoundError(f"{checkpoint} is not an intact checkpoint: {problem}")
    state_file = checkpoint / TRAINER_STATE
    step = json.loads(state_file.read_text())["step"] if state_file.is_file() else None

    model = DiscreteAutoencoder(config.model)
    load_weights(model, checkpoint)
    model.to(accelerator.device)
    normalizer = Normalizer(config.data.normalization)
    val_set = build_dataset(config.data, "val")
    eval_set, data_config = limited(val_set, config, accelerator.num_processes)
    loader = accelerator.prepare(build_loader(eval_set, data_config, train=False, seed=config.training.seed))
    features = None
    if config.eval.feature_metrics:
        features = load_inception(config.eval.inception_weights).to(accelerator.device)
    result = evaluate(
        model,
        loader,
        accelerator,
        normalizer,
        features=features,
        max_batches=config.eval.max_batches,
        is_splits=config.eval.is_splits,
    )

    height, width, channels = config.model.latent_shape(config.data.image_size)
    metrics = {
        "method": config.model.quantizer.method,
        "checkpoint": str(checkpoint),
        "step": step,
        "image_size": config.data.image_size,
        "feature_map": f"{height}×{width}×{channels}",
        **result.metrics,
    }
    metrics["whole_validation_set"] = metrics["num_images"] == len(val_set)
    metrics["markdown"] = table1_markdown(metrics)
    output_dir = args.output_dir or args.run_dir / "eval"
    if accelerator.is_main_process:
        name = checkpoint.name
        atomic_write_json(output_dir / f"{name}.json", metrics)
        atomic_write_text(output_dir / f"{name}.md", metrics["markdown"])
        histogram = output_dir / f"{name}_code_histogram.png"
        plot_code_histogram(result.counts, histogram, title=f"{name}", method=config.model.quantizer.method)
        print(metrics["markdown"], end="")
    return metrics


if __name__ == "__main__":
    run_cli(main)
