"""Tests of :mod:`simplexvq.functional` against naive references written directly from the paper's equations.

Equation numbers refer to Morita (2025), "Pushing Toward the Simplex Vertices"
(``shared/papers/knn-simplex-vertices-morita2025.md``). Every reference below is deliberately naive: explicit Python
loops, explicit ``d x d`` matrices, explicit sorting. Each function is compared with its reference on values and on
gradients (``torch.autograd.grad`` of a random linear functional of the output with respect to every input), in
float64, on random inputs of several shapes.

Run with ``PYTHONPATH=plugin python -m pytest tests/test_functional.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from simplexvq.functional import (
    codebook_loss,
    commitment_loss,
    cosine_logits,
    euclidean_logits,
    gumbel_softmax,
    knn_loss,
    perplexity,
    perplexity_loss,
    rotation_trick,
    sample_gumbel,
    simvq_loss,
    straight_through,
    vq_loss,
)
from simplexvq.scale.knn_loss import knn_loss_scaled

DT = torch.float64
EULER_MASCHERONI = 0.5772156649015329


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = DT) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=dtype)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``sum(weight * out)`` w.r.t. ``inputs``; an input that receives no gradient gets zeros."""
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def _check_against_naive(fn, naive, inputs: list[torch.Tensor], seed: int = 0, **tol) -> list[torch.Tensor]:
    """Compare ``fn(*inputs)`` with ``naive(*inputs)`` on values and on gradients w.r.t. every input.

    Returns the reference gradients (so callers can add analytic checks on them).
    """
    inputs = [_leaf(x) for x in inputs]
    out = fn(*inputs)
    ref = naive(*inputs)
    assert out.shape == ref.shape
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, **tol)
    weight = _randn(*out.shape, gen=_gen(seed + 1000))
    got = _grads(out, inputs, weight)
    expected = _grads(ref, inputs, weight)
    # The reference must actually produce a gradient, otherwise the comparison is vacuous.
    assert any(g.abs().sum() > 0 for g in expected)
    for g_got, g_exp in zip(got, expected, strict=True):
        torch.testing.assert_close(g_got, g_exp, **tol)
    return expected


def _log_probs(shape: tuple[int, ...], seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.log_softmax(scale * _randn(*shape, gen=_gen(seed)), dim=-1)


def _mask(n: int, keep: list[int]) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[keep] = True
    return mask


# --------------------------------------------------------------------------------------------------------------
# Eq. 2: straight-through estimator
# --------------------------------------------------------------------------------------------------------------

STE_SHAPES = [(7,), (5, 3), (4, 2, 6)]


@pytest.mark.parametrize("shape", STE_SHAPES)
def test_straight_through_value_and_gradients(shape):
    gen = _gen(1)
    q = _leaf(_randn(*shape, gen=gen))
    z = _leaf(_randn(*shape, gen=gen))
    out = straight_through(q, z)
    torch.testing.assert_close(out, q.detach(), rtol=0, atol=1e-15)
    upstream = _randn(*shape, gen=gen)
    grad_q, grad_z = torch.autograd.grad((out * upstream).sum(), [q, z])
    # Eq. 1: identity Jacobian for z; eq. 2 does not detach q, so q receives the upstream gradient too.
    torch.testing.assert_close(grad_z, upstream, rtol=0, atol=0)
    torch.testing.assert_close(grad_q, upstream, rtol=0, atol=0)


def test_straight_through_detached_q_gives_vqvae_form():
    gen = _gen(2)
    q = _leaf(_randn(4, 5, gen=gen))
    z = _leaf(_randn(4, 5, gen=gen))
    upstream = _randn(4, 5, gen=gen)
    out = straight_through(q.detach(), z)
    grad_q, grad_z = torch.autograd.grad((out * upstream).sum(), [q, z], allow_unused=True)
    assert grad_q is None
    torch.testing.assert_close(grad_z, upstream, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_straight_through_value_is_exactly_q(dtype):
    """Eq. 2: ``z - detach(z)`` evaluates to zero, so the forward value is exactly ``q``.

    Uses ``|z| >> |q|`` so that evaluating ``(q + z) - detach(z)`` (instead of ``q + (z - detach(z))``) loses the
    low-order bits of ``q``.
    """
    gen = _gen(3)
    q = (0.01 * _randn(64, 8, gen=gen)).to(dtype)
    z = (100.0 * _randn(64, 8, gen=gen)).to(dtype).requires_grad_(True)
    out = straight_through(q, z)
    assert torch.equal(out, q), f"max |STE(q, z) - q| = {(out - q).abs().max().item():.3g} in {dtype}"


def test_straight_through_shape_mismatch():
    with pytest.raises(ValueError, match=r"straight_through: q has shape \(3, 4\) but z has \(3, 5\)"):
        straight_through(torch.zeros(3, 4), torch.zeros(3, 5))


# --------------------------------------------------------------------------------------------------------------
# Eq. 3-4: rotation trick
# --------------------------------------------------------------------------------------------------------------


def naive_rotation_matrix(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Footnote 1: ``R = I - 2 r_hat r_hat^T + 2 q_hat z_hat^T`` with ``r = q_hat + z_hat``, as a d x d matrix."""
    d = z.shape[0]
    z_hat = z / z.norm()
    q_hat = q / q.norm()
    r = q_hat + z_hat
    r_hat = r / r.norm()
    eye = torch.eye(d, dtype=z.dtype)
    return eye - 2.0 * torch.outer(r_hat, r_hat) + 2.0 * torch.outer(q_hat, z_hat)


def naive_rotation_trick(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``detach(|q| / |z| * R) z``, one explicit matrix-vector product per row."""
    d = z.shape[-1]
    z_rows = z.reshape(-1, d)
    q_rows = q.reshape(-1, d)
    out_rows = []
    for b in range(z_rows.shape[0]):
        zb, qb = z_rows[b], q_rows[b]
        matrix = (qb.norm() / zb.norm() * naive_rotation_matrix(zb, qb)).detach()
        out_rows.append(matrix @ zb)
    return torch.stack(out_rows).reshape(z.shape)


ROT_SHAPES = [(3,), (5, 4), (3, 2, 6), (2, 2, 2, 3)]


@pytest.mark.parametrize("shape", ROT_SHAPES)
def test_rotation_trick_matches_naive(shape):
    gen = _gen(10)
    z = _randn(*shape, gen=gen)
    q = 2.0 * _randn(*shape, gen=gen)
    expected = _check_against_naive(rotation_trick, naive_rotation_trick, [z, q], seed=10)
    assert torch.count_nonzero(expected[1]) == 0  # the reference itself routes nothing to q


@pytest.mark.parametrize("shape", ROT_SHAPES)
def test_rotation_trick_value_is_q(shape):
    gen = _gen(11)
    z = _randn(*shape, gen=gen)
    q = 3.0 * _randn(*shape, gen=gen)
    torch.testing.assert_close(rotation_trick(z, q), q)


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 4)])
def test_rotation_trick_jacobian_is_scaled_rotation(shape):
    """Eq. 4: ``d RE / d z = |q| / |z| * R`` per row, and rows do not interact."""
    gen = _gen(12)
    z = _randn(*shape, gen=gen)
    q = 0.5 * _randn(*shape, gen=gen)
    d = shape[-1]
    jac = torch.autograd.functional.jacobian(lambda zz: rotation_trick(zz, q), z)
    rows = z.numel() // d
    jac = jac.reshape(rows, d, rows, d)
    z_rows, q_rows = z.reshape(rows, d), q.reshape(rows, d)
    for b in range(rows):
        zb, qb = z_rows[b], q_rows[b]
        scale = qb.norm() / zb.norm()
        rot = naive_rotation_matrix(zb, qb)
        torch.testing.assert_close(jac[b, :, b, :], scale * rot)
        # The implementation's Jacobian is a scaled orthogonal matrix mapping z to q.
        torch.testing.assert_close(jac[b, :, b, :] @ jac[b, :, b, :].T, scale**2 * torch.eye(d, dtype=DT))
        torch.testing.assert_close(jac[b, :, b, :] @ zb, qb)
        for c in range(rows):
            if c != b:
                assert torch.count_nonzero(jac[b, :, c, :]) == 0


