"""A small task for the shared training loop (tests only): a linear layer with dropout, optionally followed by a
KNN-regularized quantizer, fitted to reproduce its input. Usable in process and under torchrun.

    python toy_task.py OUTPUT_DIR key=value ...            # e.g. training.steps=13 toy.kill_after_step=8

Rank-dependent data (``toy.rank1_rows``, ``toy.rank1_valid_batches``) gives one rank far less data than another.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

import simplexvq
from simplexvq_recipes.training.config import load_config
from simplexvq_recipes.training.loop import RunContext, StepOutput, TrainData, TrainingTask, run_training
from simplexvq_recipes.training.quantizers import recipe_spec
from simplexvq_recipes.training.schedule import warmup_cosine_factor
from simplexvq_recipes.training.settings import TrainingConfig


@dataclass
class ToySettings:
    rows: int = 8
    """Rows per batch."""
    batches: int = 5
    """Batches per epoch."""
    rank1_rows: int | None = None
    """Rows per training batch on rank 1 (default: ``rows``)."""
    valid_batches: int = 2
    rank1_valid_batches: int | None = None
    quantizer: simplexvq.QuantizerSpec | None = field(
        default_factory=lambda: simplexvq.QuantizerSpec(method="hard_gumbel-knn_ce", codebook_size=4, knn_k=2)
    )
    dropout: float = 0.3
    shuffle: bool = True
    kill_after_step: int = 0
    lr: float = 1e-2


@dataclass
class ToyConfig:
    toy: ToySettings = field(default_factory=ToySettings)
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(log_every=1, eval_every=0))


class ToyModel(nn.Module):
    def __init__(self, settings: ToySettings, num_processes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.dropout = nn.Dropout(settings.dropout)
        self.quantizer = None
        if settings.quantizer is not None:
            self.quantizer = recipe_spec(settings.quantizer, num_processes).build(dim=8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.dropout(self.linear(x))
        if self.quantizer is None:
            return (y - x).pow(2).mean(), y.new_zeros(0, 1, dtype=torch.long)
        out = self.quantizer(y)
        return (out.quantized - x).pow(2).mean() + out.loss, out.indices


class ToyData(TrainData):
    def __init__(self, settings: ToySettings, rank: int) -> None:
        generator = torch.Generator().manual_seed(1234)
        self.data = torch.randn(settings.batches, settings.rows, 8, generator=generator)
        self.shuffle = settings.shuffle
        rows = settings.rank1_rows if rank == 1 and settings.rank1_rows is not None else settings.rows
        self.data = self.data[:, :rows] + rank

    def batches(self, epoch: int, start: int) -> Iterable[torch.Tensor]:
        order = torch.arange(len(self.data))
        if self.shuffle:
            order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(epoch))
        return [self.data[i] for i in order.tolist()[start:]]

    def __len__(self) -> int:
        return len(self.data)


class ToyTask(TrainingTask):
    name = "toy"
    safe_resume_keys = ("toy.kill_after_step",)

    def __init__(self, config: ToyConfig) -> None:
        self.settings = config.toy

    def build_model(self, accelerator: Accelerator) -> nn.Module:
        return ToyModel(self.settings, accelerator.num_processes)

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.settings.lr)

    def schedule(self, total_steps: int) -> Callable[[int], float]:
        return warmup_cosine_factor(2, total_steps, 0.1)

    def train_data(self, accelerator: Accelerator) -> TrainData:
        self.rank = accelerator.process_index
        return ToyData(self.settings, self.rank)

    def train_step(self, model: nn.Module, batch: torch.Tensor, accelerator: Accelerator) -> StepOutput:
        loss, _ = model(batch.to(accelerator.device))
        return StepOutput(loss=loss)

    def validate(self, model: nn.Module, context: RunContext, step: int) -> dict[str, Any]:
        settings = self.settings
        count = settings.valid_batches
        if self.rank == 1 and settings.rank1_valid_batches is not None:
            count = settings.rank1_valid_batches
        meter = simplexvq.CodebookUsageMeter(1, 4, device=context.accelerator.device)
        model.eval()
        with torch.no_grad():
            for index in range(count):
                batch = torch.randn(3, 8, generator=torch.Generator().manual_seed(index))
                _, indices = model(batch)
                if indices.numel():
                    meter.update(indices[None])
        model.train()
        usage = meter.compute()  # collective: every rank
        total = context.accelerator.reduce(torch.tensor([float(count)]), reduction="sum")
        metrics = {"usage": float(usage["usage"][0]), "batches": float(total[0])}
        context.history.log(context.accelerator, step, metrics, prefix="val/")
        return metrics

    def results(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return dict(metrics)

    def before_step(self, model: nn.Module, step: int) -> None:
        if self.settings.kill_after_step and step == self.settings.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)


def run(overrides: list[str]) -> dict[str, Any]:
    config = load_config(ToyConfig, overrides=overrides)
    return run_training(ToyTask(config), config, config.training)


if __name__ == "__main__":
    run(sys.argv[1:])
