"""Precision of the Triton kernels by PyTorch's conventions, against float64 (Triton's interpreter on CPU tensors).

Every mode is held to a tolerance derived from a dense computation in the same precision: the error of the
kernels against float64 must stay within a small factor of the error of the dense path (the same formulas with
whole matrices) run in that precision on the same inputs. Modes:

* float32, ``torch.get_float32_matmul_precision() == "highest"``: IEEE products.
* float32, ``"high"`` / ``"medium"``: TF32 tensor-core products on a GPU. The interpreter multiplies in float32
  whatever ``input_precision`` says, so TF32 numerics cannot be tested here: the tests check the host-side choice
  (the ``input_precision`` every ``tl.dot`` of every kernel receives).
* float16: products of float16 operands, float32 accumulation and softmax statistics.
* bfloat16: the interpreter cannot read bfloat16 memory (a documented gap). With
  ``SIMPLEXVQ_TRITON_TEST_DEVICE=cuda`` these tests run compiled on a GPU, where bfloat16 and TF32 (against the
  dense path's cuBLAS TF32) are tested too.

The temperature gradient of Euclidean logits is held to the dense float32 error on held-out cases where summing
the query and bias terms apart used to cancel (issue 19).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from simplexvq import functional as VQF  # noqa: E402
from simplexvq.scale.triton import triton_streamed_softmax_quantize  # noqa: E402
from simplexvq.scale.triton.launch import dot_precision  # noqa: E402

DEVICE = "cuda" if os.environ.get("SIMPLEXVQ_TRITON_TEST_DEVICE") == "cuda" else "cpu"  # as test_triton_backend
if DEVICE == "cpu":
    pytestmark = pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton kernels run on CPU tensors only when interpreted"
    )
else:
    pytestmark = pytest.mark.skipif(
        not torch.cuda.is_available(), reason="SIMPLEXVQ_TRITON_TEST_DEVICE=cuda needs a GPU"
    )
ON_CPU = pytest.mark.skipif(DEVICE != "cpu", reason="checks the interpreter (CPU tensors)")
ON_GPU = pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter multiplies in float32 and cannot read bfloat16")


def _inputs(n, groups, entries, d, seed, tau_low=0.3, tau_high=1.3):
    """float64 inputs (z, codebook, temperature) whose values are exact in float16 (so every precision sees the
    same numbers)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, groups, d, generator=gen, dtype=torch.float64)
    codebook = torch.randn(groups, entries, d, generator=gen, dtype=torch.float64)
    temperature = tau_low + (tau_high - tau_low) * torch.rand(groups, generator=gen, dtype=torch.float64)
    return [x.half().double().to(DEVICE) for x in (z, codebook, temperature)]


def _dense(z, codebook, temperature, distance, k, knn_distance):
    """The dense path (whole logits matrix) in the inputs' dtype."""
    if distance == "cosine":
        logits = VQF.cosine_logits(z, codebook, temperature)
    else:
        logits = VQF.euclidean_logits(z, codebook, temperature)
    log_pi = torch.log_softmax(logits, dim=-1)
    out = torch.einsum("ngm,gmd->ngd", log_pi.exp(), codebook)
    return out, VQF.knn_loss(log_pi, k, knn_distance)


def _dense_centred(z, codebook, temperature, distance, k, knn_distance):
    """The dense path with Euclidean logits shifted by ``|z|^2 / tau`` per row (``(2 z . c - |c|^2) / tau``: the
    same softmax), whose temperature gradient loses less to rounding than the library's ``-|z - c|^2 / tau``."""
    if distance == "cosine":
        return _dense(z, codebook, temperature, distance, k, knn_distance)
    logits = (2.0 * torch.einsum("ngd,gmd->ngm", z, codebook) - codebook.pow(2).sum(-1)[None]) / temperature[:, None]
    log_pi = torch.log_softmax(logits, dim=-1)
    out = torch.einsum("ngm,gmd->ngd", log_pi.exp(), codebook)
    return out, VQF.knn_loss(log_pi, k, knn_distance)


def _fused(z, codebook, temperature, distance, k, knn_distance):
    result = triton_streamed_softmax_quantize(
        z, codebook, temperature, distance=distance, knn_k=k, knn_distance=knn_distance
    )
    return result.quantized, result.knn_loss


def _values_and_grads(fn, inputs64, dtype, distance, k, knn_distance, weight):
    """Output, loss and the gradients of ``sum(out * weight) + 2.5 loss`` to (z, codebook, temperature), computed
    by ``fn`` on the inputs cast to ``dtype``; everything returned in float64."""
    inputs = [x.to(dtype).requires_grad_(True) for x in inputs64]
    out, loss = fn(*inputs, distance, k, knn_distance)
    total = (out.double() * weight).sum() + 2.5 * loss.double()
    grads = torch.autograd.grad(total, inputs)
    return [x.detach().double() for x in (out, loss, *grads)]


