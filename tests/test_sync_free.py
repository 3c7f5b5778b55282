"""One training step of the quantizer on the Triton backend's code path reads nothing back from the device and
issues a number of ops that does not depend on N.

:class:`simplexvq.scale.sync_audit.SyncAudit` records every op of forward + backward on CPU tensors and those that
would force a device-to-host sync on a GPU. The kernels are the real ones in Triton's interpreter when
``simplexvq.scale.triton`` is present and can run, and otherwise the fake of ``tests/fake_triton_kernels.py`` (fixed
shapes, the contract's signature), so that what is counted is the quantizer's own path around the kernels.
"""

from __future__ import annotations

import fake_triton_kernels  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import simplexvq  # noqa: E402
from simplexvq.scale.backends import triton_backend  # noqa: E402
from simplexvq.scale.sync_audit import SyncAudit  # noqa: E402

REAL_KERNELS = fake_triton_kernels.real_triton_kernels()
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


def _step(num_rows: int, regularizer: str, scale: dict, padded: bool) -> SyncAudit:
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
    with SyncAudit() as recorder:
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
    with SyncAudit() as recorder:
        quantizer(z, padding).loss.backward()
    assert {"aten._local_scalar_dense.default", "aten.nonzero.default"} <= set(recorder.syncing)