@pytest.mark.parametrize("d", [2, 3, 8])
def test_naive_rotation_matrix_is_a_rotation_aligning_z_to_q(d):
    """Sanity of the reference itself: R is orthogonal with det +1 and R z_hat = q_hat."""
    gen = _gen(13)
    for _ in range(5):
        z = _randn(d, gen=gen)
        q = _randn(d, gen=gen)
        rot = naive_rotation_matrix(z, q)
        torch.testing.assert_close(rot @ rot.T, torch.eye(d, dtype=DT))
        torch.testing.assert_close(torch.linalg.det(rot), torch.tensor(1.0, dtype=DT))
        torch.testing.assert_close(rot @ (z / z.norm()), q / q.norm())


def test_rotation_trick_q_gets_no_gradient():
    gen = _gen(14)
    z = _leaf(_randn(6, 5, gen=gen))
    q = _leaf(_randn(6, 5, gen=gen))
    out = rotation_trick(z, q)
    grad_z, grad_q = torch.autograd.grad((out * _randn(6, 5, gen=gen)).sum(), [z, q], allow_unused=True)
    assert grad_q is None or torch.count_nonzero(grad_q) == 0
    assert grad_z is not None and torch.count_nonzero(grad_z) > 0


def test_rotation_trick_parallel_is_pure_scaling():
    """q = c z (c > 0): R = I, so the Jacobian is c * I (analytic)."""
    gen = _gen(15)
    z = _randn(3, 4, gen=gen)
    q = 2.5 * z
    jac = torch.autograd.functional.jacobian(lambda zz: rotation_trick(zz, q), z).reshape(12, 12)
    torch.testing.assert_close(jac, 2.5 * torch.eye(12, dtype=DT))
    torch.testing.assert_close(rotation_trick(z, q), q)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("c", [1.0, 2.0, 3.0, 0.7])
def test_rotation_trick_antipodal_returns_q(c, dtype):
    """q = -c z: r = q_hat + z_hat vanishes; the value must still be q."""
    z = _randn(16, 8, gen=_gen(16)).to(dtype)
    q = -c * z
    out = rotation_trick(z, q)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, q)


