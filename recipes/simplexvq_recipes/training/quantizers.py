"""The recipes' quantizer spec: the core's :class:`simplexvq.QuantizerSpec` plus the recipes' multi-process default."""

from __future__ import annotations

from simplexvq import QuantizerSpec, built_in_quantizers, quantizer_traits


def recipe_spec(spec: QuantizerSpec, num_processes: int) -> QuantizerSpec:
    """``spec`` with the recipes' defaults: neighbours searched across ranks (``knn_scope='global'``) when several
    processes train a KNN-regularized quantizer and the spec leaves ``knn_scope`` unset, so that a rank with fewer
    rows than K (a short batch, or none) cannot stop the run. An explicit ``knn_scope`` is kept."""
    knn = spec.method in built_in_quantizers() and quantizer_traits(spec.method).knn
    if num_processes > 1 and spec.knn_scope is None and knn:
        return spec.replace(knn_scope="global")
    return spec
