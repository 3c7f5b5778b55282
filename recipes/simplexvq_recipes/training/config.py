"""Recipe configuration: a dataclass, optionally a YAML file, then ``key=value`` overrides from the command line.

Built on OmegaConf's structured configs, so types are checked and a misspelt key is an error that names it. A
config class may list renamed keys in a ``RENAMED_KEYS`` class attribute (``{"old.key": "new.key"}``): using an
old name is an error naming the new one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
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
    """Defaults of ``config_class``, updated by the YAML file at ``path``, then by ``overrides`` (``a.b=1``).

    Every problem is a one-line ``ValueError`` (``FileNotFoundError`` for a missing file) naming its source: the
    file with the line and column of a YAML syntax error, or the ``key=value`` argument; nothing is written.
    """
    renamed = renamed_keys(config_class)
    merged = OmegaConf.structured(config_class)
    if path is not None:
        path = Path(path)
        loaded = read_yaml_mapping(path)
        check_renamed(list(flatten(OmegaConf.to_container(loaded))), renamed, str(path))
        merged = _merge(config_class, merged, loaded, str(path))
    for override in overrides:
        key, separator, _ = override.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"override {override!r} is not of the form key=value (e.g. training.steps=100)")
    check_renamed([override.split("=", 1)[0] for override in overrides], renamed, "command line")
    for override in overrides:
        try:
            parsed = OmegaConf.from_dotlist([override])
        except yaml.YAMLError as error:
            problem = _yaml_problem(error, position=False)
            raise ValueError(
                f"command line: the value of {override!r} is not valid YAML ({problem}); quote it (key='value') or "
                "write lists as key=[1,2]"
            ) from error
        except OmegaConfBaseException as error:
            raise ValueError(f"command line: {override!r}: {_one_line(error)}") from error
        merged = _merge(config_class, merged, parsed, f"command line ({override})")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        source = f" (from {path})" if path is not None else ""
        raise ValueError(f"invalid {config_class.__name__}{source}: {_one_line(error)}") from error


def read_yaml_mapping(path: Path) -> DictConfig:
    """The YAML mapping in ``path`` (OmegaConf's safe loader: plain data, no Python objects), or a one-line error
    naming the file (and the line and column of a syntax error)."""
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"config file {path} is not a file")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({_yaml_problem(error)}); fix the file") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a text file ({error.reason}); give a YAML file") from error
    except OmegaConfBaseException as error:
        raise ValueError(f"{path}: {_one_line(error)}") from error
    if not isinstance(loaded, DictConfig):
        kind = "a list" if isinstance(loaded, ListConfig) else "not a mapping"
        raise ValueError(
            f"{path}: the file is {kind}; a config file maps keys to values, e.g. 'training: {{steps: 10}}'"
        )
    return loaded


def _merge(config_class: type, merged: Any, update: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(merged, update)
    except OmegaConfBaseException as error:
        raise ValueError(f"invalid {config_class.__name__} setting from {source}: {_one_line(error)}") from error


def _one_line(error: OmegaConfBaseException) -> str:
    """OmegaConf's message without its multi-line context, with the key it concerns."""
    message = str(error).splitlines()[0].strip() if str(error) else type(error).__name__
    key = getattr(error, "full_key", None)
    return f"{message} (key {key})" if key and key not in message else message


def _yaml_problem(error: yaml.YAMLError, position: bool = True) -> str:
    """``<problem> at line L, column C`` of a YAML parse error (without the position: ``<problem>``), on one line."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if position and mark is not None else problem


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for logging and for saving next to checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(config))


def config_to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_keys(config: Any) -> list[str]:
    """``key = value`` lines of every setting of ``config`` (a config class: its defaults; an instance: its values)
    for ``--help``."""
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(config)))
    return [f"  {key} = {value if value is not None else 'null'}" for key, value in defaults.items()]


def recipe_parser(
    config_class: type, description: str | None = None, shown: Any = None, shown_source: str | None = None
) -> argparse.ArgumentParser:
    """A parser whose ``--help`` lists every key of ``config_class`` with its default (or with its value in
    ``shown``, a loaded config, labelled by ``shown_source``); add the recipe's options, then :func:`add_overrides`."""
    if shown is None:
        epilog = "settings (key = default; change any with key=value):\n" + "\n".join(config_keys(config_class))
    else:
        epilog = f"settings (key = value with {shown_source}; change any with key=value):\n" + "\n".join(
            config_keys(shown)
        )
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


HELP_FLAGS = ("-h", "--help")


def parse_recipe_args(
    config_class: type[T],
    argv: Sequence[str] | None = None,
    description: str | None = None,
    presets: Mapping[str, Path] | None = None,
) -> T:
    """``[--preset NAME | --config FILE] key=value ...`` -> a config instance. ``presets`` maps the names that
    ``--preset`` accepts to their packaged YAML files. ``--help`` after a preset or file lists that source's values."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    source_parser = argparse.ArgumentParser(add_help=False)
    _add_sources(source_parser, presets)
    known, _ = source_parser.parse_known_args([a for a in arguments if a not in HELP_FLAGS])
    path = presets[known.preset] if presets and getattr(known, "preset", None) else known.config
    shown, shown_source = None, None
    if path is not None and any(flag in arguments for flag in HELP_FLAGS):
        shown = load_config(config_class, path)
        shown_source = f"--preset {known.preset}" if getattr(known, "preset", None) else f"--config {path}"
    parser = recipe_parser(config_class, description, shown, shown_source)
    _add_sources(parser, presets)
    add_overrides(parser)
    args = parser.parse_args(arguments)
    return load_config(config_class, path, args.overrides)


def _add_sources(parser: argparse.ArgumentParser, presets: Mapping[str, Path] | None) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="YAML file with the settings to change from the defaults")
    if presets:
        source.add_argument("--preset", choices=sorted(presets), help="a packaged YAML preset")
