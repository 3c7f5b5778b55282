"""The Triton backend: the fused, sync-free kernels of :mod:`simplexvq.scale.triton`, with a guarded first call.

The kernels come from :func:`load_triton_kernels` (a module exporting ``triton_streamed_softmax_quantize`` and
``triton_available``). If they cannot be imported, report that they cannot run here, or raise at their first call
(a kernel that does not compile on this GPU), the backend warns once, naming the cause, and from then on uses the
reference backend: a training run never fails for that. After one successful call, errors propagate. Argument
errors (``ValueError``, ``TypeError``) always propagate: the reference backend would reject the same call.
``chunk_size`` is not passed on: the kernels tile rows themselves.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from types import ModuleType

import torch.distributed as dist
from torch import Tensor

from simplexvq.scale.attention import LogitsKind
from simplexvq.scale.backends.base import StreamedBackend
from simplexvq.scale.backends.reference import ReferenceBackend
from simplexvq.scale.checks import KnnDistance, KnnScope
from simplexvq.scale.streamed import StreamedQuantization

__all__ = ["TritonBackend", "load_triton_kernels"]

_warned: set[str] = set()


def load_triton_kernels() -> ModuleType:
    """The module of the fused kernels (raises ``ImportError`` when it or the ``triton`` package is missing)."""
    return importlib.import_module("simplexvq.scale.triton")


class TritonBackend(StreamedBackend):
    """The fused kernels, falling back to :class:`ReferenceBackend` when they cannot run (see the module doc)."""

    name = "triton"
    sync_free = True

    def __init__(self, load: Callable[[], ModuleType] | None = None) -> None:
        self._load = load  # None: :func:`load_triton_kernels`, looked up at the first call
        self._kernels: ModuleType | None = None
        self._fallback: ReferenceBackend | None = None
        self._proven = False

    def __getstate__(self) -> dict:
        """Copies and pickles (``copy.deepcopy(model)``, ``torch.save(model)``) leave out the kernel module and the
        loader; the copy loads the kernels again at its first call."""
        return {**self.__dict__, "_kernels": None, "_load": None, "_proven": False}

    @property
    def fell_back(self) -> bool:
        """Whether this backend now runs the reference backend."""
        return self._fallback is not None

    def _fall_back(self, cause: str) -> None:
        message = (
            f"simplexvq: the Triton backend cannot run here ({cause}); using the reference backend instead (same "
            "values and gradients, slower)"
        )
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=4)
        self._fallback = ReferenceBackend()

    def _ready(self) -> None:
        if self._kernels is not None or self._fallback is not None:
            return
        try:
            kernels = (self._load or load_triton_kernels)()
        except ImportError as error:
            self._fall_back(f"the kernels cannot be imported: {error}")
            return
        available, reason = kernels.triton_available()
        if available:
            self._kernels = kernels
        else:
            self._fall_back(reason)

    def quantize(  # noqa: D102
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
        options = dict(
            distance=distance,
            knn_k=knn_k,
            knn_distance=knn_distance,
            compute_output=compute_output,
            scope=scope,
            vertices=vertices,
            group=group,
            valid=valid,
        )
        self._ready()
        if self._kernels is not None:
            try:
                result = self._kernels.triton_streamed_softmax_quantize(z, codebook, temperature, **options)
            except (ValueError, TypeError):
                raise
            except Exception as error:
                if self._proven:
                    raise
                self._kernels = None
                self._fall_back(f"the kernels failed at their first call: {type(error).__name__}: {error}")
            else:
                self._proven = True
                return result
        return self._fallback.quantize(z, codebook, temperature, chunk_size=chunk_size, **options)