def test_rotation_trick_shape_mismatch():
    with pytest.raises(ValueError, match=r"rotation_trick: z has shape \(2, 3\) but q has \(2, 4\)"):
        rotation_trick(torch.ones(2, 3), torch.ones(2, 4))


# --------------------------------------------------------------------------------------------------------------
# Appendix A.1: logits
# --------------------------------------------------------------------------------------------------------------


def naive_cosine_logits(z, codebook, temperature):
    n_pos, groups, _ = z.shape
    entries = codebook.shape[1]
    rows = []
    for n in range(n_pos):
        per_group = []
        for g in range(groups):
            zn = z[n, g]
            per_entry = []
            for m in range(entries):
                c = codebook[g, m]
                cosine = (zn * c).sum() / (zn.norm() * c.norm())
                per_entry.append(cosine / temperature[g])
            per_group.append(torch.stack(per_entry))
        rows.append(torch.stack(per_group))
    return torch.stack(rows)


def naive_euclidean_logits(z, codebook, temperature):
    n_pos, groups, _ = z.shape
    entries = codebook.shape[1]
    rows = []
    for n in range(n_pos):
        per_group = []
        for g in range(groups):
            per_entry = [-((z[n, g] - codebook[g, m]) ** 2).sum() / temperature[g] for m in range(entries)]
            per_group.append(torch.stack(per_entry))
        rows.append(torch.stack(per_group))
    return torch.stack(rows)


LOGIT_SHAPES = [(3, 1, 4, 5), (4, 2, 3, 6), (2, 3, 5, 4)]  # (N, G, M, d)


def _logit_inputs(shape, seed):
    n_pos, groups, entries, d = shape
    gen = _gen(seed)
    z = _randn(n_pos, groups, d, gen=gen)
    codebook = _randn(groups, entries, d, gen=gen)
    temperature = 0.2 + torch.rand(groups, generator=gen, dtype=DT)
    return z, codebook, temperature


@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize(
    ("fn", "naive"), [(cosine_logits, naive_cosine_logits), (euclidean_logits, naive_euclidean_logits)]
)
def test_logits_match_naive(shape, fn, naive):
    z, codebook, temperature = _logit_inputs(shape, seed=20)
    expected = _check_against_naive(fn, naive, [z, codebook, temperature], seed=20)
    # Every input, temperature included, receives a gradient.
    for g in expected:
        assert torch.count_nonzero(g) > 0


@pytest.mark.parametrize(
    ("fn", "naive"), [(cosine_logits, naive_cosine_logits), (euclidean_logits, naive_euclidean_logits)]
)
def test_logits_temperature_gradient_is_analytic(fn, naive):
    """d(logit)/d(tau_g) = -logit / tau_g, summed over the entries and positions of group g."""
    z, codebook, temperature = _logit_inputs((4, 3, 5, 3), seed=21)
    tau = _leaf(temperature)
    logits = fn(z, codebook, tau)
    weight = _randn(*logits.shape, gen=_gen(22))
    (grad_tau,) = torch.autograd.grad((weight * logits).sum(), [tau])
    expected = -(weight * logits.detach()).sum(dim=(0, 2)) / temperature
    torch.testing.assert_close(grad_tau, expected)


@pytest.mark.parametrize(("fn", "shape"), [(cosine_logits, (3, 2, 4, 3)), (euclidean_logits, (2, 2, 3, 4))])
def test_logits_gradcheck(fn, shape):
    z, codebook, temperature = _logit_inputs(shape, seed=23)
    assert torch.autograd.gradcheck(fn, (_leaf(z), _leaf(codebook), _leaf(temperature)))


def test_cosine_logits_scale_invariant_and_bounded():
    z, codebook, temperature = _logit_inputs((5, 2, 4, 3), seed=24)
    base = cosine_logits(z, codebook, temperature)
    scaled = cosine_logits(3.0 * z, 0.25 * codebook, temperature)
    torch.testing.assert_close(base, scaled)
    assert (base.abs() <= 1.0 / temperature[:, None] + 1e-12).all()
    # A code vector parallel to z gives the maximal logit 1 / tau.
    codebook = codebook.clone()
    codebook[1, 2] = 4.0 * z[0, 1]
    logits = cosine_logits(z, codebook, temperature)
    torch.testing.assert_close(logits[0, 1, 2], 1.0 / temperature[1])


# --------------------------------------------------------------------------------------------------------------
# Eq. 6-8: Gumbel-softmax
# --------------------------------------------------------------------------------------------------------------


def naive_gumbel_soft(log_pi, temperature, gumbels, dim=-1):
    """Eq. 7: ``p_m = exp((g_m + log pi_m) / tau) / sum_m' exp((g_m' + log pi_m') / tau)``, one row at a time."""
    x = log_pi.movedim(dim, -1)
    g = gumbels.movedim(dim, -1)
    entries = x.shape[-1]
    x_rows = x.reshape(-1, entries)
    g_rows = g.reshape(-1, entries)
    out_rows = []
    for b in range(x_rows.shape[0]):
        numerators = [torch.exp((g_rows[b, m] + x_rows[b, m]) / temperature) for m in range(entries)]
        denominator = sum(numerators)
        out_rows.append(torch.stack([num / denominator for num in numerators]))
    return torch.stack(out_rows).reshape(x.shape).movedim(-1, dim)


