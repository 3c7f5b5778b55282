"""Eq. 13 and softmax smoothing without the N x M matrix, behind one seam.

* :mod:`~simplexvq.scale.topk`: the streamed top-K per (group, vertex) column;
  :mod:`~simplexvq.scale.distributed`: the selection across ranks (global scope);
  :mod:`~simplexvq.scale.knn_loss`: eq. 13 on given log-probabilities at scale (``functional.knn_loss``'s
  ``scope`` / ``chunk_size`` / ``vertices``).
* :mod:`~simplexvq.scale.streamed`: the streamed softmax layer's contract (values and gradients of the dense path);
  :mod:`~simplexvq.scale.attention`: the same smoothing as ``scaled_dot_product_attention`` (output only).
* :mod:`~simplexvq.scale.backends`: its implementations: ``reference`` (portable, the yardstick), ``cpu`` (CPU
  speed tricks), ``triton`` (fused sync-free GPU kernels), one object per quantizer.
"""

from simplexvq.scale.attention import soft_quantize
from simplexvq.scale.backends import (
    BACKEND_CHOICES,
    CpuBackend,
    ReferenceBackend,
    StreamedBackend,
    TritonBackend,
    cpu_streamed_softmax_quantize,
    make_backend,
    reference_streamed_softmax_quantize,
    resolve_backend,
)
from simplexvq.scale.streamed import StreamedQuantization

streamed_softmax_quantize = cpu_streamed_softmax_quantize
"""The streamed softmax layer with the CPU backend's tricks (``knn_hint`` for the ceiling between steps)."""

__all__ = [
    "BACKEND_CHOICES",
    "CpuBackend",
    "ReferenceBackend",
    "StreamedBackend",
    "StreamedQuantization",
    "TritonBackend",
    "make_backend",
    "reference_streamed_softmax_quantize",
    "resolve_backend",
    "soft_quantize",
    "streamed_softmax_quantize",
]
