"""Softmax-smoothed quantization without the N x M matrix, under its original module path: re-exports of
:mod:`simplexvq.scale` for users' code; nothing in the library imports this module.

* :func:`soft_quantize`: the smoothed output as ``scaled_dot_product_attention`` (:mod:`simplexvq.scale.attention`).
* :func:`streamed_softmax_quantize`: the streamed layer (smoothed output, KNN regularizer, hard codes, statistics
  in one chunked pass) with the CPU backend's tricks, :func:`simplexvq.scale.backends.cpu_streamed_softmax_quantize`.
  :class:`~simplexvq.ProductQuantizer` with ``memory_efficient=True`` picks its backend with
  ``QuantizerConfig.backend`` (:mod:`simplexvq.scale.backends`).
"""

from simplexvq.scale.attention import LogitsKind, soft_quantize
from simplexvq.scale.backends.cpu import cpu_streamed_softmax_quantize as streamed_softmax_quantize
from simplexvq.scale.streamed import StreamedQuantization, StreamedRequest

__all__ = ["LogitsKind", "StreamedQuantization", "StreamedRequest", "soft_quantize", "streamed_softmax_quantize"]