def naive_onehot_argmax(log_pi, gumbels, dim=-1):
    """Eq. 6: the onehot vector at ``argmax_m (g_m + log pi_m)``, via an explicit loop."""
    x = (log_pi + gumbels).detach().movedim(dim, -1)
    entries = x.shape[-1]
    rows = x.reshape(-1, entries)
    out = torch.zeros_like(rows)
    for b in range(rows.shape[0]):
        values = rows[b].tolist()
        out[b, max(range(entries), key=lambda m: values[m])] = 1.0
    return out.reshape(x.shape).movedim(-1, dim)


def _gumbel_noise(shape, gen):
    u = torch.rand(*shape, generator=gen, dtype=DT).clamp(1e-12, 1 - 1e-12)
    return -torch.log(-torch.log(u))


GUMBEL_CASES = [((5, 7), -1), ((4, 3, 6), -1), ((4, 6, 3), 1), ((6, 5), 0)]


@pytest.mark.parametrize(("shape", "dim"), GUMBEL_CASES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_gumbel_soft_matches_eq7(shape, dim, temperature):
    gen = _gen(30)
    log_pi = torch.log_softmax(_randn(*shape, gen=gen), dim=dim)
    gumbels = _gumbel_noise(shape, gen)
    _check_against_naive(
        lambda lp: gumbel_softmax(lp, temperature, gumbels=gumbels, dim=dim),
        lambda lp: naive_gumbel_soft(lp, temperature, gumbels, dim=dim),
        [log_pi],
        seed=30,
    )


@pytest.mark.parametrize(("shape", "dim"), GUMBEL_CASES)
def test_gumbel_soft_tensor_temperature_gets_gradient(shape, dim):
    gen = _gen(31)
    log_pi = _randn(*shape, gen=gen)
    gumbels = _gumbel_noise(shape, gen)
    tau = torch.tensor(0.7, dtype=DT)
    expected = _check_against_naive(
        lambda lp, t: gumbel_softmax(lp, t, gumbels=gumbels, dim=dim),
        lambda lp, t: naive_gumbel_soft(lp, t, gumbels, dim=dim),
        [log_pi, tau],
        seed=31,
    )
    assert expected[1] != 0


def test_gumbel_soft_gradcheck():
    gen = _gen(32)
    log_pi = _leaf(_randn(3, 5, gen=gen))
    tau = _leaf(torch.tensor(0.8, dtype=DT))
    gumbels = _gumbel_noise((3, 5), gen)
    assert torch.autograd.gradcheck(lambda lp, t: gumbel_softmax(lp, t, gumbels=gumbels), (log_pi, tau))


def test_gumbel_soft_unnormalised_logits_shift_invariant():
    gen = _gen(33)
    log_pi = _randn(6, 4, gen=gen)
    gumbels = _gumbel_noise((6, 4), gen)
    shift = _randn(6, 1, gen=gen)
    torch.testing.assert_close(
        gumbel_softmax(log_pi + shift, 0.9, gumbels=gumbels), gumbel_softmax(log_pi, 0.9, gumbels=gumbels)
    )
    soft = gumbel_softmax(log_pi, 0.9, gumbels=gumbels)
    torch.testing.assert_close(soft.sum(-1), torch.ones(6, dtype=DT))


@pytest.mark.parametrize(("shape", "dim"), GUMBEL_CASES)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_gumbel_hard_forward_onehot_and_soft_gradient(shape, dim, temperature):
    """Eq. 6 forward (onehot at argmax(g + log pi)), eq. 8 backward (gradient of the soft sample, eq. 7)."""
    gen = _gen(34)
    log_pi = _leaf(torch.log_softmax(_randn(*shape, gen=gen), dim=dim))
    tau = _leaf(torch.tensor(temperature, dtype=DT))
    gumbels = _gumbel_noise(shape, gen)
    hard = gumbel_softmax(log_pi, tau, hard=True, gumbels=gumbels, dim=dim)
    onehot = naive_onehot_argmax(log_pi, gumbels, dim=dim)
    torch.testing.assert_close(hard, onehot, rtol=0, atol=1e-15)
    assert torch.equal(hard.detach().argmax(dim=dim), onehot.argmax(dim=dim))
    soft_ref = naive_gumbel_soft(log_pi, tau, gumbels, dim=dim)
    weight = _randn(*shape, gen=gen)
    got = _grads(hard, [log_pi, tau], weight)
    expected = _grads(soft_ref, [log_pi, tau], weight)
    assert torch.count_nonzero(expected[0]) > 0
    for g_got, g_exp in zip(got, expected, strict=True):
        torch.testing.assert_close(g_got, g_exp)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gumbel_hard_forward_is_exactly_onehot(dtype):
    """Eq. 6/8: ``p - detach(p)`` is zero, so the hard forward value is exactly the onehot vector (entries 0/1)."""
    gen = _gen(35)
    log_pi = _randn(256, 16, gen=gen).to(dtype).requires_grad_(True)
    gumbels = _gumbel_noise((256, 16), gen).to(dtype)
    hard = gumbel_softmax(log_pi, 1.0, hard=True, gumbels=gumbels)
    onehot = naive_onehot_argmax(log_pi, gumbels)
    assert torch.equal(hard.detach(), onehot), f"max |hard - onehot| = {(hard - onehot).abs().max().item():.3g}"


def test_sample_gumbel_distribution():
    """Standard Gumbel: mean = Euler-Mascheroni constant, variance = pi^2 / 6, CDF exp(-exp(-x))."""
    torch.manual_seed(1234)
    like = torch.full((200_000,), 7.0, dtype=DT)
    g = sample_gumbel(like)
    assert g.shape == like.shape and g.dtype == like.dtype
    assert (like == 7.0).all()  # the template is not modified
    assert torch.isfinite(g).all()
    # Standard errors: mean ~0.0029, variance ~0.0077, CDF ~0.0011; tolerances are ~5 standard errors.
    assert abs(g.mean().item() - EULER_MASCHERONI) < 0.015
    assert abs(g.var().item() - math.pi**2 / 6) < 0.04
    for x in (-1.0, 0.0, 1.0, 2.5):
        empirical = (g <= x).double().mean().item()
        assert abs(empirical - math.exp(-math.exp(-x))) < 0.006
    # Fresh noise on every call.
    assert not torch.equal(sample_gumbel(like[:100]), sample_gumbel(like[:100]))


def test_gumbel_softmax_default_noise_uses_sample_gumbel():
    log_pi = _randn(8, 5, gen=_gen(36))
    torch.manual_seed(99)
    sampled = gumbel_softmax(log_pi, 0.5)
    torch.manual_seed(99)
    gumbels = sample_gumbel(log_pi)
    torch.testing.assert_close(sampled, naive_gumbel_soft(log_pi, 0.5, gumbels))


# --------------------------------------------------------------------------------------------------------------
# Eq. 13: KNN regularizer
# --------------------------------------------------------------------------------------------------------------


def naive_knn_loss(log_probs, k, distance, mask=None):
    """Eq. 13: ``(MK)^-1 sum_m sum_k D(e_m, p^(m,k))``, per group, averaged over groups.

    For each vertex ``e_m`` the deviations ``D(e_m, p_n)`` of the kept rows are sorted explicitly and the K smallest
    are summed. ``D`` is the cross-entropy ``-log p_m`` or the squared L2 distance ``|e_m - p|^2``.
    """
    lp = log_probs if log_probs.dim() == 3 else log_probs.unsqueeze(1)
    n_pos, groups, entries = lp.shape
    rows = [n for n in range(n_pos) if mask is None or bool(mask[n])]
    group_losses = []
    for g in range(groups):
        total = 0.0
        for m in range(entries):
            vertex = torch.zeros(entries, dtype=lp.dtype)
            vertex[m] = 1.0
            deviations = []
            for n in rows:
                if distance == "ce":
                    deviations.append(-lp[n, g, m])
                else:
                    p = torch.exp(lp[n, g])
                    deviations.append(sum((vertex[j] - p[j]) ** 2 for j in range(entries)))
            order = sorted(range(len(deviations)), key=lambda i: deviations[i].item())
            total = total + sum(deviations[i] for i in order[:k])
        group_losses.append(total / (entries * k))
    return sum(group_losses) / groups


KNN_SHAPES = [(6, 4), (7, 2, 5), (5, 3, 3)]


def _knn_case(shape, k_spec, masked):
    n_pos = shape[0]
    mask = _mask(n_pos, [0, 2, 3, n_pos - 1]) if masked else None
    kept = n_pos if mask is None else int(mask.sum())
    k = {"one": 1, "mid": 2, "all": kept}[k_spec]
    return mask, k


@pytest.mark.parametrize("shape", KNN_SHAPES)
@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("k_spec", ["one", "mid", "all"])
@pytest.mark.parametrize("masked", [False, True])
def test_knn_loss_matches_naive(shape, distance, k_spec, masked):
    mask, k = _knn_case(shape, k_spec, masked)
    log_probs = _log_probs(shape, seed=40)
    expected = _check_against_naive(
        lambda lp: knn_loss(lp, k, distance, mask=mask),
        lambda lp: naive_knn_loss(lp, k, distance, mask=mask),
        [log_probs],
        seed=40,
    )
    if mask is not None:
        assert torch.count_nonzero(expected[0][~mask]) == 0  # padding gets no gradient


@pytest.mark.parametrize("distance", ["ce", "l2"])
@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3)])
def test_knn_loss_gradcheck(distance, shape):
    log_probs = _leaf(_log_probs(shape, seed=41))
    mask = _mask(shape[0], [0, 1, 3])
    assert torch.autograd.gradcheck(lambda lp: knn_loss(lp, 2, distance, mask=mask), (log_probs,))


