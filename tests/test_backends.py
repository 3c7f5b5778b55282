"""Every backend of the streamed softmax layer against the dense path, on values and gradients, and against each
other; backend choice and the Triton backend's fallback.

The dense path is written here from :mod:`simplexvq.functional`: logits, ``log_softmax``, ``einsum(pi, Q)``,
eq. 13 by ``knn_loss`` on the unpadded rows and the statistics of ``pi``. The Triton backend runs the real kernels
in Triton's interpreter when ``simplexvq.scale.triton`` is present and can run, and a fake with the contract's
shapes (``tests/fake_triton_kernels.py``) otherwise, which still exercises the backend object and its fallback.
"""

from __future__ import annotations

import dataclasses
import typing
import warnings

import fake_triton_kernels  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import simplexvq  # noqa: E402
from simplexvq import functional as VQF  # noqa: E402
from simplexvq.scale import backends  # noqa: E402
from simplexvq.scale.backends import triton_backend  # noqa: E402
from simplexvq.scale.knn_loss import knn_loss_scaled  # noqa: E402
from simplexvq.scale.streamed import StreamedRequest  # noqa: E402
from simplexvq.stats import probability_stats  # noqa: E402

N, G, M, D, K = 37, 2, 11, 4, 3
CHUNK = 8


REAL_KERNELS = fake_triton_kernels.real_triton_kernels()


@pytest.fixture(autouse=True)
def _fresh_fake():
    fake_triton_kernels.calls = 0
    fake_triton_kernels.fail_with = None
    fake_triton_kernels.fail_backward_with = None
    fake_triton_kernels.available = (True, "")
    triton_backend._warned.clear()
    yield


def _backend(name: str, kernels: str = "fake") -> backends.StreamedBackend:
    if name != "triton":
        return backends.make_backend(name)
    if kernels == "fake":
        return backends.TritonBackend(load=lambda: fake_triton_kernels)
    if REAL_KERNELS is None:
        pytest.skip("simplexvq.scale.triton cannot run here (no triton package, or no GPU and no interpreter)")
    return backends.TritonBackend(load=lambda: REAL_KERNELS)


BACKEND_CASES = [("reference", ""), ("cpu", ""), ("triton", "fake")]
# The real kernels run in Triton's interpreter (seconds per case): a few cases covering every option once; the
# kernels' own tests (tests/test_triton_backend.py) cover them in depth.
REAL_KERNEL_CASES = [  # dtype, distance, knn distance, compute_output, padded, vertex subset
    (torch.float64, "cosine", "ce", True, True, True),
    (torch.float32, "euclid", "l2", True, True, False),
    (torch.float64, "euclid", "ce", False, False, True),
    (torch.float32, "cosine", None, True, False, False),
]


