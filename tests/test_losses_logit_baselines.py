"""DIST and logit-standardized (z-score) KD/DKD: references from the papers, gradients, numerics, bad input.

The references below are written from the papers' formulas (DIST: Huang et al., NeurIPS 2022;
logit standardization: Sun et al., CVPR 2024; DKD: Zhao et al., CVPR 2022) with explicit loops and
plain autograd; they share no code with ``nkd.losses``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from nkd.losses import (
    LOSSES,
    DISTLoss,
    DKDZScoreLoss,
    KDZScoreLoss,
    dist_loss,
    dkd_zscore_loss,
    kd_zscore_loss,
    standardize_logits,
)
from tensors import D, grad_of, labels, mixed, rand


# ----------------------------------------------------------------------------- references
def ref_pearson(a, b, eps=1e-8):
    """Pearson correlation of two 1-D tensors as the authors write it: cosine of the centred vectors."""
    n = a.shape[0]
    ma = sum(a[i] for i in range(n)) / n
    mb = sum(b[i] for i in range(n)) / n
    num = sum((a[i] - ma) * (b[i] - mb) for i in range(n))
    na = torch.sqrt(sum((a[i] - ma) ** 2 for i in range(n)))
    nb = torch.sqrt(sum((b[i] - mb) ** 2 for i in range(n)))
    return num / (na * nb + eps)


def ref_dist(z, u, t=None, beta=1.0, gamma=1.0, tau=1.0, ignore_index=-100):
    """DIST (paper eq. for L_inter, L_intra) on the rows whose label is not ignore_index; z, u [N, C]."""
    rows = [r for r in range(z.shape[0]) if t is None or t.dim() == 2 or int(t[r]) != ignore_index]
    if not rows:
        return torch.zeros((), dtype=z.dtype)
    ys = torch.stack([F.softmax(z[r] / tau, 0) for r in rows])
    yt = torch.stack([F.softmax(u[r].detach() / tau, 0) for r in rows])
    m, c = ys.shape
    inter = 1 - sum(ref_pearson(ys[i], yt[i]) for i in range(m)) / m
    intra = 1 - sum(ref_pearson(ys[:, j], yt[:, j]) for j in range(c)) / c
    return tau**2 * (beta * inter + gamma * intra)


def ref_zscore(x, eps=1e-7):
    """Row z-score with the unbiased standard deviation, written out."""
    c = x.shape[0]
    mean = sum(x[i] for i in range(c)) / c
    std = torch.sqrt(sum((x[i] - mean) ** 2 for i in range(c)) / (c - 1))
    return (x - mean) / (eps + std)


def ref_kd_zscore(z, u, tau=2.0):
    """Per-row τ²·KL(softmax(ũ/τ) ‖ softmax(z̃/τ)) on z-scored rows."""
    out = []
    for r in range(z.shape[0]):
        zs, us = ref_zscore(z[r]) / tau, ref_zscore(u[r].detach()) / tau
        p = torch.exp(us) / torch.exp(us).sum()
        logq = zs - torch.log(torch.exp(zs).sum())
        out.append(tau**2 * (p * (torch.log(p) - logq)).sum())
    return torch.stack(out)


def ref_dkd_zscore(z, u, t, alpha=1.0, beta=8.0, tau=2.0):
    """Per-row DKD (binary target/rest KL + non-target KL, both ×τ²) on z-scored rows."""
    out = []
    for r in range(z.shape[0]):
        k = int(t[r])
        ps = F.softmax(ref_zscore(z[r]) / tau, 0)
        pt = F.softmax(ref_zscore(u[r].detach()) / tau, 0)
        bs = torch.stack([ps[k], 1 - ps[k]])
        bt = torch.stack([pt[k], 1 - pt[k]])
        tckd = (bt * (torch.log(bt) - torch.log(bs))).sum()
        others = [i for i in range(z.shape[1]) if i != k]
        ns, nt = ps[others] / ps[others].sum(), pt[others] / pt[others].sum()
        nckd = (nt * (torch.log(nt) - torch.log(ns))).sum()
        out.append(tau**2 * (alpha * tckd + beta * nckd))
    return torch.stack(out)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("beta,gamma,tau", [(1.0, 1.0, 1.0), (2.0, 2.0, 4.0), (0.5, 1.5, 0.7), (1.0, 0.0, 2.0)])
def test_dist_matches_reference(beta, gamma, tau):
    z, u, t = rand(12, 7, grad=True), rand(12, 7, seed=1), labels(12, 7)
    t[[2, 9]] = -100
    kw = dict(beta=beta, gamma=gamma, temperature=tau)
    torch.testing.assert_close(dist_loss(z, u, t, **kw), ref_dist(z, u, t, beta, gamma, tau))
    g1 = grad_of(lambda: dist_loss(z, u, t, **kw), z)[0]
    g2 = grad_of(lambda: ref_dist(z, u, t, beta, gamma, tau), z)[0]
    torch.testing.assert_close(g1, g2)
    assert g1[[2, 9]].abs().max() == 0 and g1.abs().max() > 0


def test_dist_without_target_uses_every_row_and_soft_labels_keep_every_row():
    z, u = rand(9, 5, grad=True), rand(9, 5, seed=1)
    torch.testing.assert_close(dist_loss(z, u), ref_dist(z, u))
    torch.testing.assert_close(dist_loss(z, u, mixed(9, 5)), ref_dist(z, u))
    assert dist_loss(z, u).dtype == D


def test_dist_temperature_one_is_the_first_release_without_temperature():
    # commit 2bc4832 of the authors' code: plain softmax, no τ² — the τ = 1 case
    z, u = rand(10, 6, grad=True), rand(10, 6, seed=1)
    ys, yt = F.softmax(z, 1), F.softmax(u, 1)
    inter = 1 - F.cosine_similarity(ys - ys.mean(1, keepdim=True), yt - yt.mean(1, keepdim=True), dim=1, eps=0).mean()
    intra = 1 - F.cosine_similarity(ys - ys.mean(0), yt - yt.mean(0), dim=0, eps=0).mean()
    torch.testing.assert_close(dist_loss(z, u, temperature=1.0), inter + intra, atol=1e-7, rtol=1e-7)
    # and τ multiplies both terms by τ² on top of softening
    torch.testing.assert_close(dist_loss(z, u, temperature=3.0), 9.0 * dist_loss(z / 3.0, u / 3.0))


@pytest.mark.parametrize("tau", [1.0, 2.0, 3.0])
def test_kd_zscore_matches_reference(tau):
    z, u = rand(10, 8, grad=True), rand(10, 8, seed=1, scale=7.0)
    torch.testing.assert_close(kd_zscore_loss(z, u, temperature=tau, reduction="none"), ref_kd_zscore(z, u, tau))
    g1 = grad_of(lambda: kd_zscore_loss(z, u, temperature=tau), z)[0]
    g2 = grad_of(lambda: ref_kd_zscore(z, u, tau).mean(), z)[0]
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("alpha,beta,tau", [(1.0, 8.0, 2.0), (9.0, 72.0, 2.0), (18.0, 36.0, 3.0)])
def test_dkd_zscore_matches_reference(alpha, beta, tau):
    z, u, t = rand(10, 8, grad=True), rand(10, 8, seed=1, scale=7.0), labels(10, 8)
    kw = dict(alpha=alpha, beta=beta, temperature=tau)
    torch.testing.assert_close(dkd_zscore_loss(z, u, t, reduction="none", **kw), ref_dkd_zscore(z, u, t, alpha, beta, tau))
    g1 = grad_of(lambda: dkd_zscore_loss(z, u, t, **kw), z)[0]
    g2 = grad_of(lambda: ref_dkd_zscore(z, u, t, alpha, beta, tau).mean(), z)[0]
    torch.testing.assert_close(g1, g2)
    # soft labels use the argmax as the target class
    y = mixed(10, 8, lam=0.6)
    torch.testing.assert_close(dkd_zscore_loss(z, u, y, reduction="none", **kw),
                               ref_dkd_zscore(z, u, y.argmax(1), alpha, beta, tau))


def test_standardize_logits_is_the_unbiased_z_score():
    x = rand(4, 3, 9, seed=3, scale=5.0)
    out = standardize_logits(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out[1, 2], ref_zscore(x[1, 2]))
    torch.testing.assert_close(out.mean(-1), torch.zeros(4, 3, dtype=D), atol=1e-12, rtol=0)
    torch.testing.assert_close(out.std(-1), torch.ones(4, 3, dtype=D), atol=1e-6, rtol=0)  # ε = 1e-7 vs std ~5
    assert (standardize_logits(torch.full((2, 5), 3.0)) == 0).all()  # a constant row becomes zeros
    assert standardize_logits(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_token_shaped_logits_match_flattened():
    z, u = rand(2, 3, 4, 6), rand(2, 3, 4, 6, seed=1)
    t = torch.randint(0, 6, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    t[0, 1, 2] = -100
    flat = (z.reshape(-1, 6), u.reshape(-1, 6), t.reshape(-1))
    # DIST: leading dims are rows; the intra term correlates over all 24 of them
    torch.testing.assert_close(dist_loss(z, u, t), dist_loss(*flat))
    torch.testing.assert_close(dist_loss(z, u, t), ref_dist(*flat))
    out = kd_zscore_loss(z, u, t, reduction="none")
    assert out.shape == (2, 3, 4) and out[0, 1, 2] == 0
    torch.testing.assert_close(out.reshape(-1), kd_zscore_loss(*flat, reduction="none"))
    torch.testing.assert_close(dkd_zscore_loss(z, u, t), dkd_zscore_loss(*flat))


# ----------------------------------------------------------------------------- gradcheck
GRADCHECK = {
    "dist": lambda z, u, y, r: dist_loss(z, u, y, beta=0.7, gamma=1.3, temperature=2.0, reduction=r),
    "kd_zscore": lambda z, u, y, r: kd_zscore_loss(z, u, y, temperature=2.0, reduction=r),
    "dkd_zscore": lambda z, u, y, r: dkd_zscore_loss(z, u, y, alpha=1.5, beta=3.0, temperature=2.0, reduction=r),
}


# DIST has no per-row loss: reduction="none" raises (tested below), so it is not gradchecked
GRADCHECK_CASES = [(n, r) for n in sorted(GRADCHECK) for r in ("mean", "sum", "none") if (n, r) != ("dist", "none")]


@pytest.mark.parametrize("name,reduction", GRADCHECK_CASES)
@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck_float64(name, reduction, soft):
    n, c = 6, 5
    z, u = rand(n, c, grad=True), rand(n, c, seed=1)
    if soft:
        y = mixed(n, c, lam=0.7)
    else:
        y = labels(n, c)
        y[3] = -100
    fn = GRADCHECK[name]
    if reduction == "none":  # weight rows differently so per-row gradients are checked
        wts = torch.arange(1, n + 1, dtype=D)
        assert torch.autograd.gradcheck(lambda z: (fn(z, u, y, "none") * wts).sum(), (z,), eps=1e-6, atol=1e-5)
    else:
        assert torch.autograd.gradcheck(lambda z: fn(z, u, y, reduction), (z,), eps=1e-6, atol=1e-5)


def test_gradcheck_standardize_logits():
    x = rand(3, 6, grad=True)
    assert torch.autograd.gradcheck(lambda x: standardize_logits(x) * torch.arange(6, dtype=D), (x,))


# ----------------------------------------------------------------------------- properties
def test_dist_is_near_zero_when_student_equals_teacher_and_positive_otherwise():
    z = rand(16, 10, grad=True)
    same = dist_loss(z, z.detach(), beta=2.0, gamma=2.0, temperature=4.0)
    assert 0 <= same.item() < 1e-3  # only the ε = 1e-8 in the denominator keeps ρ below 1 (×τ²·β = 32)
    assert dist_loss(z, rand(16, 10, seed=1), beta=2.0, gamma=2.0, temperature=4.0).item() > 0.1


def test_dist_intra_term_couples_the_batch_and_inter_term_does_not():
    z, u = rand(8, 6, grad=True), rand(8, 6, seed=1)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dist_loss(z[perm], u[perm]), dist_loss(z, u))  # order of rows: no effect
    # inter only (γ = 0): the loss of the batch is the mean of the losses of its halves
    halves = (dist_loss(z[:4], u[:4], gamma=0.0) + dist_loss(z[4:], u[4:], gamma=0.0)) / 2
    torch.testing.assert_close(dist_loss(z, u, gamma=0.0), halves)
    # intra (β = 0): not a per-row quantity — splitting the batch changes it
    halves = (dist_loss(z[:4], u[:4], beta=0.0) + dist_loss(z[4:], u[4:], beta=0.0)) / 2
    assert abs(dist_loss(z, u, beta=0.0).item() - halves.item()) > 1e-3


def test_dist_ignored_rows_leave_both_terms():
    z, u, t = rand(10, 6, seed=5, grad=True), rand(10, 6, seed=6), labels(10, 6, 5)
    t2 = t.clone()
    t2[[1, 4, 7]] = -100
    keep = [0, 2, 3, 5, 6, 8, 9]
    for kw in ({}, {"beta": 0.0}, {"gamma": 0.0}):
        torch.testing.assert_close(dist_loss(z, u, t2, **kw), dist_loss(z[keep], u[keep], **kw))
        torch.testing.assert_close(dist_loss(z, u, t2, reduction="sum", **kw),
                                   len(keep) * dist_loss(z[keep], u[keep], **kw))
    (g,) = grad_of(lambda: dist_loss(z, u, t2), z)
    assert g[[1, 4, 7]].abs().max() == 0
    # ignored rows may hold anything finite: their values never reach the loss
    z3 = z.detach().clone()
    z3[[1, 4, 7]] = 1e4
    torch.testing.assert_close(dist_loss(z3, u, t2), dist_loss(z.detach(), u, t2))


def test_dist_single_valid_row_has_constant_intra_term():
    z, u = rand(3, 5, grad=True), rand(3, 5, seed=1)
    t = torch.tensor([2, -100, -100])
    # a centred column of one entry is 0, so ρ = 0 and L_intra = 1 (the authors' formula with ε)
    torch.testing.assert_close(dist_loss(z, u, t, beta=0.0, gamma=1.0), torch.ones((), dtype=D))
    (g,) = grad_of(lambda: dist_loss(z, u, t, beta=0.0, gamma=1.0), z)
    assert g.abs().max() == 0


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(3, 9), seed=st.integers(0, 10_000),
       scale_s=st.floats(0.2, 20.0), scale_t=st.floats(0.2, 20.0), shift=st.floats(-50, 50),
       tau=st.floats(0.5, 5.0))
def test_zscore_losses_ignore_logit_range(n, c, seed, scale_s, scale_t, shift, tau):
    """The point of the method: a positive scale and a shift of a row (student or teacher) change nothing."""
    z, u, t = rand(n, c, seed=seed), rand(n, c, seed=seed + 1), labels(n, c, seed)
    shifts = torch.linspace(-1, 1, n, dtype=D)[:, None] * shift
    for fn in (lambda a, b: kd_zscore_loss(a, b, temperature=tau, reduction="none"),
               lambda a, b: dkd_zscore_loss(a, b, t, beta=4.0, temperature=tau, reduction="none")):
        torch.testing.assert_close(fn(scale_s * z + shifts, scale_t * u - shifts), fn(z, u), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(3, 9), seed=st.integers(0, 10_000))
def test_zscore_gradient_sums_to_zero_and_is_orthogonal_to_the_centred_logits(n, c, seed):
    z, u, t = rand(n, c, seed=seed, grad=True), rand(n, c, seed=seed + 1), labels(n, c, seed)
    zc = (z - z.mean(1, keepdim=True)).detach()
    # exact scale invariance needs ε → 0; with the authors' ε = 1e-7 it holds to ~ε/std
    for fn in (lambda: kd_zscore_loss(z, u, reduction="sum", eps=1e-14),
               lambda: dkd_zscore_loss(z, u, t, reduction="sum", eps=1e-14)):
        (g,) = grad_of(fn, z)
        assert g.abs().max() > 0
        torch.testing.assert_close(g.sum(1), torch.zeros(n, dtype=D), atol=1e-10, rtol=0)
        torch.testing.assert_close((g * zc).sum(1), torch.zeros(n, dtype=D), atol=1e-10, rtol=0)
    # with ε = 1e-7: Σ_i g_i (z_i − mean) = d/ds L(s·z) at s = 1 = ε·σ/(ε + σ)² · Σ_i (∂L/∂z̃_i) z̃_i
    (g,) = grad_of(lambda: kd_zscore_loss(z, u, reduction="sum"), z)
    w = standardize_logits(z.detach()).requires_grad_(True)
    pt = F.softmax(standardize_logits(u) / 2.0, 1)
    (4.0 * (pt * (pt.log() - F.log_softmax(w / 2.0, 1))).sum()).backward()
    sigma = z.detach().std(1)
    predicted = 1e-7 * sigma / (1e-7 + sigma) ** 2 * (w.grad * w.detach()).sum(1)
    torch.testing.assert_close((g * zc).sum(1), predicted, rtol=1e-4, atol=1e-14)


def test_zscore_constant_row_is_finite_with_the_1_over_eps_slope():
    # e.g. a zero-initialised classifier: every logit equal
    z = torch.zeros(2, 6, dtype=D, requires_grad=True)
    u = rand(2, 6, seed=1)
    loss = kd_zscore_loss(z, u)
    (g,) = grad_of(lambda: kd_zscore_loss(z, u), z)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    torch.testing.assert_close(loss, ref_kd_zscore(z, u).mean())
    # the derivative of (z − mean)/(ε + std) at a constant row is (I − 11ᵀ/C)/ε
    zz = torch.zeros(2, 6, dtype=D, requires_grad=True)
    s = F.softmax(zz / 2.0, 1).detach()
    expected = 2.0 * (s - F.softmax(standardize_logits(u) / 2.0, 1)) / 2 / 1e-7  # τ²·(S−T)/τ, mean over 2 rows
    expected = expected - expected.mean(1, keepdim=True)
    torch.testing.assert_close(g, expected, rtol=1e-6, atol=0)
    assert g.abs().max() > 1e5


# ----------------------------------------------------------------------------- numerics
ALL = {
    "dist": lambda z, u, t: dist_loss(z, u, t, beta=2.0, gamma=2.0, temperature=4.0),
    "dist_tau1": lambda z, u, t: dist_loss(z, u, t),
    "kd_zscore": lambda z, u, t: kd_zscore_loss(z, u, t),
    "dkd_zscore": lambda z, u, t: dkd_zscore_loss(z, u, t, alpha=9.0, beta=72.0),
}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("soft", [False, True])
def test_finite_for_extreme_logits_float32(name, soft):
    n, c = 16, 10
    z = (torch.randint(-1, 2, (n, c)).float() * 1e4).requires_grad_(True)
    u = torch.randint(-1, 2, (n, c)).float() * 1e4
    t = labels(n, c)
    u[torch.arange(n), t] = 1e4
    u[0] = 0.0  # a constant teacher row
    z.data[1] = 5.0  # a constant student row
    y = mixed(n, c).float() if soft else t
    loss = ALL[name](z, u, y)
    loss.backward()
    assert torch.isfinite(loss), name
    assert torch.isfinite(z.grad).all(), name


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32_and_returns_input_dtype_grads(name, dtype):
    lin = torch.nn.Linear(8, 6)
    x = torch.randn(10, 8)
    u = torch.randn(10, 6) * 3
    t = labels(10, 6)
    with torch.autocast("cpu", dtype=dtype):
        z = lin(x)
        z.retain_grad()
        loss = ALL[name](z, u, t)
    assert z.dtype == dtype
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad.dtype == dtype
    assert torch.isfinite(lin.weight.grad).all()
    ref = ALL[name](lin(x).float(), u, t)
    torch.testing.assert_close(loss, ref, atol=0.05, rtol=0.05)


def test_all_rows_ignored_gives_zero_not_nan():
    z, u = rand(3, 4, grad=True), rand(3, 4, seed=1)
    t = torch.full((3,), -100)
    for name, fn in ALL.items():
        loss = fn(z, u, t)
        assert loss.item() == 0.0, name
        z.grad = None
        loss.backward()
        assert torch.isfinite(z.grad).all() and z.grad.abs().max() == 0, name
    assert dist_loss(z, u, t, reduction="sum").item() == 0.0


def test_two_classes_work():
    z, u, t = rand(6, 2, grad=True), rand(6, 2, seed=1), labels(6, 2)
    for name, fn in ALL.items():
        loss = fn(z, u, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), name
    torch.testing.assert_close(dist_loss(z, u, t, temperature=2.0), ref_dist(z, u, t, tau=2.0))


# ----------------------------------------------------------------------------- reductions
@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 8), c=st.integers(2, 10), seed=st.integers(0, 10_000))
def test_reductions_are_consistent(n, c, seed):
    z, u, t = rand(n, c, seed=seed), rand(n, c, seed=seed + 1), labels(n, c, seed)
    t[0] = -100
    for name, fn in {"kd_zscore": lambda r: kd_zscore_loss(z, u, t, reduction=r),
                     "dkd_zscore": lambda r: dkd_zscore_loss(z, u, t, reduction=r)}.items():
        none, total, mean = fn("none"), fn("sum"), fn("mean")
        assert none.shape == (n,) and none[0] == 0, name
        torch.testing.assert_close(none.sum(), total, msg=name)
        torch.testing.assert_close(mean, total / (n - 1), msg=name)
    # DIST: "sum" is the number of valid rows times "mean"; "none" has no meaning and raises
    torch.testing.assert_close(dist_loss(z, u, t, reduction="mean"), dist_loss(z, u, t, reduction="sum") / (n - 1))
    with pytest.raises(ValueError, match="reduction"):
        dist_loss(z, u, t, reduction="none")


# ----------------------------------------------------------------------------- modules, registry
def test_modules_forward_to_functions():
    z, u, t = rand(6, 5), rand(6, 5, seed=1), labels(6, 5)
    t[2] = -100
    torch.testing.assert_close(DISTLoss(beta=2.0, gamma=0.5, temperature=4.0)(z, u, t),
                               dist_loss(z, u, t, beta=2.0, gamma=0.5, temperature=4.0))
    torch.testing.assert_close(DISTLoss(reduction="sum")(z, u), dist_loss(z, u, reduction="sum"))
    torch.testing.assert_close(KDZScoreLoss(temperature=3.0, reduction="none")(z, u, t),
                               kd_zscore_loss(z, u, t, temperature=3.0, reduction="none"))
    torch.testing.assert_close(DKDZScoreLoss(alpha=9.0, beta=18.0, temperature=3.0)(z, u, t),
                               dkd_zscore_loss(z, u, t, alpha=9.0, beta=18.0, temperature=3.0))
    torch.testing.assert_close(KDZScoreLoss(eps=1e-3)(z, u), kd_zscore_loss(z, u, eps=1e-3))
    assert "gamma=0.5" in repr(DISTLoss(gamma=0.5)) and "eps" in repr(KDZScoreLoss())
    assert LOSSES["dist"] is dist_loss and LOSSES["kd_zscore"] is kd_zscore_loss
    assert LOSSES["dkd_zscore"] is dkd_zscore_loss


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: dist_loss(torch.randn(4, 5), torch.randn(4, 5), reduction="none"), ValueError, "reduction"),
        (lambda: dist_loss(torch.randn(4, 5), torch.randn(4, 5), reduction="avg"), ValueError, "reduction"),
        (lambda: DISTLoss(reduction="none"), ValueError, "reduction"),
        (lambda: dist_loss(torch.randn(4, 5), torch.randn(4, 6)), ValueError, "teacher_logits"),
        (lambda: dist_loss(torch.randn(4, 5), torch.randn(4, 5), temperature=0.0), ValueError, "temperature"),
        (lambda: dist_loss(torch.randn(4, 5), torch.randn(4, 5), temperature=float("inf")), ValueError,
         "temperature"),
        (lambda: dist_loss(torch.randn(4, 5), torch.randn(4, 5), beta=-1.0), ValueError, "beta"),
        (lambda: dist_loss(torch.randn(4, 5), torch.randn(4, 5), gamma=float("nan")), ValueError, "gamma"),
        (lambda: dist_loss(torch.randn(4, 5), torch.randn(4, 5), labels(3, 5)), ValueError, "hard target"),
        (lambda: dist_loss(torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 9, 2])), ValueError,
         r"\[0, 5\)"),
        (lambda: dist_loss(torch.randn(4, 5), torch.randn(4, 5), ignore_index=1.5), TypeError, "ignore_index"),
        (lambda: dist_loss(torch.randint(0, 3, (4, 5)), torch.randn(4, 5)), TypeError, "floating-point"),
        (lambda: dist_loss(torch.randn(4, 1), torch.randn(4, 1)), ValueError, "at least 2 classes"),
        (lambda: kd_zscore_loss(torch.randn(4, 5), torch.randn(4, 5), temperature=-1.0), ValueError, "temperature"),
        (lambda: kd_zscore_loss(torch.randn(4, 5), torch.randn(4, 5), eps=0.0), ValueError, "eps"),
        (lambda: kd_zscore_loss(torch.randn(4, 5), torch.randn(4, 5), reduction="avg"), ValueError, "reduction"),
        (lambda: kd_zscore_loss(torch.randn(4, 5), torch.randn(3, 5)), ValueError, "teacher_logits"),
        (lambda: kd_zscore_loss(torch.randn(4, 5), torch.randn(4, 5), torch.full((4, 5), 0.3)), ValueError,
         "sum to 1"),
        (lambda: dkd_zscore_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), beta=float("inf")), ValueError,
         "beta"),
        (lambda: dkd_zscore_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), alpha=-2.0), ValueError, "alpha"),
        (lambda: dkd_zscore_loss(torch.randn(4, 5), torch.randn(4, 5), torch.ones(4, dtype=torch.bool)), TypeError,
         "target"),
        (lambda: standardize_logits(torch.arange(5)), TypeError, "floating-point"),
        (lambda: standardize_logits(torch.randn(4, 1)), ValueError, "at least 2 classes"),
        (lambda: standardize_logits(torch.randn(4, 5), eps=float("nan")), ValueError, "eps"),
        (lambda: KDZScoreLoss(eps=-1.0), ValueError, "eps"),
        (lambda: DKDZScoreLoss(temperature=0.0), ValueError, "temperature"),
    ],
)
def test_bad_input_is_rejected_with_a_named_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_published_settings_give_finite_losses_of_the_expected_scale():
    """The CIFAR settings (DIST τ=4 with the outer ×2, z-score KD τ=2 with w=9) on 100 classes, batch 64."""
    z, u, t = rand(64, 100, seed=1), rand(64, 100, seed=2), labels(64, 100)
    d = 2.0 * dist_loss(z, u, t, temperature=4.0)
    # each of the two terms lies in [0, 2]; ×τ² = 16, ×2 outer weight
    assert 0 < d.item() <= 2 * 16 * 4 and math.isfinite(d.item())
    k = 9.0 * kd_zscore_loss(z, u, t, temperature=2.0)
    assert 0 < k.item() < 1e3
