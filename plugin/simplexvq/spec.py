"""One quantizer section for every adapter: a registered method name plus its options.

:class:`QuantizerSpec` is what a recipe's YAML, fairseq2's ``config_overrides`` and the command line hold under
``quantizer:``. Its option fields are generated from :class:`~simplexvq.QuantizerConfig`, so a new core option is
settable from every adapter without any adapter changing; every option left ``None`` keeps the library's default
for the method. The method name picks ``QuantizerConfig.method`` and ``regularizer``; the adapter supplies what its
model fixes (``dim``, and for fairseq2 ``groups`` / ``codebook_size`` from its own fields) at build time::

    quantizer:
      method: softmax-knn_ce
      knn_k: 8
      memory_efficient: true

    spec = QuantizerSpec(method="softmax-knn_ce", knn_k=8)
    quantizer = spec.build(dim=256)

Third-party quantizers registered with :func:`simplexvq.register_quantizer` take their own keyword arguments in
``extra_options``. Validation and messages are the core's (:meth:`QuantizerConfig.validate`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Optional, Union, get_args, get_origin

from torch import nn

from simplexvq.config import GumbelTemperature, QuantizerConfig

# Fields the method name decides (``method``, ``regularizer``) or the adapter's model supplies (``dim``).
NAME_FIELDS: tuple[str, ...] = ("method", "regularizer")
ADAPTER_FIELDS: tuple[str, ...] = ("dim",)


def _plain_type(annotation: Any) -> Any:
    """A config-system-friendly version of a QuantizerConfig annotation: ``Literal[...]`` -> its value type, plus
    ``None`` (every spec option is optional). OmegaConf and fairseq2's structurer accept the result."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return _plain_type(members[0])
        return Any
    if origin is Literal:
        return type(get_args(annotation)[0])
    return annotation


def _option_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    hints = typing.get_type_hints(QuantizerConfig)
    fields = []
    for field in dataclasses.fields(QuantizerConfig):
        if field.name in NAME_FIELDS + ADAPTER_FIELDS:
            continue
        fields.append((field.name, Optional[_plain_type(hints[field.name])], dataclasses.field(default=None)))  # noqa: UP045 (OmegaConf needs typing.Optional)
    return fields


OPTION_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _option_fields())
"""Every option of a built-in quantizer a spec can set: the fields of :class:`QuantizerConfig` except
``method``, ``regularizer`` (chosen by the method name) and ``dim`` (given by the adapter)."""