def _relative_errors(got, exact):
    return [float((g - e).abs().max() / e.abs().max().clamp_min(1e-300)) for g, e in zip(got, exact, strict=True)]


NAMES = ("output", "loss", "z grad", "codebook grad", "temperature grad")


def _check_against_dense(dtype, distance, knn_distance, shape, k, seed, factor, tau=(0.3, 1.3)):
    inputs = _inputs(*shape, seed=seed, tau_low=tau[0], tau_high=tau[1])
    weight = torch.randn(shape[0], shape[1], shape[3], generator=torch.Generator().manual_seed(seed + 1))
    weight = weight.double().to(DEVICE)
    exact = _values_and_grads(_dense, inputs, torch.float64, distance, k, knn_distance, weight)
    fused = _values_and_grads(_fused, inputs, dtype, distance, k, knn_distance, weight)
    fused_errors = _relative_errors(fused, exact)
    dense_errors = [  # the more accurate of the two dense computations, per quantity
        min(errors)
        for errors in zip(
            *(
                _relative_errors(_values_and_grads(fn, inputs, dtype, distance, k, knn_distance, weight), exact)
                for fn in (_dense, _dense_centred)
            ),
            strict=True,
        )
    ]
    floor = 16 * torch.finfo(dtype).eps  # a dense error that happens to be tiny does not demand the impossible
    for name, got, reference in zip(NAMES, fused_errors, dense_errors, strict=True):
        assert got <= factor * max(reference, floor), (
            f"{name}: kernels {got:.2e} vs dense {dtype} {reference:.2e} (relative to float64)"
        )
    return fused_errors, dense_errors


@pytest.mark.parametrize(
    ("distance", "knn_distance", "shape", "k"),
    [
        ("cosine", "ce", (37, 2, 21, 5), 3),
        ("euclid", "l2", (29, 2, 18, 20), 4),  # D = 20: two 16-wide tiles of the padded width
    ],
)
def test_float32_ieee_is_as_accurate_as_dense_float32(distance, knn_distance, shape, k):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        _check_against_dense(torch.float32, distance, knn_distance, shape, k, seed=3, factor=4.0)
    finally:
        torch.set_float32_matmul_precision(previous)


HALF = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]  # bfloat16: see the module doc


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(("distance", "knn_distance"), [("cosine", "ce"), ("euclid", "l2")])
def test_half_precision_is_as_accurate_as_dense_half_precision(dtype, distance, knn_distance):
    """Float16 / bfloat16 operands, float32 accumulation and statistics: at least as accurate as the dense path
    in that dtype (which rounds the logits and the probabilities to it)."""
    _check_against_dense(dtype, distance, knn_distance, (33, 2, 19, 16), 3, seed=5, factor=2.0)


