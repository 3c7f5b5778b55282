"""Atomic checkpoints with exact resume, on top of Accelerate's ``save_state`` / ``load_state``.

Accelerate saves the model, optimizer, schedulers, gradient scaler, dataloader samplers, registered custom objects
and every rank's RNG states. This module adds what it lacks for runs that may be killed at any moment:

* **atomicity**: a checkpoint is written into a hidden ``.tmp-step_XXXXXXXX`` folder and renamed to
  ``step_XXXXXXXX`` only once every rank has finished writing, so a folder with the final name is always complete
  (a rename within a file system is atomic);
* **trainer state** (step, epoch, position in the epoch, metric history) saved as JSON inside the checkpoint;
* **retention** of the newest ``keep_last`` checkpoints.

Every method is called on every rank (they contain barriers).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from simplexvq_recipes.training.atomic import atomic_write_json

TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointManager:
    """Save and restore the full training state under ``directory``."""

    def __init__(self, accelerator: Accelerator, directory: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.keep_last = keep_last

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [path for _, path in sorted(found)]

    def latest(self) -> Path | None:
        checkpoints = self.checkpoints()
        return checkpoints[-1] if checkpoints else None

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write a checkpoint of everything Accelerate tracks plus ``trainer_state``; returns its folder."""
        accelerator = self.accelerator
        final = self.directory / f"step_{step:08d}"
        temporary = self.directory / f".tmp-step_{step:08d}"
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)  # left over by a run killed while saving
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        if accelerator.is_main_process:
            atomic_write_json(temporary / TRAINER_STATE, {"step": step, **trainer_state})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():  # re-saving the same step after a resume
                shutil.rmtree(final)
            temporary.rename(final)
            for old in self.checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def load(self, checkpoint: str | Path | None = None) -> dict[str, Any] | None:
        """Restore ``checkpoint`` (default: the latest) and return its trainer state; ``None`` if there is none."""
        path = Path(checkpoint) if checkpoint is not None else self.latest()
        if path is None:
            return None
        state_file = path / TRAINER_STATE
        if not state_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint (no {TRAINER_STATE}); pass a step_XXXXXXXX folder written "
                "by CheckpointManager.save"
            )
        self.accelerator.load_state(str(path))
        return json.loads(state_file.read_text())
