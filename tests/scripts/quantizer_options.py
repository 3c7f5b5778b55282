"""A valid non-default value of every core quantizer option, for the per-adapter tests that each one reaches the
built quantizer from a YAML file or the command line."""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import OmegaConf

OPTION_VALUES = {
    "codebook_size": "12",
    "groups": "2",
    "distance": "euclid",
    "knn_k": "3",
    "regularizer_weight": "0.5",
    "regularize_samples": "true",
    "commitment_weight": "0.3",
    "init_temperature": "0.7",
    "learnable_temperature": "false",
    "min_temperature": "0.002",
    "gumbel_temperature": "{start: 1.5, end: 0.4, decay: 0.99}",
    "inference": "soft",
    "codebook_init_std": "0.05",
    "knn_scope": "global",
    "memory_efficient": "true",
    "chunk_size": "7",
    "vertex_subsample": "5",
    "backend": "reference",
    "streamed_precision": "fp32",
}
"""A valid non-default value of every :data:`simplexvq.spec.OPTION_NAMES` option, as written on a command line
(a key the installed core does not have is simply not tested)."""


def option_value(option: str) -> Any:
    """The Python value of ``OPTION_VALUES[option]`` as OmegaConf parses it from ``key=value``."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={OPTION_VALUES[option]}"]))["v"]


def configured_value(config: Any, option: str) -> Any:
    """``config.<option>`` of a ``QuantizerConfig`` in the form of :func:`option_value` (dataclasses as dicts)."""
    value = getattr(config, option)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
