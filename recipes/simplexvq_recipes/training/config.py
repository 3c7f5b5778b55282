"""Recipe configuration: a dataclass, optionally a YAML file, then ``key=value`` overrides from the command line.

Built on OmegaConf's structured configs, so types are checked and a misspelt key is an error that names it. A
config class may list renamed keys in a ``RENAMED_KEYS`` class attribute (``{"old.key": "new.key"}``): using an
old name is an error naming the new one.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def renamed_keys(config_class: type) -> dict[str, str]:
    """The ``RENAMED_KEYS`` of ``config_class`` (old key -> new key)."""
    return dict(getattr(config_class, "RENAMED_KEYS", {}))


def check_renamed(keys: Sequence[str], renamed: Mapping[str, str], source: str) -> None:
    """Raise ``ValueError`` naming the new key when a key (or a key under it) was renamed."""
    for key in keys:
        for old, new in renamed.items():
            if key == old or key.startswith(old + "."):
                rest = key[len(old) :]
                suggestion = new + (rest.lstrip(".") or "<option>") if new.endswith(".") else new + rest
                raise ValueError(f"{source}: {key} was renamed; use {suggestion}")


def load_config(config_class: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``config_class``, updated by the YAML file at ``path``, then by ``overrides`` (``a.b=1``)."""
    renamed = renamed_keys(config_class)
    try:
        merged = OmegaConf.structured(config_class)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist")
            loaded = OmegaConf.load(path)
            check_renamed(list(flatten(OmegaConf.to_container(loaded) or {})), renamed, str(path))
            merged = OmegaConf.merge(merged, loaded)
        for override in overrides:
            if "=" not in override:
                raise ValueError(f"override {override!r} is not of the form key=value (e.g. training.steps=100)")
        check_renamed([override.split("=", 1)[0] for override in overrides], renamed, "command line")
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        source = f" (from {path})" if path is not None else ""
        raise ValueError(f"invalid {config_class.__name__}{source}: {error}") from error


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for logging and for saving next to checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(config))


def config_to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_keys(config_class: type) -> list[str]:
    """``key = default`` lines of every setting of ``config_class`` (for ``--help``)."""
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(config_class)))
    return [f"  {key} = {value if value is not None else 'null'}" for key, value in defaults.items()]


def recipe_parser(config_class: type, description: str | None = None) -> argparse.ArgumentParser:
    """A parser whose ``--help`` lists every key of ``config_class`` with its default; add the recipe's options,
    then :func:`add_overrides`."""
    epilog = "settings (key = default; change any with key=value):\n" + "\n".join(config_keys(config_class))
    renamed = renamed_keys(config_class)
    if renamed:
        lines = [f"  {old} -> {new}" for old, new in renamed.items()]
        epilog += "\n\nrenamed settings (old -> new):\n" + "\n".join(lines)
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser


def add_overrides(parser: argparse.ArgumentParser) -> None:
    """The ``key=value`` positional arguments (added after every option, so options may come first)."""
    parser.add_argument("overrides", nargs="*", help="key=value settings applied after the YAML file")


def parse_recipe_args(config_class: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """``--config file.yaml key=value ...`` -> a config instance."""
    parser = recipe_parser(config_class, description)
    parser.add_argument("--config", type=Path, help="YAML file with the settings to change from the defaults")
    add_overrides(parser)
    args = parser.parse_args(argv)
    return load_config(config_class, args.config, args.overrides)
