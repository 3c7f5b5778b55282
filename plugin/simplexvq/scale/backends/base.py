"""What a backend of the streamed softmax layer is: one object per quantizer, holding any state between calls."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch.distributed as dist
from torch import Tensor

from simplexvq.scale.attention import LogitsKind
from simplexvq.scale.checks import KnnDistance, KnnScope
from simplexvq.scale.streamed import StreamedQuantization

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
    def quantize(
        self,
        z: Tensor,
        codebook: Tensor,
        temperature: Tensor,
        *,
        distance: LogitsKind = "cosine",
        knn_k: int | None = None,
        knn_distance: KnnDistance = "ce",
        compute_output: bool = True,
        chunk_size: int | None = None,
        scope: KnnScope = "local",
        vertices: Tensor | None = None,
        group: dist.ProcessGroup | None = None,
        valid: Tensor | None = None,
    ) -> StreamedQuantization:
        """Quantize ``z`` (N, G, d) with ``codebook`` (G, M, d) and ``temperature`` (G,) (see the contract)."""
