"""The Triton backend (simplexvq.scale.triton) against the dense path and the reference backend.

By default ``TRITON_INTERPRET=1`` is set before triton is imported, so the kernels run on CPU tensors in Triton's
interpreter. With ``SIMPLEXVQ_TRITON_TEST_DEVICE=cuda`` the same cases run compiled on a GPU (the prepared GPU
check in ``benchmarks/gpu`` does that). Sizes are small (the interpreter runs each program instance in NumPy) but
span several tiles of rows and keys with ragged tails.
"""

from __future__ import annotations

import os

DEVICE = "cuda" if os.environ.get("SIMPLEXVQ_TRITON_TEST_DEVICE") == "cuda" else "cpu"  # CPU: tests/conftest.py
# set TRITON_INTERPRET=1, so the kernels run on CPU tensors in Triton's interpreter

import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

pytest.importorskip("triton")

import simplexvq  # noqa: E402
from simplexvq import functional as VQF  # noqa: E402
from simplexvq.scale import streamed_softmax_quantize  # noqa: E402
from simplexvq.scale.knn_loss import knn_loss_scaled  # noqa: E402
from simplexvq.scale.sync_audit import SyncAudit  # noqa: E402
from simplexvq.scale.triton import triton_available, triton_streamed_softmax_quantize  # noqa: E402

if DEVICE == "cpu":
    pytestmark = pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels run on CPU tensors only when interpreted"
    )
else:
    pytestmark = pytest.mark.skipif(
        not torch.cuda.is_available(), reason="SIMPLEXVQ_TRITON_TEST_DEVICE=cuda needs a GPU"
    )
ON_CPU = pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter (CPU tensors)")

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "distributed" / "triton_global_worker.py"
DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(n: int, groups: int, entries: int, d: int, seed: int, dtype=DT) -> list[torch.Tensor]:
    gen = _gen(seed)
    z = torch.randn(n, groups, d, generator=gen, dtype=dtype)
    codebook = torch.randn(groups, entries, d, generator=gen, dtype=dtype)
    temperature = 0.3 + torch.rand(groups, generator=gen, dtype=dtype)
    return [x.to(DEVICE).requires_grad_(True) for x in (z, codebook, temperature)]


def _randn(shape, seed: int, dtype=DT) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=dtype).to(DEVICE)


def _dense(z, codebook, temperature, distance, k=None, knn_distance="ce", vertices=None):
    """The dense path: logits of functional, log_softmax, einsum output, functional.knn_loss."""
    if distance == "cosine":
        logits = VQF.cosine_logits(z, codebook, temperature)
    else:
        logits = VQF.euclidean_logits(z, codebook, temperature)
    log_pi = torch.log_softmax(logits, dim=-1)
    pi = log_pi.exp()
    loss = None if k is None else knn_loss_scaled(log_pi, k, knn_distance, vertices=vertices)
    return torch.einsum("ngm,gmd->ngd", pi, codebook), loss, pi


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, retain_graph=True, allow_unused=True))


def _assert_stats(result, pi):
    for name, value in simplexvq.stats.probability_stats(pi).items():
        torch.testing.assert_close(result.stats[name], value, msg=name)


@pytest.mark.parametrize(
    ("distance", "knn_distance", "shape", "k", "subset"),
    [
        ("cosine", "ce", (37, 2, 21, 5), 3, False),
        ("cosine", "l2", (37, 2, 21, 5), 3, True),
        ("euclid", "ce", (23, 3, 18, 3), 4, True),
        ("euclid", "l2", (23, 3, 18, 3), 4, False),
        ("cosine", "ce", (5, 1, 33, 17), 5, False),  # K = N, d above one 16-wide tile
    ],
)
def test_equals_dense_and_reference(distance, knn_distance, shape, k, subset):
    inputs = _inputs(*shape, seed=12)
    vertices = torch.tensor([[1, 3, 16], [0, 2, 17], [4, 5, 6]][: shape[1]], device=DEVICE) if subset else None
    out, loss, pi = _dense(*inputs, distance, k, knn_distance, vertices)
    kwargs = {"distance": distance, "knn_k": k, "knn_distance": knn_distance, "vertices": vertices}
    result = triton_streamed_softmax_quantize(*inputs, **kwargs)
    reference = streamed_softmax_quantize(*inputs, **kwargs)
    torch.testing.assert_close(result.quantized, out)
    torch.testing.assert_close(result.knn_loss, loss)
    torch.testing.assert_close(result.knn_loss, reference.knn_loss)
    assert torch.equal(result.indices, pi.argmax(dim=-1))
    assert result.knn_hint is None
    _assert_stats(result, pi)
    weight = _randn(out.shape, 13)
    expected = _grads((out * weight).sum() + 2.5 * loss, inputs)
    got = _grads((result.quantized * weight).sum() + 2.5 * result.knn_loss, inputs)
    for g_got, g_exp in zip(got, expected, strict=True):
        torch.testing.assert_close(g_got, g_exp)
    for g_got, g_exp in zip(_grads(result.knn_loss, inputs), _grads(loss, inputs), strict=True):  # KNN alone
        assert torch.count_nonzero(g_exp) > 0
        torch.testing.assert_close(g_got, g_exp)