def test_knn_loss_ce_with_k_equal_n_is_mean_cross_entropy():
    """K = N selects every row, so eq. 13 with D = CE is the mean of -log p over all rows, entries and groups."""
    log_probs = _log_probs((6, 3, 4), seed=42)
    torch.testing.assert_close(knn_loss(log_probs, 6, "ce"), (-log_probs).mean())


def test_knn_loss_mask_ignores_padding_values():
    shape = (7, 2, 4)
    mask = _mask(7, [1, 2, 4, 5])
    log_probs = _log_probs(shape, seed=43)
    garbage = log_probs.clone()
    garbage[~mask] = 50.0  # huge "log-probabilities" that would dominate if padding were used
    for distance in ("ce", "l2"):
        torch.testing.assert_close(knn_loss(garbage, 3, distance, mask=mask), knn_loss(log_probs[mask], 3, distance))


def test_knn_loss_analytic_vertices():
    """One exact onehot row per vertex: every vertex has a neighbour at distance 0 (K = 1).

    A collapsed batch (every row e_0): vertex 0 is at distance 0, every other vertex at |e_m - e_0|^2 = 2.
    """
    entries = 4
    covering = torch.log(torch.eye(entries, dtype=DT))[torch.tensor([2, 0, 3, 1, 0])]
    assert knn_loss(covering, 1, "ce").item() == 0.0
    assert knn_loss(covering, 1, "l2").item() == 0.0
    collapsed = torch.log(torch.eye(entries, dtype=DT))[torch.zeros(5, dtype=torch.long)]
    torch.testing.assert_close(knn_loss(collapsed, 1, "l2"), torch.tensor(2.0 * (entries - 1) / entries, dtype=DT))
    torch.testing.assert_close(knn_loss(collapsed, 5, "l2"), torch.tensor(2.0 * (entries - 1) / entries, dtype=DT))
    # Uniform rows: CE = log M for every pair, L2 = 1 - 2/M + 1/M = 1 - 1/M.
    uniform = torch.full((3, 2, entries), -math.log(entries), dtype=DT)
    torch.testing.assert_close(knn_loss(uniform, 2, "ce"), torch.tensor(math.log(entries), dtype=DT))
    torch.testing.assert_close(knn_loss(uniform, 2, "l2"), torch.tensor(1.0 - 1.0 / entries, dtype=DT))


