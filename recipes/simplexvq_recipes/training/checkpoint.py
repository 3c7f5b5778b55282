"""Atomic checkpoints with exact resume, in formats that cannot execute code when read.

A checkpoint is a folder ``step_XXXXXXXX`` holding:

* ``model.safetensors``: the (unwrapped) model's state dict;
* ``optimizer.pt``: the optimizer's state dict, read back with ``torch.load(weights_only=True)`` (tensors, numbers
  and containers only: a pickled object that would run code is refused);
* ``scheduler.json`` and ``grad_scaler.json``: the learning-rate schedule's and the fp16 gradient scaler's states;
* ``rng_<rank>.safetensors`` + ``rng_<rank>.json``: every rank's torch (CPU and CUDA), NumPy and Python RNG states;
* ``trainer_state.json``: step, position in the data, metric history, training seconds, and ``recipe`` (the
  config class of the run, so that another recipe's checkpoint is refused by name);
* ``config.yaml``: the whole config the run was trained with (what every resume compares the new config with; a
  checkpoint copied out of its run folder still says what it was trained with);
* ``manifest.json``: the size of every other file, written last.

Nothing is unpickled with code execution, unlike Accelerate's ``save_state`` (whose registered custom objects are
read with ``weights_only=False``). A checkpoint is written into a hidden ``.tmp-step_XXXXXXXX`` folder and renamed
once every rank has finished, so a folder with the final name was complete when written; :func:`checkpoint_problem`
also detects one damaged later (a truncated file), and :meth:`CheckpointManager.restore` then falls back to the
newest intact checkpoint with a warning naming the bad file. :func:`latest_complete` is the one definition of
"complete" shared by the trainer and by the recipes' ``load_pretrained``.

Every method of :class:`CheckpointManager` is called on every rank (they contain barriers).
"""

from __future__ import annotations

import json
import random
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from simplexvq_recipes.training.atomic import atomic_write_json, atomic_write_text

CHECKPOINTS = "checkpoints"
"""The run folder's sub-folder holding the ``step_XXXXXXXX`` checkpoints."""
CHECKPOINT_CONFIG = "config.yaml"
"""The config a checkpoint was trained with, inside the checkpoint folder."""
ABANDONED_PREFIX = "abandoned-"
"""Folders ``checkpoints/abandoned-<UTC time>/`` keep the checkpoints of a branch a resume moved away from."""
TRAINER_STATE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
SCALER_FILE = "grad_scaler.json"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def step_folders(directory: str | Path) -> list[Path]:
    """Folders named ``step_XXXXXXXX`` under ``directory``, oldest first (complete or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def checkpoint_problem(path: str | Path, *, resumable: bool = False) -> str | None:
    """Why ``path`` is not a complete checkpoint (naming the bad file), or ``None`` when it is.

    Checked: ``trainer_state.json`` parses; every file listed in ``manifest.json`` has its recorded size; every
    safetensors file opens (its header and data length agree). ``resumable`` also requires the manifest (written by
    :meth:`CheckpointManager.save` only); without it a folder holding weights and a trainer state is complete enough
    to load the model from.
    """
    path = Path(path)
    try:
        json.loads((path / TRAINER_STATE).read_text())
    except FileNotFoundError:
        return f"{path / TRAINER_STATE} is missing"
    except (ValueError, OSError) as error:
        return f"{path / TRAINER_STATE} is unreadable ({error})"
    manifest_file = path / MANIFEST_FILE
    sizes: dict[str, int] = {}
    if manifest_file.is_file():
        try:
            sizes = json.loads(manifest_file.read_text())
        except (ValueError, OSError) as error:
            return f"{manifest_file} is unreadable ({error})"
    elif resumable:
        return f"{manifest_file} is missing (not a checkpoint written by the training loop)"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} is truncated or altered ({file.stat().st_size} bytes, {size} when written)"
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            return f"{file} is unreadable ({error})"
    return None


def latest_complete(directory: str | Path, *, warn: bool = True, resumable: bool = False) -> Path | None:
    """The newest complete checkpoint under ``directory``; newer damaged ones are skipped with a warning."""
    for path in reversed(step_folders(directory)):
        problem = checkpoint_problem(path, resumable=resumable)
        if problem is None:
            return path
        if warn:
            warnings.warn(f"skipping damaged checkpoint: {problem}", RuntimeWarning, stacklevel=2)
    return None


def _rng_state(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, position, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


def _plain(value: Any) -> Any:
    """JSON-ready copy of a scheduler / scaler state (tensors to numbers)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