def test_float32_and_output_only():
    inputs = _inputs(29, 2, 20, 6, seed=20, dtype=torch.float32)
    out, _, pi = _dense(*inputs, "cosine")
    result = triton_streamed_softmax_quantize(*inputs)
    assert result.knn_loss is None and result.quantized.dtype == torch.float32
    torch.testing.assert_close(result.quantized, out)
    assert torch.equal(result.indices, pi.argmax(dim=-1))
    _assert_stats(result, pi)
    weight = _randn(out.shape, 21, torch.float32)
    for g_got, g_exp in zip(
        _grads((result.quantized * weight).sum(), inputs), _grads((out * weight).sum(), inputs), strict=True
    ):
        torch.testing.assert_close(g_got, g_exp)


def test_without_output_only_the_loss():
    inputs = _inputs(18, 2, 17, 3, seed=22)
    _, loss, pi = _dense(*inputs, "euclid", 2, "l2")
    result = triton_streamed_softmax_quantize(
        *inputs, distance="euclid", knn_k=2, knn_distance="l2", compute_output=False
    )
    assert result.quantized is None
    torch.testing.assert_close(result.knn_loss, loss)
    _assert_stats(result, pi)
    for g_got, g_exp in zip(_grads(result.knn_loss, inputs), _grads(loss, inputs), strict=True):
        torch.testing.assert_close(g_got, g_exp)


@pytest.mark.parametrize("knn_distance", ["ce", "l2"])
def test_padding_rows_take_no_part(knn_distance):
    z, codebook, temperature = _inputs(26, 2, 19, 4, seed=30)
    valid = (torch.rand(26, generator=_gen(31)) > 0.3).to(DEVICE)
    with torch.no_grad():
        z[~valid] = float("nan")  # padding content must not leak anywhere
    result = triton_streamed_softmax_quantize(z, codebook, temperature, knn_k=3, knn_distance=knn_distance, valid=valid)
    kept = z.detach()[valid].requires_grad_(True)
    out, loss, pi = _dense(kept, codebook, temperature, "cosine", 3, knn_distance)
    torch.testing.assert_close(result.quantized[valid], out)
    assert torch.equal(result.quantized[~valid], torch.zeros_like(result.quantized[~valid]))
    assert torch.equal(result.indices[valid], pi.argmax(dim=-1))
    assert bool((result.indices[~valid] == -1).all())
    torch.testing.assert_close(result.knn_loss, loss)
    _assert_stats(result, pi)
    weight = _randn(result.quantized.shape, 32)
    got = _grads((result.quantized * weight).sum() + result.knn_loss, [z, codebook, temperature])
    expected = _grads((out * weight[valid]).sum() + loss, [kept, codebook, temperature])
    torch.testing.assert_close(got[0][valid], expected[0])
    assert torch.equal(got[0][~valid], torch.zeros_like(got[0][~valid]))
    for g_got, g_exp in zip(got[1:], expected[1:], strict=True):
        torch.testing.assert_close(g_got, g_exp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16])
