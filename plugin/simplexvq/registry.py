"""Quantizers by name: built-in method presets and third-party registrations.

A registry entry is a factory ``(**kwargs) -> nn.Module`` whose forward returns a
:class:`~simplexvq.QuantizerOutput`. Built-in names are ``<smoothing>-<regularizer>`` for the smoothing methods
(``softmax-knn_ce``, ``hard_gumbel-perplexity``, ``soft_gumbel-none``, ...), ``<estimator>-<distance>`` for the
hard ones (``ste-euclid``, ``rotation-cosine``, ...) and ``simvq``. :func:`paper_methods` lists the rows of the
paper's tables by these names; :func:`quantizer_traits` says what a name stands for (KNN regularizer, Gumbel
sampling, ...) so that adapters need not parse it.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

from simplexvq.config import DISTANCES, KNN_REGULARIZERS, REGULARIZERS, SMOOTHING_METHODS, QuantizerConfig
from simplexvq.quantizer import ProductQuantizer
from simplexvq.spec import QuantizerSpec

QuantizerFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=QuantizerFactory)

_REGISTRY: dict[str, QuantizerFactory] = {}
_PRESETS: dict[str, dict[str, Any]] = {}


def register_quantizer(name: str, *, overwrite: bool = False) -> Callable[[F], F]:
    """Decorator registering ``factory(**kwargs) -> nn.Module`` under ``name``.

    >>> @register_quantizer("my-vq")
    ... def build_my_vq(*, dim, codebook_size, groups=1, **kwargs): ...
    """

    def decorate(factory: F) -> F:
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"a quantizer named {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_quantizers() -> list[str]:
    """Every registered name, sorted."""
    return sorted(_REGISTRY)


def built_in_quantizers() -> list[str]:
    """The names of the built-in presets (one :class:`QuantizerConfig` each), sorted."""
    return sorted(_PRESETS)


def quantizer_config(name: str, **overrides: Any) -> QuantizerConfig:
    """The :class:`QuantizerConfig` of a built-in method name, with ``overrides`` (``dim`` etc.) applied."""
    if name not in _PRESETS:
        raise _unknown(name, known=sorted(_PRESETS), what="built-in quantizer preset")
    return QuantizerConfig(**{**_PRESETS[name], **overrides})


def build_quantizer(spec: str | QuantizerConfig | QuantizerSpec, **overrides: Any) -> nn.Module:
    """Build a quantizer from a registered name, a :class:`QuantizerSpec` or a :class:`QuantizerConfig`
    (``overrides`` replace fields; defaults the config derived from its method are derived again, see
    :meth:`QuantizerConfig.replace`)."""
    if isinstance(spec, QuantizerSpec):
        return spec.build(**overrides)
    if isinstance(spec, QuantizerConfig):
        return ProductQuantizer(spec.replace(**overrides) if overrides else spec)
    if not isinstance(spec, str):
        raise TypeError(
            f"build_quantizer expects a method name, a QuantizerSpec or a QuantizerConfig, got {type(spec).__name__}"
        )
    if spec not in _REGISTRY:
        raise _unknown(spec, known=available_quantizers(), what="quantizer")
    return _REGISTRY[spec](**overrides)


PAPER_METHODS: tuple[str, ...] = (
    "ste-euclid",
    "ste-cosine",
    "rotation-euclid",
    "rotation-cosine",
    *(
        f"{smoothing}-{regularizer}"
        for smoothing in ("hard_gumbel", "soft_gumbel", "softmax")
        for regularizer in ("perplexity", "knn_l2", "knn_ce")
    ),
)
"""The 13 rows of the paper's Tables 1 (image autoencoding) and 2 (wav2vec 2.0), in its order: STE and the rotation
trick (RE) with Euclidean and cosine distance, then hard Gumbel, soft Gumbel and softmax smoothing, each with the
perplexity (PPL), KNN-L2 and KNN-CE regularizers."""

PaperTable = Literal["table1", "table2"]


def paper_methods(table: PaperTable = "table1", *, include_simvq: bool = False) -> tuple[str, ...]:
    """The registered names of the rows of the paper's ``table`` (``table1`` and ``table2`` share the same 13
    rows), optionally followed by ``simvq`` (a baseline from Zhu et al. 2024, not in the paper's tables)."""
    if table not in ("table1", "table2"):
        raise ValueError(f"paper_methods: table must be 'table1' or 'table2', got {table!r}")
    return PAPER_METHODS + (("simvq",) if include_simvq else ())


@dataclass(frozen=True)
class QuantizerTraits:
    """What a registered name stands for. Third-party quantizers are ``built_in=False`` and every trait False."""

    built_in: bool
    smoothing: bool
    """A smoothing method (softmax, soft/hard Gumbel): assignment probabilities, a learnable logit temperature."""
    gumbel: bool
    """Samples Gumbel noise: its temperature follows ``set_num_updates`` (``QuantizerConfig.gumbel_temperature``)."""
    knn: bool
    """Regularized by eq. 13 (``knn_ce`` / ``knn_l2``): ``knn_k``, ``knn_scope`` and ``vertex_subsample`` apply."""
    regularizer: str | None
    """``QuantizerConfig.regularizer`` of a built-in name (``none`` for hard methods); ``None`` for third parties."""


def quantizer_traits(name: str) -> QuantizerTraits:
    """The traits of a registered quantizer name; ``KeyError`` (with suggestions) for an unknown one."""
    if name not in _REGISTRY:
        raise _unknown(name, known=available_quantizers(), what="quantizer")
    if name not in _PRESETS:
        return QuantizerTraits(built_in=False, smoothing=False, gumbel=False, knn=False, regularizer=None)
    preset = _PRESETS[name]
    return QuantizerTraits(
        built_in=True,
        smoothing=preset["method"] in SMOOTHING_METHODS,
        gumbel=preset["method"] in ("soft_gumbel", "hard_gumbel"),
        knn=preset["regularizer"] in KNN_REGULARIZERS,
        regularizer=preset["regularizer"],
    )


def _unknown(name: str, *, known: list[str], what: str) -> KeyError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(f"unknown {what} {name!r}.{hint} Known names: {', '.join(known)}")


def _register_preset(name: str, **preset: Any) -> None:
    _PRESETS[name] = preset

    def factory(**overrides: Any) -> ProductQuantizer:
        return ProductQuantizer(quantizer_config(name, **overrides))

    factory.__name__ = f"build_{name.replace('-', '_')}"
    factory.__doc__ = f"Build the built-in {name!r} quantizer: ``QuantizerConfig({preset})`` plus overrides."
    register_quantizer(name)(factory)


for _method in SMOOTHING_METHODS:
    for _regularizer in REGULARIZERS:
        _register_preset(f"{_method}-{_regularizer}", method=_method, regularizer=_regularizer)
for _method in ("ste", "rotation"):
    for _distance in DISTANCES:
        _register_preset(f"{_method}-{_distance}", method=_method, regularizer="none", distance=_distance)
_register_preset("simvq", method="simvq", regularizer="none")