class CheckpointManager:
    """Save and restore the full training state of ``model`` / ``optimizer`` / ``scheduler`` under ``directory``.

    ``model`` is the unwrapped module (no DDP or compile wrapper); ``scheduler`` any object with ``state_dict`` /
    ``load_state_dict`` holding numbers and lists (PyTorch's learning-rate schedulers); ``config_yaml`` the run's
    config, saved in every checkpoint as ``config.yaml``. Old checkpoints are pruned to ``keep_last`` only after a
    newer one is complete, so the checkpoint a run resumed from stays until its successor exists.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        directory: str | Path,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        keep_last: int = 2,
        config_yaml: str | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"training.keep_last must be >= 1, got {keep_last}")
        self.accelerator = accelerator
        self.directory = Path(directory)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.keep_last = keep_last
        self.config_yaml = config_yaml

    def checkpoints(self) -> list[Path]:
        """Checkpoint folders, oldest first (see :func:`checkpoint_problem` for whether one is intact)."""
        return step_folders(self.directory)

    def save(self, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write a checkpoint of the model, optimizer, scheduler, RNGs and ``trainer_state``; returns its folder."""
        accelerator = self.accelerator
        final = self.directory / f"step_{step:08d}"
        temporary = self.directory / f".tmp-step_{step:08d}"
        rank = accelerator.process_index
        if accelerator.is_main_process:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)  # left over by a run killed while saving
            temporary.mkdir()
        accelerator.wait_for_everyone()
        tensors, plain = _rng_state(accelerator.device)
        save_file(tensors, str(temporary / f"rng_{rank}.safetensors"))
        atomic_write_json(temporary / f"rng_{rank}.json", plain)
        if accelerator.is_main_process:
            state = {name: value.detach().contiguous().cpu() for name, value in self.model.state_dict().items()}
            save_file(state, str(temporary / MODEL_FILE))
            torch.save(self.optimizer.state_dict(), temporary / OPTIMIZER_FILE)
            if self.scheduler is not None:
                atomic_write_json(temporary / SCHEDULER_FILE, _plain(self.scheduler.state_dict()))
            if accelerator.scaler is not None:
                atomic_write_json(temporary / SCALER_FILE, _plain(accelerator.scaler.state_dict()))
            if self.config_yaml is not None:
                atomic_write_text(temporary / CHECKPOINT_CONFIG, self.config_yaml)
            atomic_write_json(temporary / TRAINER_STATE, {"step": step, **trainer_state})
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            sizes = {p.name: p.stat().st_size for p in sorted(temporary.iterdir()) if not p.name.startswith(".")}
            atomic_write_json(temporary / MANIFEST_FILE, sizes)
            if final.exists():  # re-saving the same step after a resume
                shutil.rmtree(final)
            temporary.rename(final)
            for old in self.checkpoints()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def restore(self, checkpoint: str | Path | None = None) -> tuple[Path, dict[str, Any]] | None:
        """Restore ``checkpoint`` (a ``step_*`` folder) or, by default, the newest intact one.

        Returns ``(folder, trainer state)``, or ``None`` when there is no checkpoint. A damaged newest checkpoint
        is skipped with a warning naming the bad file; an explicitly named damaged one is an error.
        """
        if checkpoint is not None:
            path = Path(checkpoint)
            problem = checkpoint_problem(path, resumable=True)
            if problem is not None:
                raise CheckpointError(f"cannot resume from {path}: {problem}")
        else:
            path = latest_complete(self.directory, resumable=True)
            if path is None:
                if self.checkpoints():
                    problems = "; ".join(str(checkpoint_problem(p, resumable=True)) for p in self.checkpoints())
                    raise CheckpointError(
                        f"no intact checkpoint under {self.directory} ({problems}); remove the damaged folders or "
                        "start a new run in another training.output_dir"
                    )
                return None
        self._load(path)
        return path, json.loads((path / TRAINER_STATE).read_text())

    def _load(self, path: Path) -> None:
        accelerator = self.accelerator
        device = accelerator.device
        try:
            self.model.load_state_dict(load_file(str(path / MODEL_FILE), device="cpu"))
        except RuntimeError as error:  # missing, unexpected or differently shaped weights
            lines = str(error).splitlines()
            first = (lines[1] if len(lines) > 1 else lines[0] if lines else "").strip()
            first = first if len(first) <= 200 else first[:200] + "..."
            raise CheckpointError(
                f"cannot resume from {path}: its {MODEL_FILE} does not fit this model ({first}); resume from a "
                "checkpoint of the same recipe and model settings"
            ) from error
        optimizer_file = path / OPTIMIZER_FILE
        try:
            optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 (the unpickler's errors have no common base class)
            raise CheckpointError(
                f"refusing to load {optimizer_file}: it is not a plain optimizer state ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); only tensors and numbers are read from a "
                "checkpoint, never code"
            ) from error
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, RuntimeError) as error:
            raise CheckpointError(
                f"cannot resume from {path}: its {OPTIMIZER_FILE} does not fit this model's optimizer ({error}); "
                "resume from a checkpoint of the same recipe and model settings"
            ) from error
        if self.scheduler is not None and (path / SCHEDULER_FILE).is_file():
            self.scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
        if accelerator.scaler is not None and (path / SCALER_FILE).is_file():
            accelerator.scaler.load_state_dict(json.loads((path / SCALER_FILE).read_text()))
        rank = accelerator.process_index
        rng_tensors, rng_plain = path / f"rng_{rank}.safetensors", path / f"rng_{rank}.json"
        if rng_tensors.is_file() and rng_plain.is_file():
            _set_rng_state(load_file(str(rng_tensors)), json.loads(rng_plain.read_text()), device)
        else:
            warnings.warn(
                f"{path} has no RNG state for rank {rank} (saved with fewer processes): random numbers after the "
                "resume differ from an uninterrupted run",
                RuntimeWarning,
                stacklevel=2,
            )