@ON_GPU
@pytest.mark.parametrize(("distance", "knn_distance"), [("cosine", "ce"), ("euclid", "l2")])
def test_tf32_is_as_accurate_as_dense_tf32(distance, knn_distance):
    """float32 inputs with ``torch.set_float32_matmul_precision("high")``: the kernels' TF32 products against the
    dense path's (cuBLAS TF32) under the same switch. Only on a GPU: the interpreter multiplies in float32."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        _check_against_dense(torch.float32, distance, knn_distance, (64, 2, 40, 32), 3, seed=9, factor=4.0)
    finally:
        torch.set_float32_matmul_precision(previous)


# Held-out cases of issue 19: Euclidean logits at low temperatures, where the query and bias parts of the
# temperature gradient are about 100x larger than their sum.
HELD_OUT = [
    ((300, 2, 100, 32), 7, "l2", (0.05, 0.55), 11),
    ((300, 2, 100, 32), 7, "ce", (0.05, 0.55), 12),
    ((160, 1, 48, 16), 5, "l2", (0.05, 0.2), 13),
]


@pytest.mark.parametrize(("shape", "k", "knn_distance", "tau", "seed"), HELD_OUT)
def test_temperature_gradient_of_euclidean_logits_does_not_cancel(shape, k, knn_distance, tau, seed):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        _check_against_dense(torch.float32, "euclid", knn_distance, shape, k, seed, factor=4.0, tau=tau)
    finally:
        torch.set_float32_matmul_precision(previous)


# --------------------------------------------------------------------------------------------------------------
# TF32: the host-side choice reaches every tl.dot (the interpreter computes float32 products whatever it is told)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "dtype", "expected"),
    [
        ("highest", torch.float32, "ieee"),
        ("high", torch.float32, "tf32"),
        ("medium", torch.float32, "tf32"),
        ("high", torch.float16, "ieee"),  # float16 operands: the switch does not apply
        ("high", torch.float64, "ieee"),  # float64: elementwise products, no tl.dot
    ],
)
def test_dot_precision_follows_torch_float32_matmul_precision(setting, dtype, expected):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        assert dot_precision(dtype) == expected
    finally:
        torch.set_float32_matmul_precision(previous)


def test_dot_precision_is_traced_by_torch_compile():
    """Read inside a compiled function (``fullgraph``: no graph break), it follows the switch (a recompile)."""

    def step(x):
        return x + (1.0 if dot_precision(torch.float32) == "tf32" else 0.0)

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert float(compiled(torch.zeros(()))) == 0.0
        torch.set_float32_matmul_precision("high")
        assert float(compiled(torch.zeros(()))) == 1.0
    finally:
        torch.set_float32_matmul_precision(previous)


@ON_CPU
@pytest.mark.parametrize(("setting", "expected"), [("highest", "IEEE"), ("high", "TF32")])
def test_every_kernel_product_gets_the_chosen_precision(monkeypatch, setting, expected):
    from triton.runtime import interpreter

    seen: list[str] = []
    original = interpreter.InterpreterBuilder.create_dot

    def recording(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.append(str(input_precision).upper())
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", recording)
    inputs = [x.float().requires_grad_(True) for x in _inputs(20, 2, 18, 8, seed=7)]
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        result = triton_streamed_softmax_quantize(*inputs, distance="euclid", knn_k=2)
        (result.quantized.square().sum() + result.knn_loss).backward()
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen, "no tl.dot ran"
    assert all(expected in precision for precision in seen), sorted(set(seen))


# --------------------------------------------------------------------------------------------------------------
# ProductQuantizer: autocast decides the dtype handed to the kernels (QuantizerConfig.streamed_precision)
# --------------------------------------------------------------------------------------------------------------


def _quantizer(**options):
    import simplexvq

    torch.manual_seed(0)
    config = simplexvq.QuantizerConfig(
        dim=16, codebook_size=20, groups=2, knn_k=3, memory_efficient=True, backend="triton", **options
    )
    return simplexvq.ProductQuantizer(config)


def _spy_on_layer(quantizer, monkeypatch) -> list[torch.dtype]:
    """Run one forward to make the backend, then record the dtype of every input its ``quantize`` receives."""
    seen: list[torch.dtype] = []
    quantizer(torch.randn(4, 16))
    backend = quantizer.streamed_backend
    original = backend.quantize

    def recording(request):
        seen.append((request.z.dtype, request.codebook.dtype, request.temperature.dtype))
        return original(request)

    monkeypatch.setattr(backend, "quantize", recording)
    return seen


@ON_CPU  # CPU autocast; on a GPU the same code path takes torch.autocast("cuda")
@pytest.mark.parametrize(
    ("precision", "autocast_dtype", "expected"),
    [
        ("auto", torch.float16, torch.float16),
        ("fp32", torch.float16, torch.float32),
        ("auto", None, torch.float32),
        ("auto", torch.bfloat16, torch.float32),  # bfloat16 CPU tensors: the interpreter cannot read them
    ],
)
def test_quantizer_runs_the_kernels_in_the_autocast_dtype(monkeypatch, precision, autocast_dtype, expected):
    quantizer = _quantizer(streamed_precision=precision)
    reference = _quantizer(streamed_precision="fp32")
    seen = _spy_on_layer(quantizer, monkeypatch)
    z = torch.randn(2, 15, 16, generator=torch.Generator().manual_seed(1))
    z_half = z.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        out = quantizer(z_half)
    assert seen == [(expected, expected, expected)]
    assert out.quantized.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in out.stats.values())
    (out.quantized.square().sum() + out.loss).backward()
    assert z_half.grad.dtype == torch.float32
    assert quantizer.codebook.weight.grad.dtype == torch.float32
    assert quantizer.logits.log_temperature.grad.dtype == torch.float32
    z_exact = z.clone().requires_grad_(True)
    exact = reference(z_exact)
    (exact.quantized.square().sum() + exact.loss).backward()
    tolerance = 1e-6 if expected == torch.float32 else 2e-2
    torch.testing.assert_close(out.quantized, exact.quantized, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(out.loss, exact.loss, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(z_half.grad, z_exact.grad, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(
        quantizer.codebook.weight.grad, reference.codebook.weight.grad, atol=tolerance, rtol=tolerance
    )


def test_streamed_precision_is_validated():
    import simplexvq

    with pytest.raises(ValueError, match=r"streamed_precision='bf16' is not one of auto, fp32"):
        simplexvq.QuantizerConfig(dim=8, codebook_size=4, streamed_precision="bf16")
