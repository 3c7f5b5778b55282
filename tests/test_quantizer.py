"""Tests of :class:`simplexvq.ProductQuantizer` against naive references written directly from the paper.

Equation numbers refer to Morita (2025), "Pushing Toward the Simplex Vertices"
(``shared/papers/knn-simplex-vertices-morita2025.md``): logits of appendix A.1, smoothing of section 2.2 (eq. 6-8),
regularizers of eq. 11-13, hard quantization and its estimators of section 2.1 (eq. 2-4) and eq. 10.

The references below are deliberately naive (explicit loops, explicit ``d x d`` Jacobians, explicit sorting) and
run in float64 on float64 copies of the quantizer's parameters. The quantizer is compared on values and on gradients
with respect to the input ``z``, the code vectors (or SimVQ's linear map) and the learnable temperature, with
``G > 1`` groups and a padding mask (True = padded).

The library computes in float32 (its documented compute dtype), so most comparisons run a float32 quantizer against
the float64 reference with float32 tolerances; ``test_double_precision_model_*`` additionally run the same checks
on a ``.double()`` quantizer with float64 tolerances.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import simplexvq.functional as VQF
from simplexvq import GumbelTemperature, ProductQuantizer, QuantizerConfig

DIM = 8
GROUPS = 2
GROUP_DIM = DIM // GROUPS
M = 6
K = 3
LEAD = (3, 5)
SMOOTHING_METHODS = ("softmax", "soft_gumbel", "hard_gumbel")
HARD_METHODS = ("ste", "rotation", "simvq")
REGULARIZERS = ("knn_ce", "knn_l2", "perplexity", "none")
DISTANCES = ("cosine", "euclid")
REG_WEIGHT = 0.7
GUMBEL_SCHEDULE = GumbelTemperature(start=2.0, end=0.5, decay=0.8)
GUMBEL_STEP = 2
# Per-group temperatures, different per group so that a temperature applied to the wrong group is caught.
TEMPERATURES = {"cosine": (0.2, 0.35), "euclid": (0.8, 1.5)}


def _pad_mask() -> torch.Tensor:
    mask = torch.zeros(LEAD, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 4] = True
    mask[2, 1] = True
    return mask


PAD_MASK = _pad_mask()
VALID = ~PAD_MASK.reshape(-1)
NUM_VALID = int(VALID.sum())


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _input(seed: int, dtype: torch.dtype = torch.float32, lead: tuple[int, ...] = LEAD) -> torch.Tensor:
    return torch.randn(*lead, DIM, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _config(method: str, regularizer: str | None = None, distance: str | None = None, **kwargs) -> QuantizerConfig:
    if regularizer is None:
        regularizer = "knn_ce" if method in SMOOTHING_METHODS else "none"
    return QuantizerConfig(
        dim=DIM,
        codebook_size=M,
        groups=GROUPS,
        method=method,
        regularizer=regularizer,
        distance=distance,
        knn_k=K,
        **kwargs,
    )


def _model(
    method: str,
    regularizer: str | None = None,
    distance: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **kwargs,
) -> ProductQuantizer:
    torch.manual_seed(seed)
    model = ProductQuantizer(_config(method, regularizer, distance, **kwargs)).to(dtype)
    if model.logits is not None:
        temperatures = torch.tensor(TEMPERATURES[model.config.distance], dtype=torch.float64)
        with torch.no_grad():
            model.logits.log_temperature.copy_(temperatures.log())
    return model


def _valid_rows(x: torch.Tensor) -> torch.Tensor:
    """(*LEAD, ...) -> the unpadded rows, flattened to (N_valid, ...)."""
    return x.reshape(-1, *x.shape[len(LEAD) :])[VALID]


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of the scalar ``out`` w.r.t. ``inputs``; an input that receives no gradient gets zeros."""
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(out, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare a quantizer result computed in ``dtype`` with a float64 reference."""
    assert actual.shape == expected.shape, what
    expected = expected.detach().double()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    if dtype == torch.float64:
        rtol, atol = 1e-9, 1e-10 * scale
    else:
        rtol, atol = 2e-4, 2e-5 * scale
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _entropy_perplexity(probs: list[float]) -> float:
    """``exp(-sum p log p)`` with ``0 log 0 = 0``."""
    return math.exp(-sum(p * math.log(p) for p in probs if p > 0))


# --------------------------------------------------------------------------------------------------------------
# Naive references
# --------------------------------------------------------------------------------------------------------------


def naive_logits(z: torch.Tensor, codebook: torch.Tensor, tau: torch.Tensor, distance: str) -> torch.Tensor:
    """Appendix A.1: ``cos(z_g, q_{g,m}) / tau_g`` (or ``-|z_g - q_{g,m}|^2 / tau_g``), one group at a time."""
    per_group = []
    for g in range(z.shape[1]):
        zg, qg = z[:, g], codebook[g]
        if distance == "cosine":
            z_hat = zg / zg.norm(dim=-1, keepdim=True)
            q_hat = qg / qg.norm(dim=-1, keepdim=True)
            similarity = z_hat @ q_hat.T
        else:
            similarity = -((zg[:, None, :] - qg[None, :, :]) ** 2).sum(-1)
        per_group.append(similarity / tau[g])
    return torch.stack(per_group, dim=1)  # (N, G, M)


def naive_knn(probs: torch.Tensor, log_probs: torch.Tensor, k: int, kind: str) -> torch.Tensor:
    """Eq. 13 per group, averaged over groups: ``(MK)^-1 sum_m sum_k D(e_m, p^(m,k))`` by explicit sorting."""
    n, groups, m_size = probs.shape
    per_group = []
    for g in range(groups):
        total = probs.new_zeros(())
        for m in range(m_size):
            vertex = torch.zeros(m_size, dtype=probs.dtype)
            vertex[m] = 1.0
            if kind == "ce":
                deviations = torch.stack([-log_probs[i, g, m] for i in range(n)])
            else:
                deviations = torch.stack([((vertex - probs[i, g]) ** 2).sum() for i in range(n)])
            total = total + torch.sort(deviations).values[:k].sum()
        per_group.append(total / (m_size * k))
    return torch.stack(per_group).mean()


def naive_perplexity_loss(probs: torch.Tensor) -> torch.Tensor:
    """``1 - eq. 11`` (minimised form), with ``pi_bar`` of eq. 12, averaged over groups."""
    m_size = probs.shape[-1]
    per_group = []
    for g in range(probs.shape[1]):
        mean = probs[:, g].sum(dim=0) / probs.shape[0]
        ppl = torch.exp(-(mean * mean.log()).sum())
        per_group.append(1.0 - ppl / m_size)
    return torch.stack(per_group).mean()


def naive_smoothing(
    z: torch.Tensor,
    codebook: torch.Tensor,
    tau: torch.Tensor,
    *,
    method: str,
    regularizer: str,
    distance: str,
    training: bool,
    gumbels: torch.Tensor | None,
    gumbel_tau: float,
    regularize_samples: bool = False,
    inference: str = "hard",
) -> dict[str, torch.Tensor]:
    """Section 2.2 / 3 with the logits of A.1: ``z`` (N, G, d) unpadded rows; returns the reference pieces."""
    logits = naive_logits(z, codebook, tau, distance)
    pi = torch.softmax(logits, dim=-1)
    log_pi = torch.log_softmax(logits, dim=-1)
    regularized = pi
    if not training:
        if inference == "hard":
            weights = F.one_hot(pi.argmax(-1), M).to(pi.dtype)
        else:
            weights = pi
    elif method == "softmax":
        weights = pi  # section 3: p = pi
    else:
        p = torch.softmax((gumbels + log_pi) / gumbel_tau, dim=-1)  # eq. 7
        if method == "soft_gumbel":
            weights = p
        else:
            vertex = F.one_hot((gumbels + log_pi).argmax(-1), M).to(p.dtype)  # eq. 6
            weights = vertex + p - p.detach()  # eq. 8
        if regularize_samples:
            regularized = p
    quantized = torch.stack([weights[:, g] @ codebook[g] for g in range(z.shape[1])], dim=1)  # eq. 5: Q p
    if regularizer == "knn_ce":
        reg = naive_knn(regularized, regularized.log(), K, "ce")
    elif regularizer == "knn_l2":
        reg = naive_knn(regularized, regularized.log(), K, "l2")
    elif regularizer == "perplexity":
        reg = naive_perplexity_loss(regularized)
    else:
        reg = None
    return {"pi": pi, "quantized": quantized, "reg": reg}


def naive_probability_stats(pi: torch.Tensor) -> dict[str, torch.Tensor]:
    n, groups, _ = pi.shape
    prob_ppl, individual, max_prob = [], [], []
    for g in range(groups):
        mean = [float(pi[:, g, m].sum()) / n for m in range(M)]
        prob_ppl.append(_entropy_perplexity(mean))
        individual.append(sum(_entropy_perplexity(pi[i, g].tolist()) for i in range(n)) / n)
        max_prob.append(sum(float(pi[i, g].max()) for i in range(n)) / n)
    return {
        "prob_perplexity": torch.tensor(prob_ppl, dtype=torch.float64),
        "individual_perplexity": torch.tensor(individual, dtype=torch.float64),
        "max_prob": torch.tensor(max_prob, dtype=torch.float64),
    }


def naive_code_perplexity(indices: torch.Tensor) -> torch.Tensor:
    """Perplexity of the histogram of hard codes, per group."""
    n, groups = indices.shape
    out = []
    for g in range(groups):
        counts = [0] * M
        for i in range(n):
            counts[int(indices[i, g])] += 1
        out.append(_entropy_perplexity([c / n for c in counts]))
    return torch.tensor(out, dtype=torch.float64)


def naive_nearest(z: torch.Tensor, codebook: torch.Tensor, distance: str) -> torch.Tensor:
    """``iota(z) = argmin_m D(z, q_m)`` per row and group, by an explicit loop over the codebook."""
    n, groups, _ = z.shape
    indices = torch.empty(n, groups, dtype=torch.long)
    for i in range(n):
        for g in range(groups):
            best, best_m = math.inf, -1
            for m in range(codebook.shape[1]):
                a, b = z[i, g], codebook[g, m]
                if distance == "cosine":
                    dist = 1.0 - float(a @ b / (a.norm() * b.norm()))
                else:
                    dist = float(((a - b) ** 2).sum())
                if dist < best:
                    best, best_m = dist, m
            indices[i, g] = best_m
    return indices


def naive_rotation_matrix(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Footnote 1: ``R = I - 2 r_hat r_hat^T + 2 q_hat z_hat^T`` with ``r = q_hat + z_hat``."""
    z_hat, q_hat = z / z.norm(), q / q.norm()
    r_hat = (q_hat + z_hat) / (q_hat + z_hat).norm()
    eye = torch.eye(z.shape[0], dtype=z.dtype)
    return eye - 2.0 * torch.outer(r_hat, r_hat) + 2.0 * torch.outer(q_hat, z_hat)


def normalize_jacobian(v: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``v -> v / |v|``: ``(I - v_hat v_hat^T) / |v|``."""
    v_hat = v / v.norm()
    return (torch.eye(v.shape[0], dtype=v.dtype) - torch.outer(v_hat, v_hat)) / v.norm()


def naive_simvq_codes(basis: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SimVQ: ``q_{g,m} = W_g c_{g,m} + b_g`` (``C W^T + b``), one group at a time."""
    return torch.stack([basis[g] @ weight[g].T + bias[g] for g in range(basis.shape[0])])


def naive_hard_losses(
    z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, method: str, distance: str, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eq. 10 on the unpadded rows ``z`` (N, G, d); cosine VQ works on the unit sphere (normalised z and codes).

    Returns ``(z_space, codes, beta * commitment, codebook)`` where ``codes[i, g] = q_{iota(z_i), g}``. Squared
    norms are summed over features and groups and averaged over positions; SimVQ averages over elements instead.
    """
    if distance == "cosine":
        z = z / z.norm(dim=-1, keepdim=True)
        codebook = codebook / codebook.norm(dim=-1, keepdim=True)
    n, groups, d = z.shape
    codes = torch.stack([torch.stack([codebook[g, indices[i, g]] for g in range(groups)]) for i in range(n)])
    commitment = sum(((z[i] - codes[i].detach()) ** 2).sum() for i in range(n)) / n
    codebook_term = sum(((z[i].detach() - codes[i]) ** 2).sum() for i in range(n)) / n
    if method == "simvq":
        commitment, codebook_term = commitment / (groups * d), codebook_term / (groups * d)
    return z, codes, beta * commitment, codebook_term


# --------------------------------------------------------------------------------------------------------------
# Smoothing methods x regularizers x logits against the reference
# --------------------------------------------------------------------------------------------------------------


def _check_smoothing(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    regularizer: str,
    distance: str,
    dtype: torch.dtype,
    regularize_samples: bool = False,
    seed: int = 0,
) -> None:
    model = _model(
        method,
        regularizer,
        distance,
        dtype,
        seed=seed,
        regularizer_weight=REG_WEIGHT,
        gumbel_temperature=GUMBEL_SCHEDULE,
        regularize_samples=regularize_samples,
    )
    model.train()
    model.set_num_updates(GUMBEL_STEP)
    gumbel_tau = max(GUMBEL_SCHEDULE.start * GUMBEL_SCHEDULE.decay**GUMBEL_STEP, GUMBEL_SCHEDULE.end)

    noise = -torch.empty(NUM_VALID, GROUPS, M, dtype=torch.float64).exponential_(generator=_gen(seed + 7)).log()
    calls = []

    def fixed_gumbel(like: torch.Tensor) -> torch.Tensor:
        assert like.shape == noise.shape
        calls.append(like.shape)
        return noise.to(like.dtype)

    monkeypatch.setattr(VQF, "sample_gumbel", fixed_gumbel)

    z = _input(seed + 1, dtype).requires_grad_(True)
    out = model(z, PAD_MASK, return_probs=True)
    assert (len(calls) > 0) == (method != "softmax")
    params = [z, model.codebook.weight, model.logits.log_temperature]

    # Reference on float64 copies.
    z64 = z.detach().double().requires_grad_(True)
    q64 = model.codebook.weight.detach().double().requires_grad_(True)
    tau64 = model.logits.temperature.detach().double().requires_grad_(True)
    ref = naive_smoothing(
        _valid_rows(z64).reshape(-1, GROUPS, GROUP_DIM),
        q64,
        tau64,
        method=method,
        regularizer=regularizer,
        distance=distance,
        training=True,
        gumbels=noise.to(dtype).double(),
        gumbel_tau=gumbel_tau,
        regularize_samples=regularize_samples,
    )
    ref_params = [z64, q64, tau64]

    # Values.
    assert out.quantized.shape == z.shape and out.quantized.dtype == dtype
    got_q = _valid_rows(out.quantized).reshape(-1, GROUPS, GROUP_DIM)
    _close(got_q, ref["quantized"], dtype, "quantized = Q p")
    assert torch.count_nonzero(out.quantized[PAD_MASK]) == 0
    _close(_valid_rows(out.probs), ref["pi"], dtype, "probs = pi")
    assert torch.equal(_valid_rows(out.indices), ref["pi"].argmax(-1))
    assert torch.all(out.indices[PAD_MASK] == -1)
    if regularizer == "none":
        assert out.losses == {}
        assert float(out.loss) == 0.0
        ref_loss = None
    else:
        assert set(out.losses) == {regularizer}
        ref_loss = REG_WEIGHT * ref["reg"]
        _close(out.loss, ref_loss, dtype, f"{regularizer} loss")
    assert torch.equal(out.loss, sum(out.losses.values()) if out.losses else torch.zeros_like(out.loss))
    assert out.loss.dtype == dtype

    # Statistics.
    expected_stats = naive_probability_stats(ref["pi"].detach())
    expected_stats["code_perplexity"] = naive_code_perplexity(ref["pi"].detach().argmax(-1))
    expected_stats["temperature"] = torch.tensor(TEMPERATURES[distance], dtype=torch.float64)
    assert set(out.stats) == set(expected_stats)
    for name, value in expected_stats.items():
        assert out.stats[name].shape == (GROUPS,)
        assert not out.stats[name].requires_grad
        # The code histogram is accumulated in float32 whatever the model dtype (a monitoring statistic).
        _close(out.stats[name], value, torch.float32 if name == "code_perplexity" else dtype, name)

    # Gradients of a random linear functional of the output, and of the loss.
    upstream = torch.randn(z.shape, generator=_gen(seed + 3), dtype=torch.float64)
    upstream_valid = _valid_rows(upstream).reshape(-1, GROUPS, GROUP_DIM)
    objectives = [((out.quantized * upstream.to(dtype)).sum(), (ref["quantized"] * upstream_valid).sum())]
    if ref_loss is not None:
        objectives.append((out.loss, ref_loss))
    for which, (got_objective, ref_objective) in zip(("quantized", "loss"), objectives, strict=False):
        got = _grads(got_objective, params)
        expected = _grads(ref_objective, ref_params)
        expected[2] = expected[2] * tau64.detach()  # d/d log(tau) = tau * d/d tau
        assert all(float(g.abs().sum()) > 0 for g in expected), "reference gradient vanished: vacuous check"
        for name, g_got, g_exp in zip(("z", "codebook", "log_temperature"), got, expected, strict=True):
            _close(g_got, g_exp, dtype, f"d {which} / d {name}")
        assert torch.count_nonzero(got[0][PAD_MASK]) == 0


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("regularizer", REGULARIZERS)
@pytest.mark.parametrize("method", SMOOTHING_METHODS)
def test_smoothing_matches_naive_reference(monkeypatch, method, regularizer, distance):
    _check_smoothing(monkeypatch, method, regularizer, distance, torch.float32)


@pytest.mark.parametrize("regularizer", ["knn_ce", "knn_l2", "perplexity"])
@pytest.mark.parametrize("method", ["soft_gumbel", "hard_gumbel"])
def test_regularize_samples_regularizes_gumbel_samples(monkeypatch, method, regularizer):
    """Section 3: with ``regularize_samples`` eq. 13 (or 11) is applied to the Gumbel samples p instead of pi."""
    _check_smoothing(monkeypatch, method, regularizer, "cosine", torch.float32, regularize_samples=True, seed=5)


def test_gumbel_noise_is_seeded_and_fresh_per_call():
    model = _model("soft_gumbel", "none")
    z = _input(1)
    torch.manual_seed(123)
    first = model(z).quantized
    torch.manual_seed(123)
    again = model(z).quantized
    second = model(z).quantized
    assert torch.equal(first, again)
    assert not torch.allclose(first, second)


# --------------------------------------------------------------------------------------------------------------
# Onehotness, simplex, eval mode
# --------------------------------------------------------------------------------------------------------------


def _code_rows(codebook: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``codebook[g, indices[..., g]]`` for every group: (..., G, d)."""
    return torch.stack([codebook[g][indices[..., g]] for g in range(codebook.shape[0])], dim=-2)


@pytest.mark.parametrize("distance", DISTANCES)
def test_hard_gumbel_training_output_is_exactly_the_sampled_code_vector(monkeypatch, distance):
    """Eq. 6 and 8: the forward value is ``Q e_iota`` with ``iota = argmax(g + log pi)``, bit for bit."""
    model = _model("hard_gumbel", "knn_ce", distance)
    noise = -torch.empty(NUM_VALID, GROUPS, M).exponential_(generator=_gen(11)).log()
    monkeypatch.setattr(VQF, "sample_gumbel", lambda like: noise.to(like.dtype))
    z = _input(2)
    out = model(z, PAD_MASK, return_probs=True)
    codebook = model.codebook.weight.detach()
    sampled = (noise + _valid_rows(out.probs).log()).argmax(-1)
    got = _valid_rows(out.quantized).reshape(-1, GROUPS, GROUP_DIM)
    assert torch.equal(got, _code_rows(codebook, sampled))
    # The sample is not always the argmax of pi (otherwise this test could not tell them apart).
    assert not torch.equal(sampled, _valid_rows(out.indices))


def test_hard_gumbel_with_real_noise_outputs_code_vectors():
    model = _model("hard_gumbel", "knn_l2")
    torch.manual_seed(3)
    out = model(_input(4, lead=(40,)))
    codebook = model.codebook.weight.detach()
    rows = out.quantized.detach().reshape(-1, GROUPS, GROUP_DIM)
    for i in range(rows.shape[0]):
        for g in range(GROUPS):
            assert any(torch.equal(rows[i, g], codebook[g, m]) for m in range(M))


@pytest.mark.parametrize("method", SMOOTHING_METHODS)
@pytest.mark.parametrize("distance", DISTANCES)
def test_assignment_probabilities_lie_on_the_simplex(method, distance):
    model = _model(method, "knn_ce", distance)
    torch.manual_seed(0)
    out = model(_input(3), PAD_MASK, return_probs=True)
    assert out.probs.shape == (*LEAD, GROUPS, M)
    valid = _valid_rows(out.probs)
    assert torch.all(valid >= 0)
    torch.testing.assert_close(valid.sum(-1), torch.ones(NUM_VALID, GROUPS))
    assert torch.count_nonzero(out.probs[PAD_MASK]) == 0
    if method == "softmax":  # p = pi: the output is exactly a convex combination with the returned weights
        expected = torch.einsum("ngm,gmd->ngd", valid, model.codebook.weight)
        torch.testing.assert_close(_valid_rows(out.quantized).reshape(-1, GROUPS, GROUP_DIM), expected)


def test_soft_gumbel_output_is_a_convex_combination(monkeypatch):
    """Eq. 7: the output is ``Q p`` with the soft Gumbel sample ``p = softmax((g + log pi) / tau)`` built here from
    the input, the code vectors and the noise alone (not from the quantizer's own probabilities); so each output
    coordinate lies between the smallest and the largest of that coordinate over the group's code vectors."""
    model = _model("soft_gumbel", "knn_ce")
    noise = -torch.empty(NUM_VALID, GROUPS, M).exponential_(generator=_gen(12)).log()
    monkeypatch.setattr(VQF, "sample_gumbel", lambda like: noise.to(like.dtype))
    z = _input(5)
    out = model(z, PAD_MASK)
    codebook = model.codebook.weight.detach().double()
    tau = model.logits.temperature.detach().double()
    logits = naive_logits(_valid_rows(z.double()).reshape(-1, GROUPS, GROUP_DIM), codebook, tau, "cosine")
    p = torch.softmax((noise.double() + torch.log_softmax(logits, dim=-1)) / model.gumbel_temperature, dim=-1)
    quantized = _valid_rows(out.quantized.detach()).reshape(-1, GROUPS, GROUP_DIM).double()
    _close(quantized, torch.einsum("ngm,gmd->ngd", p, codebook), torch.float32, "soft Gumbel output")
    low, high = codebook.amin(dim=1), codebook.amax(dim=1)  # (G, d)
    slack = 1e-5
    assert bool((quantized >= low - slack).all()) and bool((quantized <= high + slack).all())
    smoothed_without_noise = torch.einsum("ngm,gmd->ngd", torch.softmax(logits, dim=-1), codebook)
    assert not torch.allclose(quantized, smoothed_without_noise, atol=1e-3)  # the noise is used


EVAL_CASES = [(m, d) for m in SMOOTHING_METHODS + ("ste", "rotation") for d in DISTANCES] + [("simvq", None)]


@pytest.mark.parametrize(("method", "distance"), EVAL_CASES)
def test_eval_mode_returns_exactly_the_argmax_code_vector(monkeypatch, method, distance):
    """Section 3: at inference, hard quantization by the argmax, for every method; no Gumbel noise is drawn."""
    model = _model(method, None, distance)
    model.eval()

    def no_noise(like):
        raise AssertionError("eval mode must not sample Gumbel noise")

    monkeypatch.setattr(VQF, "sample_gumbel", no_noise)
    z = _input(6)
    out = model(z, PAD_MASK)
    z64 = _valid_rows(z.double()).reshape(-1, GROUPS, GROUP_DIM)
    codebook = model.code_vectors().detach()
    if model.config.is_smoothing:
        logits = naive_logits(z64, codebook.double(), model.logits.temperature.detach().double(), distance)
        expected_indices = logits.argmax(-1)
        expected_codes = codebook
    else:
        expected_indices = naive_nearest(z64, codebook.double(), model.config.distance)
        expected_codes = F.normalize(codebook, dim=-1) if model.config.distance == "cosine" else codebook
    assert torch.equal(_valid_rows(out.indices), expected_indices)
    assert torch.all(out.indices[PAD_MASK] == -1)
    got = _valid_rows(out.quantized).reshape(-1, GROUPS, GROUP_DIM)
    assert torch.equal(got, _code_rows(expected_codes, expected_indices))
    assert torch.count_nonzero(out.quantized[PAD_MASK]) == 0
    # Deterministic.
    assert torch.equal(model(z, PAD_MASK).quantized, out.quantized)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("method", SMOOTHING_METHODS)
def test_soft_inference_returns_q_pi_in_eval_mode(monkeypatch, method, distance):
    model = _model(method, "knn_ce", distance, inference="soft")
    model.eval()
    monkeypatch.setattr(VQF, "sample_gumbel", lambda like: pytest.fail("eval mode must not sample Gumbel noise"))
    z = _input(7)
    out = model(z, PAD_MASK)
    ref = naive_smoothing(
        _valid_rows(z.double()).reshape(-1, GROUPS, GROUP_DIM),
        model.codebook.weight.detach().double(),
        model.logits.temperature.detach().double(),
        method=method,
        regularizer="none",
        distance=distance,
        training=False,
        gumbels=None,
        gumbel_tau=1.0,
        inference="soft",
    )
    _close(_valid_rows(out.quantized).reshape(-1, GROUPS, GROUP_DIM), ref["quantized"], torch.float32, "Q pi")
    assert torch.count_nonzero(out.quantized[PAD_MASK]) == 0
    # Q pi is not a code vector: soft inference really differs from hard inference.
    hard = _model(method, "knn_ce", distance).eval()(z, PAD_MASK).quantized
    assert not torch.allclose(hard, out.quantized)


# --------------------------------------------------------------------------------------------------------------
# Hard methods against the reference
# --------------------------------------------------------------------------------------------------------------


def _check_hard(method: str, distance: str | None, dtype: torch.dtype, seed: int = 0) -> None:
    model = _model(method, "none", distance, dtype, seed=seed)
    model.train()
    config = model.config
    distance = config.distance
    beta = 0.25 if method == "simvq" else 1.0
    assert config.commitment_weight == beta
    z = _input(seed + 1, dtype).requires_grad_(True)
    out = model(z, PAD_MASK)

    z64 = z.detach().double().requires_grad_(True)
    if method == "simvq":
        basis = model.codebook.basis
        assert not basis.requires_grad
        lib_params = [model.codebook.weight, model.codebook.bias]
        ref_params = [p.detach().double().requires_grad_(True) for p in lib_params]
        codebook64 = naive_simvq_codes(basis.double(), *ref_params)
        _close(model.code_vectors(), codebook64, dtype, "SimVQ code vectors = C W^T + b")
    else:
        lib_params = [model.codebook.weight]
        ref_params = [model.codebook.weight.detach().double().requires_grad_(True)]
        codebook64 = ref_params[0]
    zv = _valid_rows(z64).reshape(-1, GROUPS, GROUP_DIM)
    indices = naive_nearest(zv.detach(), codebook64.detach(), distance)
    z_space, codes, commitment, codebook_term = naive_hard_losses(zv, codebook64, indices, method, distance, beta)

    # Indices and values.
    assert torch.equal(_valid_rows(out.indices), indices)
    assert torch.all(out.indices[PAD_MASK] == -1)
    assert out.quantized.dtype == dtype and out.quantized.shape == z.shape
    lib_codes = model.code_vectors().detach()
    if distance == "cosine":
        lib_codes = F.normalize(lib_codes, dim=-1)
    got = _valid_rows(out.quantized).reshape(-1, GROUPS, GROUP_DIM)
    assert torch.equal(got, _code_rows(lib_codes, indices)), "the value must be exactly the code vector"
    _close(got, codes, dtype, "quantized")
    assert torch.count_nonzero(out.quantized[PAD_MASK]) == 0

    # Eq. 10.
    assert set(out.losses) == {"commitment", "codebook"}
    _close(out.losses["commitment"], commitment, dtype, "beta * commitment")
    _close(out.losses["codebook"], codebook_term, dtype, "codebook")
    assert torch.equal(out.loss, out.losses["commitment"] + out.losses["codebook"])
    assert out.loss.dtype == dtype
    assert set(out.stats) == {"code_perplexity"}
    _close(out.stats["code_perplexity"], naive_code_perplexity(indices), torch.float32, "code_perplexity")

    # Gradient of the output: explicit Jacobians (eq. 1, eq. 4, chained with the normalisation for cosine).
    upstream = torch.randn(z.shape, generator=_gen(seed + 3), dtype=torch.float64)
    u = _valid_rows(upstream).reshape(-1, GROUPS, GROUP_DIM)
    expected_z = torch.zeros(NUM_VALID, GROUPS, GROUP_DIM, dtype=torch.float64)
    expected_codebook = torch.zeros(GROUPS, M, GROUP_DIM, dtype=torch.float64)
    for i in range(NUM_VALID):
        for g in range(GROUPS):
            z_ig, q_ig = zv[i, g].detach(), codes[i, g].detach()
            z_norm_jac = normalize_jacobian(z_ig) if distance == "cosine" else torch.eye(GROUP_DIM).double()
            z_eff = z_space[i, g].detach()
            if method == "rotation":
                jac = (q_ig.norm() / z_eff.norm()) * naive_rotation_matrix(z_eff, q_ig)  # eq. 4
            else:
                jac = torch.eye(GROUP_DIM, dtype=torch.float64)  # eq. 1
            expected_z[i, g] = z_norm_jac.T @ (jac.T @ u[i, g])
            if method == "ste":  # eq. 2 does not detach q: the code vector gets the upstream gradient
                raw = codebook64[g, indices[i, g]].detach()
                q_jac = normalize_jacobian(raw) if distance == "cosine" else torch.eye(GROUP_DIM).double()
                expected_codebook[g, indices[i, g]] += q_jac.T @ u[i, g]
    objective = (out.quantized * upstream.to(dtype)).sum()
    got_z, *got_params = _grads(objective, [z, *lib_params])
    full_expected_z = torch.zeros(z.shape, dtype=torch.float64)
    full_expected_z.reshape(-1, DIM)[VALID] = expected_z.reshape(-1, DIM)
    _close(got_z, full_expected_z, dtype, "d quantized / d z")
    if method == "ste":
        _close(got_params[0], expected_codebook, dtype, "d quantized / d codebook")
        if distance == "euclid":  # the upstream gradient reaches z unchanged, bit for bit
            assert torch.equal(got_z, upstream.to(dtype) * (~PAD_MASK)[..., None])
    else:  # rotation and SimVQ route nothing from the output to the codebook
        assert all(torch.count_nonzero(g) == 0 for g in got_params)
    if method == "simvq":
        assert torch.equal(got_z, upstream.to(dtype) * (~PAD_MASK)[..., None])

    # Gradients of the losses (reference by autograd on the naive eq. 10).
    for name, ref_value in (("commitment", commitment), ("codebook", codebook_term)):
        got = _grads(out.losses[name], [z, *lib_params])
        expected = _grads(ref_value, [z64, *ref_params])
        for label, g_got, g_exp in zip(["z"] + ["params"] * len(lib_params), got, expected, strict=True):
            _close(g_got, g_exp, dtype, f"d {name} / d {label}")
        if name == "commitment":  # q is detached in the commitment term
            assert all(torch.count_nonzero(g) == 0 for g in got[1:])
            assert float(got[0].abs().sum()) > 0
        else:  # z is detached in the codebook term
            assert torch.count_nonzero(got[0]) == 0
            assert all(float(g.abs().sum()) > 0 for g in got[1:])


HARD_CASES = [("ste", "euclid"), ("ste", "cosine"), ("rotation", "euclid"), ("rotation", "cosine"), ("simvq", None)]


@pytest.mark.parametrize(("method", "distance"), HARD_CASES)
def test_hard_methods_match_naive_reference(method, distance):
    _check_hard(method, distance, torch.float32)


def test_simvq_basis_is_a_frozen_buffer_and_the_map_learns_from_the_codebook_loss_only():
    model = _model("simvq")
    assert model.config.distance == "euclid" and model.config.commitment_weight == 0.25
    names = dict(model.named_parameters())
    assert set(names) == {"codebook.weight", "codebook.bias"}
    assert "codebook.basis" in dict(model.named_buffers())
    assert "codebook.basis" in model.state_dict()
    basis_before = model.codebook.basis.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    z = _input(8).requires_grad_(True)
    out = model(z, PAD_MASK)
    (out.quantized.pow(2).sum() + out.loss).backward()
    assert model.codebook.basis.grad is None
    # The task gradient through the output does not reach W, b; the codebook loss does.
    grads_from_codebook_loss = torch.autograd.grad(model(z, PAD_MASK).losses["codebook"], list(names.values()))
    for p, g in zip(names.values(), grads_from_codebook_loss, strict=True):
        torch.testing.assert_close(p.grad, g)
    optimizer.step()
    assert torch.equal(model.codebook.basis, basis_before)


def test_rotation_gradient_differs_from_ste():
    """Guard: the rotation Jacobian is not the identity on this data (the two estimators are distinguishable)."""
    z = _input(9).requires_grad_(True)
    upstream = torch.randn(z.shape, generator=_gen(10))
    rot = torch.autograd.grad((_model("rotation", "none", "euclid")(z).quantized * upstream).sum(), z)[0]
    ste = torch.autograd.grad((_model("ste", "none", "euclid")(z).quantized * upstream).sum(), z)[0]
    assert not torch.allclose(rot, ste)


# --------------------------------------------------------------------------------------------------------------
# Float64 quantizers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SMOOTHING_METHODS)
def test_double_precision_model_smoothing_matches_reference(monkeypatch, method):
    """A ``.double()`` quantizer must accept float64 input and match the reference to float64 precision."""
    _check_smoothing(monkeypatch, method, "knn_ce", "cosine", torch.float64)


@pytest.mark.parametrize(("method", "distance"), [("ste", "cosine"), ("rotation", "euclid"), ("simvq", None)])
def test_double_precision_model_hard_matches_reference(method, distance):
    _check_hard(method, distance, torch.float64)


def test_float32_model_accepts_float64_input():
    model = _model("softmax", "knn_ce")
    z = _input(10, torch.float64)
    out = model(z, PAD_MASK)
    assert out.quantized.dtype == torch.float64
    reference = model(z.float(), PAD_MASK)
    assert torch.equal(out.quantized, reference.quantized.double())
    assert torch.equal(out.loss, reference.loss)


# --------------------------------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------------------------------

PADDING_CASES = [
    ("softmax", "knn_ce", None),
    ("soft_gumbel", "perplexity", None),
    ("hard_gumbel", "knn_l2", "euclid"),
    ("ste", "none", "euclid"),
    ("rotation", "none", "cosine"),
    ("simvq", "none", None),
]


def _run(model: ProductQuantizer, z: torch.Tensor, mask: torch.Tensor | None, upstream: torch.Tensor):
    z = z.clone().requires_grad_(True)
    torch.manual_seed(42)  # same Gumbel noise for every call (it depends only on the number of unpadded rows)
    out = model(z, mask, return_probs=True)
    (out.quantized * upstream).sum().add(out.loss).backward()
    return out, z.grad


@pytest.mark.parametrize("fill", [float("nan"), 1e30, -float("inf")])
@pytest.mark.parametrize(("method", "regularizer", "distance"), PADDING_CASES)
def test_padded_positions_take_no_part(method, regularizer, distance, fill):
    model = _model(method, regularizer, distance)
    z = _input(11)
    upstream = torch.randn(z.shape, generator=_gen(12))
    garbage = z.clone()
    garbage[PAD_MASK] = fill

    clean_out, clean_grad = _run(model, z, PAD_MASK, upstream)
    model.zero_grad()
    bad_out, bad_grad = _run(model, garbage, PAD_MASK, upstream)
    model.zero_grad()
    # The unpadded rows alone (no mask) give the same result: padding is exactly "not there".
    flat_out, flat_grad = _run(model, _valid_rows(z), None, _valid_rows(upstream))

    for out in (clean_out, bad_out):
        assert torch.count_nonzero(out.quantized[PAD_MASK]) == 0
        assert torch.all(out.indices[PAD_MASK] == -1)
        if out.probs is not None:
            assert torch.count_nonzero(out.probs[PAD_MASK]) == 0
    for grad in (clean_grad, bad_grad):
        assert torch.count_nonzero(grad[PAD_MASK]) == 0  # zero, not NaN
    assert torch.equal(bad_out.loss, clean_out.loss)
    assert set(bad_out.losses) == set(clean_out.losses)
    for name in clean_out.losses:
        assert torch.equal(bad_out.losses[name], clean_out.losses[name])
    assert set(bad_out.stats) == set(clean_out.stats)
    for name in clean_out.stats:
        assert torch.equal(bad_out.stats[name], clean_out.stats[name]), name
    assert torch.equal(bad_out.quantized, clean_out.quantized)
    assert torch.equal(bad_out.indices, clean_out.indices)
    assert torch.equal(bad_grad[~PAD_MASK], clean_grad[~PAD_MASK])

    torch.testing.assert_close(flat_out.loss, clean_out.loss)
    for name in clean_out.stats:
        torch.testing.assert_close(flat_out.stats[name], clean_out.stats[name])
    torch.testing.assert_close(flat_out.quantized, _valid_rows(clean_out.quantized))
    assert torch.equal(flat_out.indices, _valid_rows(clean_out.indices))
    torch.testing.assert_close(flat_grad, _valid_rows(clean_grad))


def test_padding_changes_the_knn_neighbours():
    """Guard for the test above: padded rows, were they used, would change the loss (they are strong neighbours)."""
    model = _model("softmax", "knn_ce")
    z = _input(13)
    masked = model(z, PAD_MASK).loss
    unmasked = model(z).loss
    assert not torch.allclose(masked, unmasked)


# --------------------------------------------------------------------------------------------------------------
# Autocast, schedule, state dict, training
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["softmax", "hard_gumbel", "ste", "rotation", "simvq"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_autocast_keeps_float32_computation(method, input_dtype):
    model = _model(method)
    z = _input(14).to(input_dtype)
    torch.manual_seed(1)
    reference = model(z.float(), PAD_MASK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(1)
        out = model(z, PAD_MASK)
    assert out.loss.dtype == torch.float32
    assert out.quantized.dtype == input_dtype
    assert all(v.dtype == torch.float32 for v in out.losses.values())
    assert torch.equal(out.loss, reference.loss)
    assert torch.equal(out.indices, reference.indices)
    assert torch.equal(out.quantized, reference.quantized.to(input_dtype))


def test_gumbel_temperature_schedule():
    schedule = GumbelTemperature(start=2.0, end=0.5, decay=0.9)
    model = _model("hard_gumbel", "knn_ce", gumbel_temperature=schedule)
    assert model.gumbel_temperature == 2.0
    for step in (0, 1, 3, 6, 13, 14, 100, 10_000):
        model.set_num_updates(step)
        assert model.num_updates == step
        assert model.gumbel_temperature == pytest.approx(max(2.0 * 0.9**step, 0.5), rel=1e-12)
    model.set_num_updates(100)
    assert model.gumbel_temperature == 0.5
    default = _model("soft_gumbel", "knn_ce")
    default.set_num_updates(1000)
    assert default.gumbel_temperature == 1.0
    from_dict = QuantizerConfig(dim=DIM, codebook_size=M, gumbel_temperature={"start": 3.0, "end": 1.0, "decay": 0.5})
    assert isinstance(from_dict.gumbel_temperature, GumbelTemperature)
    assert from_dict.gumbel_temperature.at(1) == 1.5


@pytest.mark.parametrize(("method", "distance"), EVAL_CASES)
def test_state_dict_round_trip(method, distance):
    source = _model(method, None, distance, seed=0)
    with torch.no_grad():  # move away from the initialisation so a fresh module cannot match by accident
        for p in source.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=_gen(15)))
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = ProductQuantizer(_config(method, None, distance))  # different random initialisation
    z = _input(16)
    source.eval()
    target.eval()
    assert not torch.equal(target(z, PAD_MASK).quantized, source(z, PAD_MASK).quantized)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    expected, got = source(z, PAD_MASK), target(z, PAD_MASK)
    assert torch.equal(got.quantized, expected.quantized)
    assert torch.equal(got.indices, expected.indices)
    assert torch.equal(got.loss, expected.loss)
    if method == "simvq":
        assert torch.equal(target.codebook.basis, source.codebook.basis)


def test_fixed_temperature_is_a_buffer_and_clamped_temperature():
    model = _model("softmax", "knn_ce", learnable_temperature=False)
    assert "logits.log_temperature" not in dict(model.named_parameters())
    assert "logits.log_temperature" in model.state_dict()
    clamped = _model("softmax", "knn_ce", min_temperature=0.05)
    with torch.no_grad():
        clamped.logits.log_temperature.fill_(math.log(1e-3))
    out = clamped(_input(17))
    torch.testing.assert_close(out.stats["temperature"], torch.full((GROUPS,), 0.05))


def test_training_reduces_knn_ce_loss():
    torch.manual_seed(0)
    model = ProductQuantizer(QuantizerConfig(dim=DIM, codebook_size=M, groups=GROUPS, knn_k=4))
    data = torch.randn(64, DIM, generator=_gen(18))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        loss = model(data).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0]
