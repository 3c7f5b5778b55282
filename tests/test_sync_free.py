"""One training step of the quantizer on the Triton backend's code path reads nothing back from the device and
issues a number of ops that does not depend on N.

A ``TorchDispatchMode`` records every aten op of forward + backward on CPU tensors. The ops that force a
device-to-host sync on a GPU are ``_local_scalar_dense`` (``.item()``, ``.tolist()``, ``if tensor:``), ``nonzero``,
``masked_select``, ``unique*``, ``repeat_interleave`` without ``output_size``, and indexing or ``index_put`` with a
boolean mask. The kernels are the real ones in Triton's interpreter when ``simplexvq.scale.triton`` is present and
can run, and otherwise the fake of ``tests/fake_triton_kernels.py`` (fixed shapes, the contract's signature), so
that what is counted is the quantizer's own path around the kernels.
"""

from __future__ import annotations

import importlib
import os

if os.environ.get("SIMPLEXVQ_TRITON_TEST_DEVICE") != "cuda":  # the kernels' own tests' switch to a GPU run
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported: kernels on CPU tensors

import fake_triton_kernels  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import simplexvq  # noqa: E402
from simplexvq.scale.backends import triton_backend  # noqa: E402

SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique")


class OpRecorder(TorchDispatchMode):
    """Every aten op dispatched, and those that would sync a GPU stream."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncing: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.removeprefix("aten::")
        self.ops.append(name)
        if name in SYNCING or name.startswith("unique") or self._dynamic(name, args, kwargs):
            self.syncing.append(name)
        return func(*args, **kwargs)

    @staticmethod
    def _dynamic(name: str, args, kwargs) -> bool:
        if name == "repeat_interleave" and kwargs.get("output_size") is None:
            return True
        if name.startswith(("index", "_index_put_impl")):  # index.Tensor, index_put(_), with a bool mask
            flat, _ = tree_flatten((args, kwargs))
            return any(isinstance(x, torch.Tensor) and x.dtype == torch.bool for x in flat[1:])
        return False


def _real_kernels():
    if os.environ.get("TRITON_INTERPRET") != "1":  # the test runs on CPU tensors
        return None
    try:
        module = importlib.import_module("simplexvq.scale.triton")
    except ImportError:
        return None
    return module if module.triton_available()[0] else None


REAL_KERNELS = _real_kernels()
# Every option with the fake kernels (fast); a few with the real ones, which the interpreter runs slowly.
CASES = [
    (kernels, regularizer, scale, padded)
    for kernels in ("fake", "real")
    for regularizer in ("knn_ce", "knn_l2", "none")
    for scale in ({}, {"vertex_subsample": 10})
    for padded in (False, True)
    if not (regularizer == "none" and scale)
    and (kernels == "fake" or (regularizer, bool(scale), padded) in {("knn_ce", True, True), ("knn_l2", False, False)})
]


def _step(num_rows: int, regularizer: str, scale: dict, padded: bool) -> OpRecorder:
    """One training step of a quantizer on the Triton backend, recorded after a first (unrecorded) call."""
    torch.manual_seed(0)
    quantizer = simplexvq.build_quantizer(
        f"softmax-{regularizer}",
        dim=16,
        groups=2,
        codebook_size=16,
        knn_k=3,
        memory_efficient=True,
        backend="triton",
        chunk_size=8,  # ignored by the Triton backend: its launches do not depend on the chunk size
        **scale,
    )
    z = torch.randn(2, num_rows // 2, 16, requires_grad=True)
    padding = torch.zeros(2, num_rows // 2, dtype=torch.bool)
    if padded:
        padding[1, -5:] = True
    quantizer(z, padding)  # first call: the kernels are loaded and proven outside the count
    with OpRecorder() as recorder:
        out = quantizer(z, padding if padded else None)
        (out.loss + out.quantized.square().mean()).backward()
        for value in out.stats.values():  # statistics are device tensors; reading them is the caller's choice
            assert value.shape == (2,)
    return recorder


@pytest.fixture(autouse=True)
def _fresh_fake():
    fake_triton_kernels.fail_with = None
    fake_triton_kernels.fail_backward_with = None
    fake_triton_kernels.available = (True, "")


@pytest.mark.parametrize(
    ("kernels", "regularizer", "scale", "padded"),
    CASES,
    ids=[f"{c[0]}-{c[1]}-{'subsampled' if c[2] else 'all'}-{'padded' if c[3] else 'unpadded'}" for c in CASES],
)
def test_training_step_has_no_syncing_op_and_launches_independent_of_n(
    monkeypatch, kernels, regularizer, scale, padded
):
    if kernels == "real" and REAL_KERNELS is None:
        pytest.skip("simplexvq.scale.triton cannot run here (no triton package, or no GPU and no interpreter)")
    module = fake_triton_kernels if kernels == "fake" else REAL_KERNELS
    monkeypatch.setattr(triton_backend, "load_triton_kernels", lambda: module)
    calls = fake_triton_kernels.calls
    small, large = _step(24, regularizer, scale, padded), _step(40, regularizer, scale, padded)
    assert (fake_triton_kernels.calls > calls) == (kernels == "fake")  # the kernels under test ran
    assert small.syncing == [], f"ops that sync a GPU: {small.syncing}"
    assert large.syncing == []
    assert len(small.ops) == len(large.ops), "the number of ops (kernel launches) grows with N"
    assert small.ops == large.ops


def test_the_recorder_sees_the_syncs_of_the_cpu_backend():
    """The counter is not blind: the CPU backend's path (compaction, host-read checks, candidate extraction) syncs."""
    torch.manual_seed(0)
    quantizer = simplexvq.build_quantizer(
        "softmax-knn_ce", dim=16, groups=2, codebook_size=24, knn_k=3, memory_efficient=True, backend="cpu"
    )
    z = torch.randn(2, 20, 16, requires_grad=True)
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, -5:] = True
    with OpRecorder() as recorder:
        quantizer(z, padding).loss.backward()
    assert "_local_scalar_dense" in recorder.syncing and "nonzero" in recorder.syncing