def test_knn_loss_k_larger_than_n():
    with pytest.raises(ValueError, match=r"k=5.*N=3"):
        knn_loss(_log_probs((3, 4), seed=44), 5)
    # N counts the unpadded rows only.
    with pytest.raises(ValueError, match=r"k=3.*N=2"):
        knn_loss(_log_probs((6, 2, 4), seed=44), 3, mask=_mask(6, [1, 4]))


@pytest.mark.parametrize("k", [0, -1, True, 2.0, None])
def test_knn_loss_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be a positive integer"):
        knn_loss(_log_probs((5, 4), seed=45), k)


def test_knn_loss_bad_distance():
    with pytest.raises(ValueError, match=r"distance must be 'ce' or 'l2', got 'cosine'"):
        knn_loss(_log_probs((5, 4), seed=46), 2, "cosine")


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5)])
def test_knn_loss_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"knn_loss: log_probs must have shape \(N, M\) or \(N, G, M\)"):
        knn_loss(torch.zeros(*shape, dtype=DT), 1)


@pytest.mark.parametrize(
    "mask",
    [
        torch.ones(6, dtype=torch.bool),  # wrong length
        torch.ones(5, dtype=torch.long),  # wrong dtype
        torch.ones(5, dtype=DT),  # wrong dtype
        torch.ones(5, 1, dtype=torch.bool),  # wrong rank
    ],
)
def test_knn_loss_bad_mask(mask):
    with pytest.raises(ValueError, match=r"knn_loss: mask must be a bool tensor of shape \(5,\)"):
        knn_loss(_log_probs((5, 2, 4), seed=47), 2, mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Eq. 11-12: perplexity
# --------------------------------------------------------------------------------------------------------------


def naive_perplexity_1d(p):
    entropy = 0.0
    for m in range(p.shape[0]):
        if p[m] > 0:
            entropy = entropy - p[m] * torch.log(p[m])
    return torch.exp(entropy) if torch.is_tensor(entropy) else torch.tensor(math.exp(entropy), dtype=p.dtype)


def naive_perplexity(probs, dim=-1):
    x = probs.movedim(dim, -1)
    rows = x.reshape(-1, x.shape[-1])
    return torch.stack([naive_perplexity_1d(rows[b]) for b in range(rows.shape[0])]).reshape(x.shape[:-1])


def naive_perplexity_loss(probs, mask=None):
    """Eq. 12 mean probabilities, eq. 11 perplexity, as ``mean_g (M - ppl_g) / M``, with explicit loops."""
    pr = probs if probs.dim() == 3 else probs.unsqueeze(1)
    n_pos, groups, entries = pr.shape
    rows = [n for n in range(n_pos) if mask is None or bool(mask[n])]
    losses = []
    for g in range(groups):
        mean_probs = []
        for m in range(entries):
            total = 0.0
            for n in rows:
                total = total + pr[n, g, m]
            mean_probs.append(total / len(rows))
        ppl = naive_perplexity_1d(torch.stack(mean_probs))
        losses.append((entries - ppl) / entries)
    return sum(losses) / groups


@pytest.mark.parametrize(("shape", "dim"), [((6,), -1), ((4, 5), -1), ((3, 4, 2), 1), ((5, 3), 0)])
def test_perplexity_matches_naive(shape, dim):
    probs = torch.softmax(_randn(*shape, gen=_gen(50)), dim=dim)
    _check_against_naive(lambda p: perplexity(p, dim=dim), lambda p: naive_perplexity(p, dim=dim), [probs], seed=50)


def test_perplexity_analytic():
    entries = 6
    uniform = torch.full((entries,), 1.0 / entries, dtype=DT)
    torch.testing.assert_close(perplexity(uniform), torch.tensor(float(entries), dtype=DT))
    onehot = torch.eye(entries, dtype=DT)
    out = perplexity(onehot)  # 0 log 0 = 0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.ones(entries, dtype=DT))
    half = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=DT)
    torch.testing.assert_close(perplexity(half), torch.tensor(2.0, dtype=DT))


