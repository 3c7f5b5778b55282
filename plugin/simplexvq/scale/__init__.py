"""Eq. 13 and softmax smoothing without the N x M matrix, behind one seam.

* :mod:`~simplexvq.scale.topk`: the streamed top-K per (group, vertex) column;
  :mod:`~simplexvq.scale.distributed`: the selection across ranks (global scope);
  :mod:`~simplexvq.scale.knn_loss`: eq. 13 on given log-probabilities at scale (the dense ``functional.knn_loss``
  with ``scope`` / ``chunk_size`` / ``vertices``); :mod:`~simplexvq.scale.checks`: the argument checks.
* :mod:`~simplexvq.scale.streamed`: the streamed softmax layer's contract (values and gradients of the dense path)
  and its one request type, :class:`StreamedRequest`;
  :mod:`~simplexvq.scale.attention`: the attention form of the smoothing (``scaled_dot_product_attention``, output
  only, and the factors the backends use).
* :mod:`~simplexvq.scale.backends`: its implementations: ``reference`` (portable, the yardstick), ``cpu`` (CPU
  speed tricks), ``triton`` (fused sync-free GPU kernels), one object per quantizer.
"""

from simplexvq.scale.attention import soft_quantize
from simplexvq.scale.backends import (
    BACKEND_CHOICES,
    BACKEND_NAMES,
    CpuBackend,
    ReferenceBackend,
    StreamedBackend,
    TritonBackend,
    cpu_streamed_softmax_quantize,
    make_backend,
    reference_streamed_softmax_quantize,
    resolve_backend,
)
from simplexvq.scale.knn_loss import knn_loss_scaled
from simplexvq.scale.streamed import StreamedQuantization, StreamedRequest

streamed_softmax_quantize = cpu_streamed_softmax_quantize
"""The streamed softmax layer with the CPU backend's tricks (``knn_hint`` for the ceiling between steps)."""

__all__ = [
    "BACKEND_CHOICES",
    "BACKEND_NAMES",
    "CpuBackend",
    "ReferenceBackend",
    "StreamedBackend",
    "StreamedQuantization",
    "StreamedRequest",
    "TritonBackend",
    "knn_loss_scaled",
    "make_backend",
    "reference_streamed_softmax_quantize",
    "resolve_backend",
    "soft_quantize",
    "streamed_softmax_quantize",
]
