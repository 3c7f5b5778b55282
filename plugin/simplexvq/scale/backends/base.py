"""What a backend of the streamed softmax layer is: one object per quantizer, holding any state between calls."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from simplexvq.scale.streamed import StreamedQuantization, StreamedRequest

__all__ = ["StreamedBackend"]


class StreamedBackend(ABC):
    """An implementation of the contract of :mod:`simplexvq.scale.streamed`.

    ``sync_free``: a call reads nothing back from the device and issues a number of kernel launches that does not
    depend on N, so the quantizer keeps padded rows in place (``valid`` as a mask) and skips the input checks that
    read a flag back. Other backends may read values back; they receive ``valid`` too and compact rows themselves.
    """

    name: ClassVar[str]
    sync_free: ClassVar[bool] = False

    @abstractmethod
    def quantize(self, request: StreamedRequest) -> StreamedQuantization:
        """Quantize the request's ``z`` (N, G, d) with its ``codebook`` (G, M, d) and ``temperature`` (G,)."""