def _inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, G, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    codebook = torch.randn(G, M, D, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    temperature = torch.tensor([0.3, 0.45], dtype=dtype).requires_grad_()
    return z, codebook, temperature


def _request(z, codebook, temperature, **options) -> StreamedRequest:
    return StreamedRequest(z=z, codebook=codebook, temperature=temperature, **options)


def _valid(padded: bool) -> torch.Tensor | None:
    if not padded:
        return None
    valid = torch.ones(N, dtype=torch.bool)
    valid[[0, 5, 6, 17, 30, 36]] = False
    return valid


def _vertices(subset: bool) -> torch.Tensor | None:
    return torch.tensor([[1, 4, 7, 9], [0, 2, 3, 10]]) if subset else None


def dense_path(z, codebook, temperature, *, distance, knn_k, knn_distance, compute_output, vertices, valid):
    """The dense computation every backend must equal: (quantized, knn loss, indices, stats) over valid rows."""
    rows = z if valid is None else z[valid]
    logits = (VQF.cosine_logits if distance == "cosine" else VQF.euclidean_logits)(rows, codebook, temperature)
    log_pi = torch.log_softmax(logits, dim=-1)
    pi = log_pi.exp()
    quantized = torch.einsum("ngm,gmd->ngd", pi, codebook) if compute_output else None
    loss = None if knn_k is None else knn_loss_scaled(log_pi, knn_k, knn_distance, vertices=vertices)
    return quantized, loss, pi.argmax(dim=-1), probability_stats(pi)


def _objective(quantized, loss, weights):
    total = 0.0
    if quantized is not None:
        total = total + (quantized * weights).sum()
    if loss is not None:
        total = total + 1.7 * loss
    return total


def _compare(name, kernels, dtype, distance, knn_distance, compute_output, padded, subset):
    z, codebook, temperature = _inputs(dtype)
    valid, vertices = _valid(padded), _vertices(subset)
    knn_k = None if knn_distance is None else K
    options = dict(distance=distance, knn_k=knn_k, knn_distance=knn_distance or "ce", compute_output=compute_output)
    backend = _backend(name, kernels)
    request = StreamedRequest(
        z=z, codebook=codebook, temperature=temperature, chunk_size=CHUNK, vertices=vertices, valid=valid, **options
    )
    result = backend.quantize(request)
    assert not getattr(backend, "fell_back", False)
    expected = dense_path(z, codebook, temperature, vertices=vertices, valid=valid, **options)
    tolerance = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    keep = slice(None) if valid is None else valid
    weights = torch.randn(N, G, D, generator=torch.Generator().manual_seed(5), dtype=dtype)
    if compute_output:
        torch.testing.assert_close(result.quantized[keep], expected[0], **tolerance)
        if valid is not None:
            assert torch.count_nonzero(result.quantized[~valid]) == 0
    else:
        assert result.quantized is None
    if knn_k is None:
        assert result.knn_loss is None
    else:
        torch.testing.assert_close(result.knn_loss, expected[1], **tolerance)
    assert torch.equal(result.indices[keep], expected[2])
    if valid is not None:
        assert bool((result.indices[~valid] == -1).all())
    for key, value in expected[3].items():
        torch.testing.assert_close(result.stats[key], value, **tolerance, msg=key)
    if not (compute_output or knn_k is not None):
        return
    inputs = [z, codebook, temperature]
    got = torch.autograd.grad(_objective(result.quantized, result.knn_loss, weights), inputs, allow_unused=True)
    want = torch.autograd.grad(
        _objective(expected[0], expected[1], weights if valid is None else weights[valid]), inputs, allow_unused=True
    )
    for g, w, what in zip(got, want, ("z", "codebook", "temperature"), strict=True):
        g = torch.zeros_like(w) if g is None else g
        torch.testing.assert_close(g, w, **tolerance, msg=lambda m, what=what: f"gradient of {what}: {m}")


@pytest.mark.parametrize(("name", "kernels"), BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("distance", ["cosine", "euclid"])
@pytest.mark.parametrize("knn_distance", ["ce", "l2", None])
@pytest.mark.parametrize(("padded", "subset"), [(False, False), (True, False), (False, True), (True, True)])
def test_backend_equals_dense_path(name, kernels, dtype, distance, knn_distance, padded, subset):
    """Values (output, eq. 13, codes, statistics) and gradients (z, Q, tau) of the dense path, G = 2 groups."""
    _compare(name, kernels, dtype, distance, knn_distance, True, padded, subset)


@pytest.mark.parametrize(("dtype", "distance", "knn_distance", "compute_output", "padded", "subset"), REAL_KERNEL_CASES)
def test_triton_backend_on_the_real_kernels_equals_dense_path(
    dtype, distance, knn_distance, compute_output, padded, subset
):
    """The Triton backend object around the real kernels (interpreted on CPU tensors), against the dense path."""
    _compare("triton", "real", dtype, distance, knn_distance, compute_output, padded, subset)


@pytest.mark.parametrize(("name", "kernels"), BACKEND_CASES)
@pytest.mark.parametrize("knn_distance", ["ce", "l2"])
def test_backend_without_output_equals_dense_path(name, kernels, knn_distance):
    """``compute_output=False``: no output, the regularizer and its gradients unchanged."""
    _compare(name, kernels, torch.float64, "cosine", knn_distance, False, True, False)


@pytest.mark.parametrize("knn_distance", ["ce", "l2"])
def test_backends_agree_with_each_other(knn_distance):
    """Reference, CPU and Triton (fake here when the kernels are absent) give the same results on one input."""
    z, codebook, temperature = _inputs(torch.float64, seed=3)
    results = {}
    for name in ("reference", "cpu", "triton"):
        result = _backend(name).quantize(
            _request(z, codebook, temperature, knn_k=K, knn_distance=knn_distance, chunk_size=CHUNK, valid=_valid(True))
        )
        grads = torch.autograd.grad(result.knn_loss + result.quantized.square().sum(), [z, codebook, temperature])
        results[name] = (result.quantized, result.knn_loss, result.indices, *grads)
    for name in ("cpu", "triton"):
        for got, want in zip(results[name], results["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_reference_backend_chunking_does_not_change_the_result():
    z, codebook, temperature = _inputs(torch.float64, seed=4)
    outcomes = []
    for chunk in (1, 5, N):
        result = backends.reference_streamed_softmax_quantize(z, codebook, temperature, knn_k=K, chunk_size=chunk)
        outcomes.append((result.knn_loss, *torch.autograd.grad(result.knn_loss, [z, codebook, temperature])))
    for other in outcomes[1:]:
        for got, want in zip(other, outcomes[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Choice of backend
# --------------------------------------------------------------------------------------------------------------


def test_auto_picks_cpu_on_cpu_and_explicit_names_stay():
    cpu = torch.device("cpu")
    assert backends.resolve_backend("auto", cpu) == "cpu"
    for name in ("reference", "cpu", "triton"):
        assert backends.resolve_backend(name, cpu) == name
    with pytest.raises(ValueError, match="backend must be one of auto, reference, cpu, triton, got 'gpu'"):
        backends.resolve_backend("gpu", cpu)


def test_auto_picks_triton_on_a_gpu_device_when_triton_imports(monkeypatch):
    meta = torch.device("meta")  # any non-CPU device type stands for a GPU here
    monkeypatch.setattr(backends, "TRITON_INSTALLED", True)
    assert backends.resolve_backend("auto", meta) == "triton"
    monkeypatch.setattr(backends, "TRITON_INSTALLED", False)
    assert backends.resolve_backend("auto", meta) == "reference"


def test_config_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match=r"backend='cuda' is not one of auto, reference, cpu, triton"):
        simplexvq.QuantizerConfig(dim=8, codebook_size=4, backend="cuda")


@pytest.mark.parametrize("name", ["reference", "cpu", "triton"])
def test_quantizer_uses_the_configured_backend_once(monkeypatch, name):
    """One backend object per quantizer, made at the first call and kept (the CPU ceiling lives in it)."""
    monkeypatch.setattr(triton_backend, "load_triton_kernels", lambda: fake_triton_kernels)
    quantizer = simplexvq.build_quantizer(
        "softmax-knn_ce", dim=8, groups=2, codebook_size=M, knn_k=K, memory_efficient=True, backend=name
    )
    assert quantizer.streamed_backend is None
    quantizer(torch.randn(4, 9, 8))
    backend = quantizer.streamed_backend
    assert backend.name == name
    quantizer(torch.randn(4, 9, 8))
    assert quantizer.streamed_backend is backend
    assert fake_triton_kernels.calls == (3 if name == "triton" else 0)  # two calls and one probe of the variant


# --------------------------------------------------------------------------------------------------------------
# Fallback of the Triton backend
# --------------------------------------------------------------------------------------------------------------


def _quantize_twice(backend):
    z, codebook, temperature = _inputs(torch.float64, seed=6)
    results = [backend.quantize(_request(z, codebook, temperature, knn_k=K, chunk_size=CHUNK)) for _ in range(2)]
    reference = backends.reference_streamed_softmax_quantize(z, codebook, temperature, knn_k=K, chunk_size=CHUNK)
    for result in results:
        torch.testing.assert_close(result.knn_loss, reference.knn_loss)
        torch.testing.assert_close(result.quantized, reference.quantized)


def test_triton_backend_falls_back_once_when_the_kernel_raises_at_its_first_call():
    fake_triton_kernels.fail_with = RuntimeError("PTX compilation failed: sm_50 is not supported")
    backend = backends.TritonBackend(load=lambda: fake_triton_kernels)
    with pytest.warns(RuntimeWarning, match="PTX compilation failed: sm_50 is not supported") as caught:
        _quantize_twice(backend)
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
    assert backend.fell_back and fake_triton_kernels.calls == 1  # not retried


def test_triton_backend_falls_back_when_a_backward_kernel_fails_to_compile():
    """The probe runs the call's variant forward and backward first, so a failing backward kernel is found before
    the training step's backward depends on it."""
    fake_triton_kernels.fail_backward_with = RuntimeError("backward kernel: out of shared memory")
    backend = backends.TritonBackend(load=lambda: fake_triton_kernels)
    z, codebook, temperature = _inputs(torch.float64, seed=3)
    inputs = [x.clone().requires_grad_() for x in (z, codebook, temperature)]
    with pytest.warns(RuntimeWarning, match="backward kernel: out of shared memory"):
        result = backend.quantize(_request(*inputs, knn_k=K, chunk_size=CHUNK))
    torch.autograd.grad(result.knn_loss + result.quantized.sum(), inputs)  # the reference backend's backward
    assert backend.fell_back


def test_triton_backend_falls_back_when_unavailable_or_missing():
    fake_triton_kernels.available = (False, "no CUDA device and TRITON_INTERPRET is not set")
    with pytest.warns(RuntimeWarning, match="no CUDA device and TRITON_INTERPRET is not set"):
        _quantize_twice(backends.TritonBackend(load=lambda: fake_triton_kernels))
    assert fake_triton_kernels.calls == 0

    def missing():
        raise ImportError("No module named 'simplexvq.scale.triton'")

    with pytest.warns(RuntimeWarning, match="cannot be imported: No module named 'simplexvq.scale.triton'"):
        _quantize_twice(backends.TritonBackend(load=missing))


def test_triton_backend_errors_after_a_successful_call_and_argument_errors_propagate():
    backend = backends.TritonBackend(load=lambda: fake_triton_kernels)
    z, codebook, temperature = _inputs(torch.float64)
    backend.quantize(_request(z, codebook, temperature, knn_k=K))
    fake_triton_kernels.fail_with = RuntimeError("illegal memory access")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        backend.quantize(_request(z, codebook, temperature, knn_k=K))
    fresh = backends.TritonBackend(load=lambda: fake_triton_kernels)
    fake_triton_kernels.fail_with = ValueError("knn_loss: k=99 neighbours per code vector requested")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="k=99"):
            fresh.quantize(_request(z, codebook, temperature, knn_k=K))
    assert not fresh.fell_back


def test_quantizer_training_step_survives_a_failing_kernel(monkeypatch):
    """backend='triton' whose kernel raises: one warning, and the step's loss equals the reference backend's."""
    monkeypatch.setattr(triton_backend, "load_triton_kernels", lambda: fake_triton_kernels)
    fake_triton_kernels.fail_with = RuntimeError("out of resources: shared memory")
    torch.manual_seed(0)
    config = dict(dim=8, groups=2, codebook_size=M, knn_k=K, memory_efficient=True, chunk_size=CHUNK)
    failing = simplexvq.build_quantizer("softmax-knn_ce", backend="triton", **config)
    reference = simplexvq.build_quantizer("softmax-knn_ce", backend="reference", **config)
    reference.load_state_dict(failing.state_dict())
    z = torch.randn(3, 11, 8)
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, 7:] = True
    with pytest.warns(RuntimeWarning, match="out of resources: shared memory"):
        out = failing(z, padding)
    out.loss.backward()
    expected = reference(z, padding)
    expected.loss.backward()
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.quantized, expected.quantized)
    torch.testing.assert_close(failing.codebook.weight.grad, reference.codebook.weight.grad)


def test_a_quantizer_with_a_triton_backend_can_be_deep_copied(monkeypatch):
    """A copy (an EMA teacher, ``copy.deepcopy(model)``) drops the loaded kernel module and loads it again when
    called."""
    import copy

    monkeypatch.setattr(triton_backend, "load_triton_kernels", lambda: fake_triton_kernels)
    quantizer = simplexvq.build_quantizer(
        "softmax-knn_ce", dim=8, groups=2, codebook_size=M, knn_k=K, memory_efficient=True, backend="triton"
    )
    z = torch.randn(2, 9, 8)
    expected = quantizer(z).loss
    twin = copy.deepcopy(quantizer)
    assert twin.streamed_backend._kernels is None
    torch.testing.assert_close(twin(z).loss, expected)
    assert fake_triton_kernels.calls == 4 and not twin.streamed_backend.fell_back  # a call and a probe each


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("regularizer", ["knn_ce", "knn_l2"])
def test_quantizer_on_the_sync_free_path_equals_the_compacting_path(monkeypatch, training, regularizer):
    """backend='triton' keeps padded rows in place (masks); backend='cpu' compacts them: same output, codes (-1 at
    padding), losses, statistics and gradients, in training and in eval mode (hard codes)."""
    monkeypatch.setattr(triton_backend, "load_triton_kernels", lambda: fake_triton_kernels)
    config = dict(dim=8, groups=2, codebook_size=M, knn_k=K, memory_efficient=True, chunk_size=CHUNK)
    torch.manual_seed(0)
    in_place = simplexvq.build_quantizer(f"softmax-{regularizer}", backend="triton", **config).double()
    compacting = simplexvq.build_quantizer(f"softmax-{regularizer}", backend="cpu", **config).double()
    compacting.load_state_dict(in_place.state_dict())
    z = torch.randn(3, 11, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    z[1, 7:] = float("nan")  # padding may hold anything
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, 7:] = True
    outputs = []
    for quantizer in (in_place, compacting):
        quantizer.train(training)
        leaf = z.clone().requires_grad_()
        out = quantizer(leaf, padding)
        (out.loss + out.quantized.nan_to_num().square().sum()).backward()
        outputs.append((out, leaf.grad, quantizer.codebook.weight.grad, quantizer.logits.log_temperature.grad))
    (got, *got_grads), (want, *want_grads) = outputs
    assert fake_triton_kernels.calls == 2 and not in_place.streamed_backend.fell_back  # the call and its probe
    torch.testing.assert_close(got.quantized, want.quantized)
    assert torch.count_nonzero(got.quantized[1, 7:]) == 0 and bool((got.indices[1, 7:] == -1).all())
    assert torch.equal(got.indices, want.indices)
    assert got.losses.keys() == want.losses.keys()
    torch.testing.assert_close(got.loss, want.loss)
    for key in want.stats:
        torch.testing.assert_close(got.stats[key], want.stats[key], msg=key)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


# --------------------------------------------------------------------------------------------------------------
# The request: every option checked once, when it is made
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"distance": "dot"}, r"streamed_softmax_quantize: distance must be 'cosine' or 'euclid', got 'dot'"),
        ({"scope": "world"}, r"scope must be 'local' or 'global', got 'world'"),
        ({"chunk_size": 0}, r"chunk_size must be a positive integer \(rows per chunk\) or None, got 0"),
        ({"compute_output": 1}, r"compute_output must be True or False, got 1"),
        ({"knn_k": 0}, r"knn_loss: k must be a positive integer, got 0"),
        ({"knn_k": 2, "knn_distance": "kl"}, r"knn_loss: distance must be 'ce' or 'l2', got 'kl'"),
        ({"knn_k": 2, "vertices": torch.zeros(3, 1, dtype=torch.long)}, r"vertices must have shape \(S,\) or \(G=2"),
        ({"knn_k": 2, "vertices": torch.tensor([0.5])}, r"vertices must be an integer tensor"),
        ({"valid": torch.ones(N, dtype=torch.long)}, r"valid must be a bool tensor of shape \(N,\) = \(37,\)"),
        ({"temperature": torch.ones(3)}, r"temperature must have shape \(G,\) = \(2,\), got \(3,\)"),
        ({"z": torch.zeros(N, G + 1, D)}, r"z must be \(N, G, d\) and codebook \(G, M, d\)"),
    ],
)
def test_request_names_a_bad_option(options, message):
    z, codebook, temperature = _inputs(torch.float64)
    inputs = {"z": z, "codebook": codebook, "temperature": temperature}
    with pytest.raises(ValueError, match=message):
        StreamedRequest(**{**inputs, **options})


