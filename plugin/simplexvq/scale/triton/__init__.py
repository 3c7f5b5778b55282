"""The GPU backend's fused, sync-free Triton kernels (:mod:`.public` documents them).

On CPU tensors the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is imported):
slow, for tests. Triton itself is imported only when the kernels are first used, so :func:`triton_available`
answers also where it is not installed.
"""

from simplexvq.scale.triton.public import quantize_request, triton_available, triton_streamed_softmax_quantize

__all__ = ["quantize_request", "triton_available", "triton_streamed_softmax_quantize"]
