"""Backends of the streamed softmax layer, chosen once per quantizer by ``QuantizerConfig.backend``.

* ``reference``: portable PyTorch, written to be read; the yardstick every other backend is tested against.
* ``cpu``: the CPU speed tricks (block maxima, a ceiling carried between steps); fastest on the CPU.
* ``triton``: fused, sync-free kernels for GPUs (falls back to ``reference`` with one warning when they cannot run).
* ``auto``: ``cpu`` on CPU tensors; ``triton`` on other devices when the ``triton`` package imports, else
  ``reference`` (which, unlike ``cpu``, reads no candidate counts back from the device).
"""

from __future__ import annotations

import importlib.util

import torch

from simplexvq.scale.backends.base import StreamedBackend
from simplexvq.scale.backends.cpu import CpuBackend, cpu_streamed_softmax_quantize
from simplexvq.scale.backends.names import BACKEND_NAMES, CONCRETE_BACKENDS, BackendName
from simplexvq.scale.backends.reference import ReferenceBackend, reference_streamed_softmax_quantize
from simplexvq.scale.backends.triton_backend import TritonBackend, load_triton_kernels

BACKEND_CHOICES = BACKEND_NAMES
"""The names of :mod:`.names`, under the name this package has exported them."""

__all__ = [
    "BACKEND_CHOICES",
    "BACKEND_NAMES",
    "CONCRETE_BACKENDS",
    "BackendName",
    "CpuBackend",
    "ReferenceBackend",
    "StreamedBackend",
    "TritonBackend",
    "cpu_streamed_softmax_quantize",
    "load_triton_kernels",
    "make_backend",
    "reference_streamed_softmax_quantize",
    "resolve_backend",
]


TRITON_INSTALLED: bool = importlib.util.find_spec("triton") is not None
"""Whether the ``triton`` package is installed (looked up once, at import, so that ``auto`` resolves without a
filesystem lookup inside a traced or compiled step)."""


def resolve_backend(choice: str, device: torch.device) -> str:
    """The backend ``choice`` names for tensors on ``device``: itself, or what ``"auto"`` picks there."""
    if choice not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_NAMES)}, got {choice!r}")
    if choice != "auto":
        return choice
    if device.type == "cpu":
        return "cpu"
    return "triton" if TRITON_INSTALLED else "reference"


_CLASSES: dict[str, type[StreamedBackend]] = {cls.name: cls for cls in (ReferenceBackend, CpuBackend, TritonBackend)}
assert tuple(sorted(_CLASSES)) == tuple(sorted(CONCRETE_BACKENDS)), "a backend name without its class"


def make_backend(name: str) -> StreamedBackend:
    """A fresh backend object, for one of :data:`CONCRETE_BACKENDS`."""
    if name not in _CLASSES:
        raise ValueError(f"make_backend: name must be one of {', '.join(CONCRETE_BACKENDS)}, got {name!r}")
    return _CLASSES[name]()