def step_number(path: str | Path) -> int | None:
    """The step of a ``step_XXXXXXXX`` folder name, ``None`` for any other name."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def set_aside_newer(directory: str | Path, resumed: str | Path, run_files: Sequence[Path] = ()) -> Path | None:
    """Move the checkpoints under ``directory`` that a resume from ``resumed`` abandons into
    ``directory/abandoned-<UTC time>/``; returns that folder, or ``None`` when nothing was moved.

    Abandoned: every ``step_*`` folder of a later step than ``resumed`` (and one of the same step that is not
    ``resumed`` itself), damaged or not. Left in place they would be mistaken for the newest checkpoint of the
    resumed run (by a later resume or an export), and ``keep_last`` would prune the resumed run's own checkpoints
    first. ``run_files`` (the abandoned run's ``results.json`` / ``history.json``) move along when given. Call on the
    main process only.
    """
    directory, resumed = Path(directory), Path(resumed)
    resumed_step = step_number(resumed)
    if resumed_step is None:
        return None
    newer = [
        path
        for path in step_folders(directory)
        if step_number(path) > resumed_step
        or (step_number(path) == resumed_step and path.resolve() != resumed.resolve())
    ]
    if not newer:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = directory / f"{ABANDONED_PREFIX}{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = directory / f"{ABANDONED_PREFIX}{stamp}-{suffix}"
    target.mkdir()
    for path in [*newer, *(file for file in run_files if file.is_file())]:
        path.rename(target / path.name)
    return target
