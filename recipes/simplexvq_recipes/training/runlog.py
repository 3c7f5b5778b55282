"""Messages of a run: printed once (main process) and appended to ``<run folder>/train.log``."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from accelerate import Accelerator
from tqdm.auto import tqdm

LOG_FILE = "train.log"


class RunLog:
    """``say(message)`` prints on the main process and appends a time-stamped line to ``train.log``."""

    def __init__(self, accelerator: Accelerator, run_dir: str | Path) -> None:
        self.accelerator = accelerator
        self.path = Path(run_dir) / LOG_FILE

    def say(self, message: str) -> None:
        if not self.accelerator.is_main_process:
            return
        tqdm.write(message, file=sys.stdout)  # above a progress bar, if one is shown
        sys.stdout.flush()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with self.path.open("a", encoding="utf-8") as file:
            for line in message.splitlines() or [""]:
                file.write(f"{stamp} {line}\n")

    def interval(self, step: int, total_steps: int, scalars: Mapping[str, float]) -> None:
        """The training metrics of a logging interval (``train/`` scalars of :class:`MetricHistory`) as one line."""
        self.say(interval_line(step, total_steps, scalars))


INTERVAL_KEYS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", ".4f"),
    ("lr", "lr", ".3e"),
    ("grad_norm", "grad_norm", ".3f"),
    ("seconds_per_step", "s/step", ".3f"),
)
"""(metric, label, format) shown first, in this order; the task's other metrics follow in name order."""


def interval_line(step: int, total_steps: int, scalars: Mapping[str, float], prefix: str = "train/") -> str:
    """``step 50/1000  loss 4.1234  lr 1.000e-04  s/step 0.210  <other metrics>`` (per-group entries of a tensor
    metric, ``usage/0`` ..., are left to TensorBoard and ``history.json``)."""
    values = {key[len(prefix) :]: value for key, value in scalars.items() if key.startswith(prefix)}
    parts = [f"step {step}/{total_steps}"]
    for key, label, spec in INTERVAL_KEYS:
        if key in values and math.isfinite(values[key]):
            parts.append(f"{label} {values.pop(key):{spec}}")
    known = {key for key, _, _ in INTERVAL_KEYS}
    for key in sorted(values):
        if "/" not in key and key not in known:
            parts.append(f"{key} {values[key]:.4g}")
    return "  ".join(parts)


def show_progress_bar(setting: bool | None, stream: TextIO | None = None) -> bool:
    """``training.progress_bar``: ``true`` always, ``false`` never, ``null`` (default) only when ``stream``
    (stderr) is a terminal, so redirected logs and CI output hold no bar redraws."""
    if setting is not None:
        return setting
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())