def test_request_normalises_its_options_and_copies_with_changes():
    z, codebook, temperature = _inputs(torch.float64)
    request = StreamedRequest(
        z=z, codebook=codebook, temperature=temperature, knn_k=torch.tensor(3).item(), vertices=torch.tensor([1, 4])
    )
    assert request.vertices.shape == (G, 2) and request.vertices.dtype == torch.long
    assert request.options()["knn_k"] == 3 and "chunk_size" not in request.options(chunk_size=False)
    assert set(request.options()) == {f.name for f in dataclasses.fields(StreamedRequest)} - {
        "z",
        "codebook",
        "temperature",
    }
    without_knn = StreamedRequest(z=z, codebook=codebook, temperature=temperature, vertices=torch.tensor([1, 4]))
    assert without_knn.vertices is None  # a vertex subset means nothing without the regularizer
    with pytest.raises(ValueError, match="scope must be"):
        request.replace(scope="everywhere")
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.knn_k = 4


def test_every_backend_takes_the_same_request():
    """One request, three backends: the object is not changed by a call (the CPU backend's hint lives in it)."""
    z, codebook, temperature = _inputs(torch.float64, seed=9)
    request = _request(z, codebook, temperature, knn_k=K, chunk_size=CHUNK, valid=_valid(True))
    before = dict(request.options())
    losses = [_backend(name).quantize(request).knn_loss for name in ("reference", "cpu", "triton")]
    assert request.options().keys() == before.keys()
    assert all(request.options()[key] is value for key, value in before.items())
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[2], losses[0])


def test_backend_names_are_declared_once():
    from simplexvq import config
    from simplexvq.scale.backends import names

    assert config.BACKENDS is names.BACKEND_NAMES and backends.BACKEND_CHOICES is names.BACKEND_NAMES
    assert typing.get_args(config.Backend) == names.BACKEND_NAMES
    for name in names.CONCRETE_BACKENDS:
        assert backends.make_backend(name).name == name
    with pytest.raises(ValueError, match="make_backend: name must be one of reference, cpu, triton, got 'auto'"):
        backends.make_backend("auto")


def test_the_fallback_reason_is_recorded():
    fake_triton_kernels.fail_with = RuntimeError("no kernel image is available for execution on the device")
    backend = backends.TritonBackend(load=lambda: fake_triton_kernels)
    assert backend.fallback_reason is None
    with pytest.warns(RuntimeWarning):
        _quantize_twice(backend)
    assert backend.fell_back
    assert backend.fallback_reason == (
        "the kernels failed at their first call: RuntimeError: no kernel image is available for execution on the device"
    )
