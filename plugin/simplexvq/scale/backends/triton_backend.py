"""The Triton backend: the fused, sync-free kernels of :mod:`simplexvq.scale.triton`, with a guarded first call.

The kernels come from :func:`load_triton_kernels` (a module exporting ``triton_streamed_softmax_quantize``,
``triton_available`` and optionally ``quantize_request``, which takes the request as it is). If they cannot be
imported, report that they cannot run here, or raise at their first call (a kernel that does not compile on this
GPU), the backend warns once, naming the cause, and from then on uses the reference backend: a training run never
fails for that (``fell_back`` and ``fallback_reason`` say so). The first call of each kernel variant (device,
dtype, codebook shape, logits, regularizer, output on or off) is preceded by a probe: a forward and backward of
the same variant on a small fixed input, so that a backward kernel that does not compile is found before the
training step depends on it. After a variant's probe succeeded, its errors propagate. Argument errors
(``ValueError``, ``TypeError``) always propagate: the reference backend would reject the same call.
``chunk_size`` is not passed on: the kernels tile rows themselves.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from simplexvq.scale.backends.base import StreamedBackend
from simplexvq.scale.backends.reference import ReferenceBackend
from simplexvq.scale.streamed import StreamedQuantization, StreamedRequest

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
        self._proven: set[tuple] = set()
        self.fallback_reason: str | None = None
        """Why this backend runs the reference backend (``None`` while it runs the kernels)."""

    def __getstate__(self) -> dict:
        """Copies and pickles (``copy.deepcopy(model)``, ``torch.save(model)``) leave out the kernel module and the
        loader; the copy loads the kernels again at its first call."""
        return {**self.__dict__, "_kernels": None, "_load": None, "_proven": set()}

    @property
    def fell_back(self) -> bool:
        """Whether this backend now runs the reference backend."""
        return self._fallback is not None

    def _fall_back(self, cause: str) -> None:
        self.fallback_reason = cause
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

    def quantize(self, request: StreamedRequest) -> StreamedQuantization:  # noqa: D102
        self._ready()
        if self._kernels is not None:
            z, codebook = request.z, request.codebook
            variant = (
                z.device,
                z.dtype,
                tuple(codebook.shape),
                request.distance,
                request.knn_k,
                request.knn_distance,
                request.compute_output,
                torch.backends.cuda.matmul.allow_tf32,  # TF32 float32 products are their own compiled variant
            )
            try:
                if variant not in self._proven and not torch.compiler.is_compiling():
                    self._probe(request)
                result = self._run(request)
            except (ValueError, TypeError):
                raise
            except Exception as error:
                if variant in self._proven:
                    raise
                self._kernels = None
                self._fall_back(f"the kernels failed at their first call: {type(error).__name__}: {error}")
            else:
                self._proven.add(variant)
                return result
        return self._fallback.quantize(request)

    def _run(self, request: StreamedRequest) -> StreamedQuantization:
        quantize_request = getattr(self._kernels, "quantize_request", None)
        if quantize_request is not None:
            return quantize_request(request)
        return self._kernels.triton_streamed_softmax_quantize(*request.inputs, **request.options(chunk_size=False))

    def _probe(self, request: StreamedRequest) -> None:
        """Forward and backward of the call's kernel variant on a small deterministic input in this process alone
        (local scope, no vertex subset, every row valid; the global RNG is not touched)."""
        z, codebook, temperature = request.inputs
        groups, _, dim = codebook.shape
        rows = max(16, request.knn_k or 0)
        grid = torch.arange(rows * groups * dim, device=z.device, dtype=torch.float64)
        probe_z = torch.sin(grid * (math.pi / 7)).reshape(rows, groups, dim).to(z.dtype)
        inputs = [x.detach().clone().requires_grad_() for x in (probe_z, codebook, temperature)]
        with torch.inference_mode(False), torch.enable_grad():
            probe = request.replace(
                z=inputs[0],
                codebook=inputs[1],
                temperature=inputs[2],
                scope="local",
                group=None,
                vertices=None,
                valid=None,
            )
            result = self._run(probe)
            total = sum(x.float().sum() for x in (result.quantized, result.knn_loss) if x is not None)
            if isinstance(total, Tensor) and total.requires_grad:
                torch.autograd.grad(total, inputs, allow_unused=True)