class _SpecMethods:
    """Behaviour of :class:`QuantizerSpec` (its fields are generated from :class:`QuantizerConfig`)."""

    method: str
    extra_options: dict[str, Any]

    def __post_init__(self) -> None:
        if isinstance(getattr(self, "gumbel_temperature", None), dict):
            self.gumbel_temperature = GumbelTemperature(**self.gumbel_temperature)
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"quantizer.method must be a registered quantizer name, got {self.method!r}")

    # ------------------------------------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The options this spec sets (``None`` fields left out), ``extra_options`` included."""
        chosen = {name: getattr(self, name) for name in OPTION_NAMES if getattr(self, name) is not None}
        if isinstance(chosen.get("gumbel_temperature"), GumbelTemperature):
            chosen["gumbel_temperature"] = dataclasses.asdict(chosen["gumbel_temperature"])
        overlap = sorted(set(chosen) & set(self.extra_options))
        if overlap:
            raise ValueError(
                f"quantizer option(s) {', '.join(overlap)} set both as a field and in extra_options; keep one"
            )
        return {**chosen, **self.extra_options}

    def build_kwargs(self, **adapter_fields: Any) -> dict[str, Any]:
        """Keyword arguments of ``build_quantizer(self.method, ...)``: the spec's options plus what the adapter's
        model fixes (``dim``; fairseq2 also ``groups``, ``codebook_size``). An option the adapter fixes may not be
        set differently in the spec: the message names both."""
        options = self.options()
        for name, value in adapter_fields.items():
            if name in options and options[name] != value:
                raise ValueError(
                    f"quantizer.{name}={options[name]!r} conflicts with {name}={value!r} given by the model's own "
                    f"config; leave quantizer.{name} unset (null) and change it in the model's config"
                )
        return {**options, **adapter_fields}

    def config(self, **adapter_fields: Any) -> QuantizerConfig:
        """The :class:`QuantizerConfig` of a built-in method with this spec's options (core validation)."""
        from simplexvq.registry import quantizer_config  # registry imports the quantizer, which imports config

        return quantizer_config(self.method, **self.build_kwargs(**adapter_fields))

    def build(self, **adapter_fields: Any) -> nn.Module:
        """Build the quantizer: ``build_quantizer(self.method, **options, **adapter_fields)``."""
        from simplexvq.registry import build_quantizer

        return build_quantizer(self.method, **self.build_kwargs(**adapter_fields))

    def validate(self, **adapter_fields: Any) -> None:
        """Raise ``KeyError`` for an unknown method and ``ValueError`` for invalid options, with the core's
        messages. Without ``dim`` a stand-in (one feature per group) checks everything that does not depend on it."""
        from simplexvq.registry import available_quantizers, built_in_quantizers

        if self.method not in available_quantizers():
            close = difflib.get_close_matches(self.method, available_quantizers(), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise KeyError(
                f"unknown quantizer.method {self.method!r}.{hint} Known names: {', '.join(available_quantizers())}"
            )
        if self.method not in built_in_quantizers():
            return  # a third party's factory validates its own options when it is called
        if self.extra_options:
            unknown = sorted(self.extra_options)
            raise ValueError(
                f"quantizer.extra_options {unknown} are for third-party quantizers; {self.method!r} is built in and "
                f"takes only the spec's fields: {', '.join(OPTION_NAMES)}"
            )
        fields = dict(adapter_fields)
        if "dim" not in fields:
            fields["dim"] = fields.get("groups", self.groups or 1)
            if "codebook_size" not in fields and self.codebook_size is None:
                fields["codebook_size"] = max(self.vertex_subsample or 1, 1)
        self.config(**fields)

    def replace(self, **changes: Any) -> QuantizerSpec:
        """A copy with ``changes`` applied (method or any option)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The flat YAML form: ``{"method": ..., option: value, ...}`` with unset options left out."""
        flat: dict[str, Any] = {"method": self.method}
        flat.update({name: value for name, value in self.options().items() if name not in self.extra_options})
        if self.extra_options:
            flat["extra_options"] = dict(self.extra_options)
        return flat

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> QuantizerSpec:
        """Inverse of :meth:`to_dict`; a misspelt option is an error that suggests the closest name."""
        known = ("method", "extra_options", *OPTION_NAMES)
        for name in values:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown quantizer option {name!r}.{hint} Options: {', '.join(known)}")
        return cls(**values)


QuantizerSpec = dataclasses.make_dataclass(
    "QuantizerSpec",
    [
        ("method", str, dataclasses.field(default="softmax-knn_ce")),
        *_option_fields(),
        ("extra_options", dict[str, Any], dataclasses.field(default_factory=dict)),
    ],
    bases=(_SpecMethods,),
    kw_only=True,
)
QuantizerSpec.__module__ = __name__
QuantizerSpec.__doc__ = (
    "A quantizer by registered name plus its options: the one quantizer section that every adapter (the speech "
    "and vision recipes, the fairseq2 wav2vec2 family, the patch demo) embeds unchanged.\n\n"
    "``method`` is any :func:`simplexvq.available_quantizers` name (``softmax-knn_ce``, ``ste-euclid``, "
    "``simvq``, ...). Every other field is an option of :class:`~simplexvq.QuantizerConfig` of the same name and "
    "meaning, ``None`` = the library's default for the method; ``extra_options`` holds the keyword arguments of a "
    "third-party quantizer."
)
