"""Metric history kept with the checkpoint (for plots and exact resume), mirrored to Accelerate's trackers."""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate import Accelerator

HISTORY_FILE = "history.json"
"""Every recipe writes its :class:`MetricHistory` rows to ``<run folder>/history.json`` at the end of a run."""


def to_scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten tensors/numbers to floats: a (G,) tensor ``usage`` becomes ``usage/0``, ``usage/1``, ..."""
    scalars: dict[str, float] = {}
    for name, value in metrics.items():
        key = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu()
            if value.numel() == 1:
                scalars[key] = value.item()
            else:
                for index, item in enumerate(value.reshape(-1).tolist()):
                    scalars[f"{key}/{index}"] = item
        elif isinstance(value, (int, float)):
            scalars[key] = float(value)
    return scalars


class MetricHistory:
    """Rows of ``{"step": ..., metric: value}``; saved in the trainer state so a resumed run keeps its curves."""

    def __init__(self, rows: list[dict[str, float]] | None = None) -> None:
        self.rows: list[dict[str, float]] = list(rows or [])

    def log(self, accelerator: Accelerator, step: int, metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
        """Record ``metrics`` at ``step`` and send them to the trackers (TensorBoard) on the main process."""
        scalars = {k: v for k, v in to_scalars(metrics, prefix).items() if math.isfinite(v)}
        self.rows.append({"step": float(step), **scalars})
        accelerator.log(scalars, step=step)
        return scalars

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of one metric."""
        points = [(row["step"], row[key]) for row in self.rows if key in row]
        return [s for s, _ in points], [v for _, v in points]

    def keys(self) -> list[str]:
        return sorted({key for row in self.rows for key in row if key != "step"})
