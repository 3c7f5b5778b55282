"""Decide what a run resumes from and compare its config with the one that checkpoint was trained with, before
anything is touched.

Every resume (re-running a command in its run folder, ``training.resume_from`` into the same or a new folder, a run
folder whose ``config.yaml`` is gone) compares the new config with the config the checkpoint itself carries
(``step_*/config.yaml``). Checkpoints written before checkpoints carried their config fall back to the
``config.yaml`` of the run folder they sit in; without either the resume is refused, since nothing says what the
weights were trained with.

A resume may change only settings that cannot make the checkpoint mean something else (how long to train, how
often to log or save, where the run folder and the data are, how fast a step runs); any other difference is
refused with the list of differing keys, and a checkpoint of another recipe is refused in one line. Applied changes
are recorded in ``config_changes.json`` (step, key, old and new value) once the checkpoint has loaded, and only
then is ``config.yaml`` rewritten, so a failed resume leaves the run folder as it was.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from simplexvq_recipes.training.atomic import atomic_write_json
from simplexvq_recipes.training.checkpoint import (
    CHECKPOINT_CONFIG,
    CHECKPOINTS,
    TRAINER_STATE,
    CheckpointError,
    checkpoint_problem,
    latest_complete,
    step_folders,
)
from simplexvq_recipes.training.config import flatten, read_yaml_mapping
from simplexvq_recipes.training.settings import TrainingConfig

CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.json"


def config_type(config: Any) -> str:
    """The recipe a config belongs to, as recorded in checkpoints: the name of its class (``PretrainConfig``,
    ``VisionRecipeConfig``; not its module, which is ``__main__`` when a script defines it)."""
    return type(config).__qualname__


def resume_point(run_dir: str | Path, settings: TrainingConfig) -> Path | None:
    """The checkpoint this run continues from (``None``: a fresh run), or a one-line error naming the fix.

    ``training.resume_from`` when set (it must be an intact ``step_*`` folder); otherwise the newest intact
    checkpoint under ``<run_dir>/checkpoints`` (damaged newer ones are skipped with a warning). A folder with
    checkpoints and ``training.resume=false`` is refused, so that no run overwrites another's.
    """
    checkpoints = Path(run_dir) / CHECKPOINTS
    existing = step_folders(checkpoints)
    if existing and not settings.resume:
        raise ValueError(
            f"{checkpoints} already holds checkpoints (up to {existing[-1].name}); set training.resume=true "
            "to continue that run, or choose a new training.output_dir"
        )
    if settings.resume_from:
        path = Path(settings.resume_from)
        if not path.is_dir():
            raise CheckpointError(f"training.resume_from={path} does not exist; give a checkpoints/step_* folder")
        problem = checkpoint_problem(path, resumable=True)
        if problem is not None:
            hint = (
                f"; training.resume_from names one checkpoint folder, e.g. {step_folders(path / CHECKPOINTS)[-1]}"
                if step_folders(path / CHECKPOINTS)
                else ""
            )
            raise CheckpointError(f"cannot resume from {path}: {problem}{hint}")
        return path
    if not existing or not settings.resume:
        return None
    path = latest_complete(checkpoints, resumable=True)
    if path is None:
        problems = "; ".join(str(checkpoint_problem(p, resumable=True)) for p in existing)
        raise CheckpointError(
            f"no intact checkpoint under {checkpoints} ({problems}); remove the damaged folders or start a new run "
            "in another training.output_dir"
        )
    return path


def trained_config(checkpoint: str | Path) -> tuple[dict[str, Any], Path]:
    """``(config, file it was read from)``: the config ``checkpoint`` was trained with.

    Its own ``config.yaml``; for a checkpoint written before checkpoints carried their config, the ``config.yaml``
    of the run folder it sits in (``<run>/checkpoints/step_*``). Read with a safe YAML loader (plain data only).
    """
    checkpoint = Path(checkpoint)
    candidates = [checkpoint / CHECKPOINT_CONFIG]
    if checkpoint.parent.name == CHECKPOINTS:
        candidates.append(checkpoint.parent.parent / CONFIG_FILE)
    for candidate in candidates:
        if candidate.is_file():
            try:
                loaded = read_yaml_mapping(candidate)
            except ValueError as error:
                raise CheckpointError(f"cannot resume from {checkpoint}: {error}") from error
            return OmegaConf.to_container(loaded), candidate
    run_config = candidates[-1]
    raise CheckpointError(
        f"cannot resume from {checkpoint}: it holds no {CHECKPOINT_CONFIG} (written by an older version) and "
        f"{run_config} is missing, so nothing says what it was trained with; put the run's config.yaml back into "
        f"{run_config.parent}, or start a new run"
    )


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, new value)`` for every flattened key whose value differs (missing keys: ``None``)."""
    old_flat, new_flat = flatten(saved), flatten(new)
    return {
        key: (old_flat.get(key), new_flat.get(key))
        for key in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(key) != new_flat.get(key)
    }


def _check_recipe(checkpoint: Path, saved: dict[str, Any], source: Path, new: dict[str, Any], recipe: str) -> None:
    """Refuse, in one line, a checkpoint written by another recipe (a vision run given to the speech recipe)."""
    try:
        written_by = json.loads((checkpoint / TRAINER_STATE).read_text()).get("recipe")
    except (OSError, ValueError):
        written_by = None
    if written_by is not None and written_by != recipe:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: it was written by another recipe (config {written_by}), not by this one "
            f"(config {recipe}); give training.resume_from a checkpoint of this recipe"
        )
    if written_by is None and set(saved) != set(new):
        raise CheckpointError(
            f"cannot resume from {checkpoint}: its config ({source}) has the sections {sorted(saved)}, this recipe "
            f"{sorted(new)}: it was written by another recipe; give training.resume_from a checkpoint of this recipe"
        )


def check_resume_config(
    checkpoint: str | Path, new: dict[str, Any], safe_keys: Sequence[str], recipe: str
) -> dict[str, tuple[Any, Any]]:
    """The allowed changes of ``new`` against the config ``checkpoint`` was trained with (:func:`trained_config`);
    ``ValueError`` listing any other change, :class:`CheckpointError` for another recipe's checkpoint."""
    checkpoint = Path(checkpoint)
    saved, source = trained_config(checkpoint)
    _check_recipe(checkpoint, saved, source, new, recipe)
    differences = config_differences(saved, new)
    refused = {key: change for key, change in differences.items() if key not in safe_keys}
    if refused:
        listed = "\n".join(f"  {key}: {old!r} (checkpoint) -> {value!r} (now)" for key, (old, value) in refused.items())
        raise ValueError(
            f"cannot resume from {checkpoint} with a different configuration; these settings differ from the one it "
            f"was trained with ({source}):\n{listed}\nrevert them, or start a new run in another "
            f"training.output_dir without training.resume_from. A resume may change only: {', '.join(safe_keys)}"
        )
    return differences


def record_changes(run_dir: str | Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append the applied ``changes`` at ``step`` to ``<run_dir>/config_changes.json``."""
    if not changes:
        return
    path = Path(run_dir) / CHANGES_FILE
    records = json.loads(path.read_text()) if path.is_file() else []
    records.append({"step": step, "changes": {key: {"old": old, "new": new} for key, (old, new) in changes.items()}})
    atomic_write_json(path, records)