def test_half_precision_accumulates_in_float32(dtype):
    low = [x.detach().to(dtype).requires_grad_(True) for x in _inputs(40, 2, 24, 8, seed=40, dtype=torch.float32)]
    inputs = [x.detach().float().requires_grad_(True) for x in low]  # the same values, computed in float32
    exact = triton_streamed_softmax_quantize(*inputs, knn_k=3)
    result = triton_streamed_softmax_quantize(*low, knn_k=3)
    assert result.quantized.dtype == dtype and result.knn_loss.dtype == dtype
    tolerance = 1e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(result.quantized.float(), exact.quantized, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(result.knn_loss.float(), exact.knn_loss, atol=tolerance, rtol=tolerance)
    assert float((result.indices == exact.indices).float().mean()) > 0.9  # near ties may flip at low precision
    grads = _grads(result.quantized.float().square().sum() + result.knn_loss.float(), low)
    expected = _grads(exact.quantized.square().sum() + exact.knn_loss, inputs)
    for g_got, g_exp in zip(grads, expected, strict=True):
        assert g_got.dtype == dtype
        assert float((g_got.float() - g_exp).abs().max()) < 2 * tolerance * float(g_exp.abs().max()) + 1e-3


@ON_CPU
def test_bfloat16_is_refused_in_the_interpreter():
    inputs = [x.detach().bfloat16() for x in _inputs(4, 1, 3, 2, seed=41)]
    with pytest.raises(ValueError, match=r"bfloat16.*interpreter"):
        triton_streamed_softmax_quantize(*inputs)


def test_gradcheck():
    inputs = _inputs(5, 2, 3, 2, seed=14)
    for knn_distance in ("ce", "l2"):

        def fn(z, q, t, knn_distance=knn_distance):
            result = triton_streamed_softmax_quantize(z, q, t, knn_k=2, knn_distance=knn_distance)
            return result.quantized, result.knn_loss

        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_bad_inputs_name_the_problem():
    z, codebook, temperature = _inputs(6, 2, 4, 3, seed=50)
    with pytest.raises(ValueError, match=r"k=7.*N=6"):
        triton_streamed_softmax_quantize(z, codebook, temperature, knn_k=7)
    valid = torch.tensor([True, False, True, False, False, False], device=DEVICE)
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(N,\)"):
        triton_streamed_softmax_quantize(z, codebook, temperature, valid=valid.long())
    with pytest.raises(ValueError, match=r"share one dtype"):
        triton_streamed_softmax_quantize(z, codebook.detach().float(), temperature)
    with pytest.raises(ValueError, match=r"must be on one device"):
        triton_streamed_softmax_quantize(z, codebook.detach().to("meta"), temperature)
    with pytest.raises(ValueError, match=r"distance must be 'cosine' or 'euclid'"):
        triton_streamed_softmax_quantize(z, codebook, temperature, distance="dot")
    with pytest.raises(ValueError, match=r"vertices must have shape \(S,\) or \(G=2, S\)"):
        triton_streamed_softmax_quantize(
            z, codebook, temperature, knn_k=2, vertices=torch.zeros(3, 1, dtype=torch.long)
        )


@ON_CPU  # on a GPU these are device-side assertions, which would end the CUDA context of the test session
def test_value_checks_run_on_the_device():
    z, codebook, temperature = _inputs(6, 2, 4, 3, seed=50)
    valid = torch.tensor([True, False, True, False, False, False])
    with pytest.raises(RuntimeError, match=r"k=3 neighbours.*fewer \(unpadded\) positions"):
        triton_streamed_softmax_quantize(z, codebook, temperature, knn_k=3, valid=valid)
    with pytest.raises(RuntimeError, match=r"vertices must lie in \[0, M=4\)"):
        triton_streamed_softmax_quantize(z, codebook, temperature, knn_k=2, vertices=torch.tensor([0, 4]))
    with pytest.raises(RuntimeError, match=r"vertices must not repeat"):
        triton_streamed_softmax_quantize(z, codebook, temperature, knn_k=2, vertices=torch.tensor([1, 1]))


@ON_CPU
def test_triton_available_names_the_reason(monkeypatch):
    assert triton_available("cpu") == (True, "")
    monkeypatch.delenv("TRITON_INTERPRET")
    ok, why = triton_available("cpu")
    assert not ok and "TRITON_INTERPRET=1" in why
    ok, why = triton_available("meta")
    assert not ok and "'meta'" in why


# --------------------------------------------------------------------------------------------------------------
# No host sync, a launch count independent of N
# --------------------------------------------------------------------------------------------------------------


def _step_ops(n: int, knn_distance: str) -> SyncAudit:
    z, codebook, temperature = _inputs(n, 2, 18, 4, seed=60)
    valid = torch.ones(n, dtype=torch.bool, device=DEVICE)
    valid[1] = False
    with SyncAudit() as log:
        result = triton_streamed_softmax_quantize(
            z,
            codebook,
            temperature,
            knn_k=2,
            knn_distance=knn_distance,
            valid=valid,
            vertices=torch.tensor([1, 5, 9], device=DEVICE),
        )
        (result.quantized.square().sum() + result.knn_loss).backward()
    return log


@pytest.mark.parametrize("knn_distance", ["ce", "l2"])
def test_training_step_has_no_sync_and_a_fixed_launch_count(knn_distance):
    small, large = _step_ops(9, knn_distance), _step_ops(40, knn_distance)
    assert small.syncing == [] and large.syncing == []
    assert small.ops == large.ops  # the same ops in the same order, whatever N
    launches = [op for op in small.ops if op.startswith("simplexvq.triton_")]
    assert len(launches) == 3  # row + column pass forward, one backward pass


@ON_CPU
@pytest.mark.parametrize("knn_distance", ["ce", "l2"])
def test_a_training_step_costs_eight_gemm_equivalents(monkeypatch, knn_distance):
    """Every multiply-add of every ``tl.dot`` the interpreter runs in a forward and backward, counted, in units of
    one (N x M x D) product over the padded tiles: 3 in the forward (logits and output; the column pass's
    logits), 5 in the backward (logits once, ``dO v^T``, ``p^T dO``, ``ds k``, ``ds^T q``)."""
    from triton.runtime import interpreter

    from simplexvq.scale.triton.launch import block_sizes

    multiply_adds: list[int] = []
    original = interpreter.InterpreterBuilder.create_dot

    def counting(self, a, b, d, *options):
        multiply_adds.append(a.data.shape[-2] * a.data.shape[-1] * b.data.shape[-1])
        return original(self, a, b, d, *options)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", counting)
    num_rows, groups, entries, dim = 40, 2, 37, 8
    inputs = _inputs(num_rows, groups, entries, dim, seed=61, dtype=torch.float32)
    result = triton_streamed_softmax_quantize(*inputs, distance="euclid", knn_k=3, knn_distance=knn_distance)
    forward = sum(multiply_adds)
    (result.quantized.square().sum() + result.knn_loss).backward()
    backward = sum(multiply_adds) - forward
    blocks = block_sizes(torch.device("cpu"), dim, dim, torch.float32)
    padded_rows = -(-num_rows // blocks.rows) * blocks.rows
    padded_entries = -(-entries // blocks.columns) * blocks.columns
    unit = padded_rows * padded_entries * blocks.dim * groups  # one GEMM-equivalent (value width = D here)
    assert (forward, backward) == (3 * unit, 5 * unit)


def test_the_sync_detector_sees_a_boolean_mask():
    with SyncAudit() as log:
        x = torch.randn(5)
        x[x > 0].sum()
        torch.nonzero(x)
    assert len(log.syncing) == 2


# --------------------------------------------------------------------------------------------------------------
# Global scope: two gloo ranks vs one process holding both shards
# --------------------------------------------------------------------------------------------------------------


def _load_worker():
    spec = importlib.util.spec_from_file_location("triton_global_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@ON_CPU
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed + gloo")
def test_global_scope_matches_single_process(tmp_path):
    worker = _load_worker()
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "plugin"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(WORKER), str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"torchrun failed\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    world_size = 2
    for name, case in worker.SCENARIOS.items():
        z, valid, codebook, temperature, sizes = worker.scenario_data(name)
        kept = z[valid].requires_grad_(True)
        codebook, temperature = codebook.requires_grad_(True), temperature.requires_grad_(True)
        vertices = case.get("vertices")
        out, loss, pi = _dense(
            kept,
            codebook,
            temperature,
            case["distance"],
            case["k"],
            case["knn_distance"],
            None if vertices is None else torch.tensor(vertices),
        )
        grad_kept, grad_codebook, grad_temperature = torch.autograd.grad(loss, [kept, codebook, temperature])
        grad_z = torch.zeros_like(z)
        grad_z[valid] = grad_kept
        quantized = torch.zeros_like(z)
        quantized[valid] = out.detach()
        indices = torch.full(valid.shape + (z.shape[1],), -1)
        indices[valid] = pi.argmax(dim=-1)
        for rank, report in enumerate(reports):
            got = report["scenarios"][name]
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
            torch.testing.assert_close(torch.tensor(got["loss"], dtype=DT), loss.detach(), msg=f"{name} loss")
            torch.testing.assert_close(torch.tensor(got["quantized"], dtype=DT), quantized[rows].reshape(-1))
            assert got["indices"] == indices[rows].reshape(-1).tolist()
            expected_z = world_size * grad_z[rows].reshape(-1)  # W times its rows' share; DDP averages over W
            torch.testing.assert_close(torch.tensor(got["z_grad"], dtype=DT), expected_z, msg=f"{name} z grad")
            torch.testing.assert_close(torch.tensor(got["grads"]["codebook"], dtype=DT), grad_codebook.reshape(-1))
            torch.testing.assert_close(torch.tensor(got["grads"]["temperature"], dtype=DT), grad_temperature)


# --------------------------------------------------------------------------------------------------------------
# Compiling for a GPU without one (the one-shot GPU check's dry run: tests/test_gpu_check.py)
# --------------------------------------------------------------------------------------------------------------


@ON_CPU
def test_kernels_compile_for_a_gpu_target():
    """Triton's GPU compiler (no GPU needed) accepts every kernel with the richest switches at the CUDA tiles."""
    pytest.importorskip("triton.backends.nvidia")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = REPO_ROOT / "benchmarks" / "gpu" / "compile_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, f"compile check failed\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-3000:]}"
    assert {r["kernel"] for r in records} == {
        "softmax_rows_kernel",
        "softmax_columns_kernel",
        "softmax_backward_kernel",
    }
    assert all(r["ok"] and r["shared"] > 0 for r in records), records
