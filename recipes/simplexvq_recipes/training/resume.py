"""Compare a resumed run's config with the one its checkpoints were trained with, before anything is touched.

A resume may change only settings that cannot make the checkpoint mean something else (how long to train, how
often to log or save, where the run folder is); any other difference is refused with the list of differing keys.
Applied changes are recorded in ``config_changes.json`` (step, key, old and new value) once the checkpoint has
loaded, and only then is ``config.yaml`` rewritten, so a failed resume leaves the run folder as it was.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from simplexvq_recipes.training.atomic import atomic_write_json
from simplexvq_recipes.training.config import flatten

CONFIG_FILE = "config.yaml"
CHANGES_FILE = "config_changes.json"


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved value, new value)`` for every flattened key whose value differs (missing keys: ``None``)."""
    old_flat, new_flat = flatten(saved), flatten(new)
    return {
        key: (old_flat.get(key), new_flat.get(key))
        for key in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(key) != new_flat.get(key)
    }


def check_resume_config(
    run_dir: str | Path, new: dict[str, Any], safe_keys: Sequence[str]
) -> dict[str, tuple[Any, Any]]:
    """The allowed changes of ``new`` against ``<run_dir>/config.yaml``; ``ValueError`` listing any other change.

    Returns an empty dict when the run folder has no saved config.
    """
    config_file = Path(run_dir) / CONFIG_FILE
    if not config_file.is_file():
        return {}
    saved = OmegaConf.to_container(OmegaConf.load(config_file))
    differences = config_differences(saved, new)
    refused = {key: change for key, change in differences.items() if key not in safe_keys}
    if refused:
        listed = "\n".join(f"  {key}: {old!r} (checkpoint) -> {value!r} (now)" for key, (old, value) in refused.items())
        raise ValueError(
            f"cannot resume {run_dir} with a different configuration; these settings differ from its {CONFIG_FILE}:"
            f"\n{listed}\nrevert them, or start a new run in another training.output_dir. A resume may change only: "
            f"{', '.join(safe_keys)}"
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
