"""The KNN regularizer (eq. 13) at scale, under its original module path: re-exports of :mod:`simplexvq.scale`
for users' code; nothing in the library imports this module.

:func:`knn_loss_scaled` is the at-scale form of the dense :func:`simplexvq.functional.knn_loss` (neighbours across
ranks, a streamed top-K, vertex subsets). The streamed top-K lives in :mod:`simplexvq.scale.topk`, the selection
across ranks (and how the value and the gradient are reconciled with DDP's averaging) in
:mod:`simplexvq.scale.distributed`.
"""

from simplexvq.scale.backends.candidates import score_candidates
from simplexvq.scale.checks import (
    SCOPES,
    KnnDistance,
    KnnScope,
    check_chunk_size,
    check_k,
    check_k_fits,
    check_vertices,
)
from simplexvq.scale.deviation import deviation, vertex_columns
from simplexvq.scale.distributed import (
    World,
    global_row_count,
    select_among_gathered,
    select_global,
    with_scaled_gradient,
    world_of,
)
from simplexvq.scale.knn_loss import knn_loss_scaled, selected_entries
from simplexvq.scale.topk import RunningTopK, default_chunk_size, empty_slots_last, streamed_topk

__all__ = [
    "SCOPES",
    "KnnDistance",
    "KnnScope",
    "RunningTopK",
    "World",
    "check_chunk_size",
    "check_k",
    "check_k_fits",
    "check_vertices",
    "default_chunk_size",
    "deviation",
    "empty_slots_last",
    "global_row_count",
    "knn_loss_scaled",
    "score_candidates",
    "select_among_gathered",
    "select_global",
    "selected_entries",
    "streamed_topk",
    "vertex_columns",
    "with_scaled_gradient",
    "world_of",
]
