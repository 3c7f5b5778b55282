"""The names of the streamed layer's backends, declared once: ``QuantizerConfig.backend`` is checked against them,
``auto`` resolves to one of the others (:func:`simplexvq.scale.backends.resolve_backend`) and the docs list them."""

from __future__ import annotations

from typing import Literal, get_args

BackendName = Literal["auto", "reference", "cpu", "triton"]

BACKEND_NAMES: tuple[str, ...] = get_args(BackendName)
"""Every name ``QuantizerConfig.backend`` accepts, ``"auto"`` first."""

CONCRETE_BACKENDS: tuple[str, ...] = BACKEND_NAMES[1:]
"""The backends ``"auto"`` chooses among, each made by :func:`simplexvq.scale.backends.make_backend`."""

__all__ = ["BACKEND_NAMES", "CONCRETE_BACKENDS", "BackendName"]
