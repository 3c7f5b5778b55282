"""Recipe configuration: a dataclass, optionally a YAML file, then ``key=value`` overrides from the command line.

Built on OmegaConf's structured configs, so types are checked and a misspelt key is an error that names it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def load_config(config_class: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``config_class``, updated by the YAML file at ``path``, then by ``overrides`` (``a.b=1``)."""
    try:
        merged = OmegaConf.structured(config_class)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        for override in overrides:
            if "=" not in override:
                raise ValueError(f"override {override!r} is not of the form key=value (e.g. training.steps=100)")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        source = f" (from {path})" if path is not None else ""
        raise ValueError(f"invalid {config_class.__name__}{source}: {error}") from error


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for logging and for saving next to checkpoints)."""
    return dataclasses.asdict(config)


def config_to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def parse_recipe_args(config_class: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """``--config file.yaml key=value ...`` -> a config instance."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file with the settings to change from the defaults")
    parser.add_argument("overrides", nargs="*", help="key=value settings applied after the YAML file")
    args = parser.parse_args(argv)
    return load_config(config_class, args.config, args.overrides)
