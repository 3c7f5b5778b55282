"""Which ops of a step would make a GPU wait for the host: a dispatch mode that runs on CPU tensors too.

Inside ``with SyncAudit() as audit:`` every dispatched operator is recorded in ``audit.ops`` (its overload name,
e.g. ``aten.mm.default``, or ``simplexvq.triton_softmax_rows_forward.default`` for a registered Triton kernel),
and those that force a device-to-host synchronisation on a GPU in ``audit.syncing``:
``_local_scalar_dense`` (``.item()``, ``.tolist()``, ``if tensor:``), ``equal``, ``is_nonzero``, ``nonzero``,
``masked_select``, ``unique*``, ``repeat_interleave`` without ``output_size``, and indexing or ``index_put`` with a
boolean mask (an output shape that depends on the data). Every other op is a kernel launch or a view, so
``len(audit.ops)`` is the launch count a CUDA graph would capture. The sync-free contract of the Triton backend
(:mod:`simplexvq.scale.backends`) is tested with it, and users can audit their own training step the same way.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["SYNCING_OPS", "SyncAudit"]

SYNCING_OPS: frozenset[str] = frozenset(
    {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique_consecutive"}
)
"""Operators (overload packets) that always read data back to the host; ``unique*`` are matched by prefix."""


class SyncAudit(TorchDispatchMode):
    """Records every operator dispatched inside it (``ops``) and those that would sync a GPU (``syncing``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncing: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        if syncs(func.overloadpacket.__name__, args, kwargs):
            self.syncing.append(str(func))
        return func(*args, **kwargs)


def syncs(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the operator ``name`` (an overload packet's name) called with ``args`` and ``kwargs`` syncs."""
    if name in SYNCING_OPS or name.startswith(("unique", "_unique")):
        return True
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    if name.startswith(("index", "_index_put_impl")):  # index.Tensor, index_put(_) with a boolean mask
        flat, _ = tree_flatten((args[1:], kwargs))
        return any(isinstance(x, torch.Tensor) and x.dtype == torch.bool for x in flat)
    return False
