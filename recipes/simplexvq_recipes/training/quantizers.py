"""The recipes' quantizer spec: the core's :class:`simplexvq.QuantizerSpec` plus the recipes' multi-process default."""

from __future__ import annotations

from typing import Any

from simplexvq import QuantizerSpec, built_in_quantizers
from simplexvq.config import KNN_REGULARIZERS


def has_knn_regularizer(spec: QuantizerSpec, **adapter_fields: Any) -> bool:
    """Whether the spec's method is a built-in one with a KNN regularizer (eq. 13)."""
    if spec.method not in built_in_quantizers():
        return False
    return spec.config(**adapter_fields).regularizer in KNN_REGULARIZERS


def recipe_spec(spec: QuantizerSpec, num_processes: int, **adapter_fields: Any) -> QuantizerSpec:
    """``spec`` with the recipes' defaults: neighbours searched across ranks (``knn_scope='global'``) when several
    processes train a KNN-regularized quantizer and the spec leaves ``knn_scope`` unset, so that a rank with fewer
    rows than K (a short batch, or none) cannot stop the run. An explicit ``knn_scope`` is kept."""
    if num_processes > 1 and spec.knn_scope is None and has_knn_regularizer(spec, **adapter_fields):
        return spec.replace(knn_scope="global")
    return spec
