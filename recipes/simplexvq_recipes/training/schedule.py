"""Learning-rate schedules of the paper: linear warmup from 0, then cosine annealing to a floor."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(warmup_steps: int, total_steps: int, final_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at a step.

    Linear from 0 to 1 over ``warmup_steps``, then cosine from 1 down to ``final_ratio`` at ``total_steps``
    (and constant after). Speech (B.2): 5e-4 -> 5e-6 is ``final_ratio=0.01``; images (B.1): ``final_ratio=0.5``.
    """
    if warmup_steps < 0 or total_steps < 1 or not 0.0 <= final_ratio <= 1.0:
        raise ValueError(
            f"need warmup_steps >= 0, total_steps >= 1, 0 <= final_ratio <= 1; got {warmup_steps}, {total_steps}, "
            f"{final_ratio}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int, final_ratio: float) -> LambdaLR:
    """A ``LambdaLR`` following :func:`warmup_cosine_factor` (step it once per optimizer step)."""
    return LambdaLR(optimizer, warmup_cosine_factor(warmup_steps, total_steps, final_ratio))