@pytest.mark.parametrize("shape", [(6, 4), (7, 3, 5), (5, 2, 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_perplexity_loss_matches_naive(shape, masked):
    probs = torch.softmax(2.0 * _randn(*shape, gen=_gen(51)), dim=-1)
    mask = _mask(shape[0], [0, 1, 3]) if masked else None
    expected = _check_against_naive(
        lambda p: perplexity_loss(p, mask=mask), lambda p: naive_perplexity_loss(p, mask=mask), [probs], seed=51
    )
    if mask is not None:
        assert torch.count_nonzero(expected[0][~mask]) == 0


@pytest.mark.parametrize("masked", [False, True])
def test_perplexity_loss_gradcheck(masked):
    probs = _leaf(torch.softmax(_randn(5, 2, 4, gen=_gen(52)), dim=-1))
    mask = _mask(5, [1, 2, 4]) if masked else None
    assert torch.autograd.gradcheck(lambda p: perplexity_loss(p, mask=mask), (probs,))


def test_perplexity_loss_analytic():
    entries = 4
    # Each row onehot, every code used equally: mean probs uniform, ppl = M, loss 0.
    balanced = torch.eye(entries, dtype=DT).repeat(2, 1)
    torch.testing.assert_close(perplexity_loss(balanced), torch.tensor(0.0, dtype=DT))
    # Uniform rows give the same (eq. 11 cannot tell them from onehot rows, as section 2.3 notes).
    uniform = torch.full((5, entries), 1.0 / entries, dtype=DT)
    torch.testing.assert_close(perplexity_loss(uniform), torch.tensor(0.0, dtype=DT))
    # Collapsed: ppl = 1, loss (M - 1) / M.
    collapsed = torch.eye(entries, dtype=DT)[torch.zeros(5, dtype=torch.long)]
    torch.testing.assert_close(perplexity_loss(collapsed), torch.tensor((entries - 1) / entries, dtype=DT))
    # Two groups, one balanced and one collapsed: average of the two.
    collapsed_8 = torch.eye(entries, dtype=DT)[torch.zeros(8, dtype=torch.long)]
    grouped = torch.stack([balanced, collapsed_8], dim=1)
    torch.testing.assert_close(perplexity_loss(grouped), torch.tensor((entries - 1) / entries / 2, dtype=DT))


def test_perplexity_loss_mask_ignores_padding_values():
    probs = torch.softmax(_randn(6, 2, 3, gen=_gen(53)), dim=-1)
    mask = _mask(6, [0, 2, 5])
    garbage = probs.clone()
    garbage[~mask] = float("nan")
    out = perplexity_loss(garbage, mask=mask)
    torch.testing.assert_close(out, perplexity_loss(probs[mask]))


def test_perplexity_loss_empty_after_mask():
    with pytest.raises(ValueError, match=r"perplexity_loss: no positions to average over"):
        perplexity_loss(torch.full((4, 3), 1.0 / 3, dtype=DT), mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"perplexity_loss: no positions to average over"):
        perplexity_loss(torch.zeros(0, 2, 3, dtype=DT))


def test_perplexity_loss_bad_shapes():
    with pytest.raises(ValueError, match=r"perplexity_loss: probs must have shape \(N, M\) or \(N, G, M\)"):
        perplexity_loss(torch.full((3,), 1.0 / 3, dtype=DT))
    with pytest.raises(ValueError, match=r"perplexity_loss: mask must be a bool tensor of shape \(4,\)"):
        perplexity_loss(torch.full((4, 3), 1.0 / 3, dtype=DT), mask=torch.ones(3, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------------------
# Eq. 10: commitment and codebook losses; SimVQ's variant
# --------------------------------------------------------------------------------------------------------------


def naive_mean_squared_norm(a, b):
    """``R^-1 sum_i |a_i - b_i|^2`` over the R rows (all leading dims), with an explicit double loop."""
    d = a.shape[-1]
    a_rows, b_rows = a.reshape(-1, d), b.reshape(-1, d)
    total = 0.0
    for i in range(a_rows.shape[0]):
        for j in range(d):
            total = total + (a_rows[i, j] - b_rows[i, j]) ** 2
    return total / a_rows.shape[0]


def naive_commitment(z, q):
    return naive_mean_squared_norm(z, q.detach())


def naive_codebook(z, q):
    return naive_mean_squared_norm(z.detach(), q)


def naive_vq(z, q, beta):
    return beta * naive_commitment(z, q) + naive_codebook(z, q)


def naive_simvq(z, q, beta):
    zf, qf = z.reshape(-1), q.reshape(-1)
    commit, code = 0.0, 0.0
    for i in range(zf.shape[0]):
        commit = commit + (qf[i].detach() - zf[i]) ** 2
        code = code + (qf[i] - zf[i].detach()) ** 2
    return beta * commit / zf.shape[0] + code / zf.shape[0]


VQ_SHAPES = [(5, 4), (3, 2, 6), (2, 3, 2, 3)]


def _zq(shape, seed):
    gen = _gen(seed)
    return _randn(*shape, gen=gen), _randn(*shape, gen=gen)


@pytest.mark.parametrize("shape", VQ_SHAPES)
def test_commitment_loss_matches_naive_and_routes_to_z(shape):
    z, q = _zq(shape, seed=60)
    grad_z, grad_q = _check_against_naive(commitment_loss, naive_commitment, [z, q], seed=60)
    rows = z.numel() // shape[-1]
    assert torch.count_nonzero(grad_q) == 0
    weight = _randn(gen=_gen(1060))  # the scalar weight _check_against_naive used
    torch.testing.assert_close(grad_z, weight * 2.0 * (z - q) / rows)
    # The implementation's gradient w.r.t. q is exactly absent / zero as well.
    zl, ql = _leaf(z), _leaf(q)
    g = torch.autograd.grad(commitment_loss(zl, ql), [ql], allow_unused=True)[0]
    assert g is None or torch.count_nonzero(g) == 0


@pytest.mark.parametrize("shape", VQ_SHAPES)
def test_codebook_loss_matches_naive_and_routes_to_q(shape):
    z, q = _zq(shape, seed=61)
    grad_z, grad_q = _check_against_naive(codebook_loss, naive_codebook, [z, q], seed=61)
    rows = z.numel() // shape[-1]
    assert torch.count_nonzero(grad_z) == 0
    weight = _randn(gen=_gen(1061))
    torch.testing.assert_close(grad_q, weight * 2.0 * (q - z) / rows)
    zl, ql = _leaf(z), _leaf(q)
    g = torch.autograd.grad(codebook_loss(zl, ql), [zl], allow_unused=True)[0]
    assert g is None or torch.count_nonzero(g) == 0


@pytest.mark.parametrize("shape", VQ_SHAPES)
@pytest.mark.parametrize("beta", [0.25, 1.0, 2.0])
def test_vq_loss_matches_naive(shape, beta):
    z, q = _zq(shape, seed=62)
    grad_z, grad_q = _check_against_naive(
        lambda a, b: vq_loss(a, b, beta), lambda a, b: naive_vq(a, b, beta), [z, q], seed=62
    )
    rows = z.numel() // shape[-1]
    weight = _randn(gen=_gen(1062))
    # Commitment (times beta) reaches only z; codebook reaches only q.
    torch.testing.assert_close(grad_z, weight * beta * 2.0 * (z - q) / rows)
    torch.testing.assert_close(grad_q, weight * 2.0 * (q - z) / rows)


def test_vq_loss_default_beta_is_one():
    z, q = _zq((4, 3), seed=63)
    torch.testing.assert_close(vq_loss(z, q), commitment_loss(z, q) + codebook_loss(z, q))
    torch.testing.assert_close(vq_loss(z, q), naive_vq(z, q, 1.0))


def test_commitment_codebook_gradcheck():
    z, q = _zq((4, 2, 3), seed=64)
    assert torch.autograd.gradcheck(lambda a: commitment_loss(a, q), (_leaf(z),))
    assert torch.autograd.gradcheck(lambda b: codebook_loss(z, b), (_leaf(q),))


@pytest.mark.parametrize("shape", VQ_SHAPES)
@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_simvq_loss_matches_naive(shape, beta):
    z, q = _zq(shape, seed=65)
    grad_z, grad_q = _check_against_naive(
        lambda a, b: simvq_loss(a, b, beta), lambda a, b: naive_simvq(a, b, beta), [z, q], seed=65
    )
    weight = _randn(gen=_gen(1065))
    torch.testing.assert_close(grad_z, weight * beta * 2.0 * (z - q) / z.numel())
    torch.testing.assert_close(grad_q, weight * 2.0 * (q - z) / z.numel())
    # Averaging over elements instead of summing over the last dim: a factor d from eq. 10's form.
    torch.testing.assert_close(simvq_loss(z, q, beta) * shape[-1], vq_loss(z, q, beta))


def test_simvq_loss_default_beta():
    z, q = _zq((5, 3), seed=66)
    torch.testing.assert_close(simvq_loss(z, q), naive_simvq(z, q, 0.25))


@pytest.mark.parametrize("chunk_size", [None, 1, 2])
def test_knn_loss_selects_real_rows_over_empty_slots_at_infinite_deviation(chunk_size):
    """A selected cross-entropy term may be +inf (a row with probability exactly 0 for that code): it is still a
    real row and gets its gradient, in the dense and the streamed search alike (an empty slot of the streamed top-K
    must never win the tie against it)."""
    log_probs = torch.tensor([[0.0, -math.inf], [math.log(0.5), math.log(0.5)]], dtype=DT, requires_grad=True)
    if chunk_size is None:
        loss = knn_loss(log_probs, 2, "ce")
    else:
        loss = knn_loss_scaled(log_probs, 2, "ce", chunk_size=chunk_size)
    assert loss.item() == math.inf
    (grad,) = torch.autograd.grad(loss, log_probs)
    torch.testing.assert_close(grad, torch.full((2, 2), -0.25, dtype=DT))
