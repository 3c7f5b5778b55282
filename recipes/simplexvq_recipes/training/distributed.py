"""Multi-process helpers of the shared loop: every collective is called on every rank, whatever the data split."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch import nn

from simplexvq import ProductQuantizer


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (one all-reduce, called by every rank)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


@contextlib.contextmanager
def local_neighbours(model: nn.Module) -> Iterator[None]:
    """Search the KNN regularizer's neighbours within each process for the duration of the block.

    Validation needs the quantizer's codes, not its (untrainable) eval-mode regularizer, and ranks may hold
    different numbers of validation batches: a cross-rank neighbour search there would leave a rank waiting in the
    quantizer's collective while another waits in a metric's all-reduce. Inside this block every
    :class:`simplexvq.ProductQuantizer` of ``model`` searches locally (an eval-mode batch with fewer rows than K then
    just leaves the term out); the configured scope is restored afterwards.
    """
    changed: list[tuple[ProductQuantizer, object]] = []
    for module in model.modules():
        if isinstance(module, ProductQuantizer) and module.config.knn_scope != "local":
            changed.append((module, module.config))
            module.config = module.config.replace(knn_scope="local")
    try:
        yield
    finally:
        for module, config in changed:
            module.config = config


def check_launch(accelerator: Accelerator) -> None:
    """Refuse to run N independent copies writing the same files when a multi-process launch was not picked up."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RuntimeError(
            f"launched with WORLD_SIZE={world_size} but Accelerate runs {accelerator.num_processes} process(es); "
            "launch with torchrun or accelerate launch and leave training.cpu / ACCELERATE_USE_CPU consistent"
        )
