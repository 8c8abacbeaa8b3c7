"""nkd.losses: exactness against SPEC references, gradients, properties, edge cases, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nkd.losses import (
    LOSSES,
    DKDLoss,
    KDLoss,
    NKDLoss,
    USKDLoss,
    dkd_loss,
    kd_loss,
    label_smoothing_loss,
    nkd_loss,
    tfkd_loss,
    uskd_loss,
    zipf_ls_loss,
)
from reference_losses import ref_dkd, ref_kd, ref_nkd, ref_uskd
from tensors import D, grad_of, labels, mixed, rand


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("temperature,gamma", [(1.0, 1.5), (3.0, 3.5), (0.5, 1.0)])
def test_nkd_matches_reference(temperature, gamma):
    z, u, t = rand(16, 11, grad=True), rand(16, 11, seed=1), labels(16, 11)
    ours = nkd_loss(z, u, t, temperature=temperature, gamma=gamma, reduction="none")
    ref = ref_nkd(z, u, t, temperature, gamma)
    torch.testing.assert_close(ours, ref)
    g1 = grad_of(lambda: nkd_loss(z, u, t, temperature=temperature, gamma=gamma), z)[0]
    g2 = grad_of(lambda: ref_nkd(z, u, t, temperature, gamma).mean(), z)[0]
    torch.testing.assert_close(g1, g2)


def test_nkd_soft_labels_use_argmax_and_keep_second_class_as_non_target():
    z, u = rand(12, 9, grad=True), rand(12, 9, seed=1)
    y = mixed(12, 9, lam=0.6)
    torch.testing.assert_close(nkd_loss(z, u, y, reduction="none"), ref_nkd(z, u, y.argmax(1)))


def test_nkd_soft_label_ties_take_first_index():
    z, u = rand(1, 4), rand(1, 4, seed=1)
    y = torch.tensor([[0.0, 0.5, 0.5, 0.0]], dtype=D)
    torch.testing.assert_close(nkd_loss(z, u, y), nkd_loss(z, u, torch.tensor([1])))


@pytest.mark.parametrize("rank", ["paper", "official"])
@pytest.mark.parametrize("soft", [False, True])
def test_uskd_matches_reference(rank, soft):
    n, c = 10, 7
    z, w = rand(n, c, grad=True), rand(n, c, seed=2, grad=True)
    y = mixed(n, c, lam=0.65) if soft else labels(n, c)
    if soft:
        y[0] = torch.nn.functional.one_hot(torch.tensor(3), c).to(D)  # K=1 row inside a mixed batch
        y[1] = 0.9 * y[0] + 0.1 / c  # label-smoothed row: K=1
    kw = dict(alpha=0.7, beta=0.3, mu=0.2, rank=rank)
    ours = uskd_loss(z, w, y, reduction="none", **kw)
    ref = ref_uskd(z, w, y, **kw)
    torch.testing.assert_close(ours, ref)
    g1 = grad_of(lambda: uskd_loss(z, w, y, **kw), z, w)
    g2 = grad_of(lambda: ref_uskd(z, w, y, **kw).mean(), z, w)
    torch.testing.assert_close(g1[0], g2[0])
    torch.testing.assert_close(g1[1], g2[1])


def test_kd_and_dkd_match_reference():
    z, u, t = rand(16, 10, grad=True), rand(16, 10, seed=1), labels(16, 10)
    torch.testing.assert_close(kd_loss(z, u, temperature=4.0, reduction="none"), ref_kd(z, u, 4.0))
    torch.testing.assert_close(dkd_loss(z, u, t, beta=6.0, reduction="none"), ref_dkd(z, u, t, 1.0, 6.0, 4.0))
    g1 = grad_of(lambda: dkd_loss(z, u, t), z)[0]
    g2 = grad_of(lambda: ref_dkd(z, u, t).mean(), z)[0]
    torch.testing.assert_close(g1, g2)


def test_self_kd_baselines_match_definitions():
    z, t = rand(8, 6, grad=True), labels(8, 6)
    ce_ls = torch.nn.functional.cross_entropy(z, t, label_smoothing=0.1)
    torch.testing.assert_close(label_smoothing_loss(z, t, epsilon=0.1), ce_ls)
    # Tf-KD: KL(softmax(p_d/T) || softmax(z)) with p_d = 0.99 on target, 0.01/(C-1) elsewhere
    pd = torch.full((8, 6), 0.01 / 5, dtype=D)
    pd[torch.arange(8), t] = 0.99
    pt = torch.softmax(pd / 20.0, 1)
    ref = (pt * (pt.log() - torch.log_softmax(z, 1))).sum(1).mean()
    torch.testing.assert_close(tfkd_loss(z, t), ref)
    # Zipf LS: non-target ranks 1..C-1 by own logits -> weights 1/r
    zz = torch.tensor([[0.0, 3.0, 1.0, 2.0]], dtype=D, requires_grad=True)
    tt = torch.tensor([1])
    zh = torch.tensor([1 / 3, 1 / 2, 1.0], dtype=D)  # non-targets 0, 2, 3 have ranks 3, 2, 1
    zh = zh / zh.sum()
    ls = torch.log_softmax(zz[0, [0, 2, 3]], 0)
    torch.testing.assert_close(zipf_ls_loss(zz, tt), (zh * (zh.log() - ls)).sum())


# ----------------------------------------------------------------------------- gradcheck
GRADCHECK = {
    "nkd": lambda z, u, w, y: nkd_loss(z, u, y, temperature=2.0, gamma=1.5),
    # USKD's soft target p is a detached function of z (SPEC), so finite differences in z see a
    # dependence the true gradient must not have: check z with alpha = 0 and w with alpha > 0;
    # the alpha term's z-gradient is checked against the autograd reference above.
    "uskd_paper": lambda z, u, w, y: uskd_loss(z, w, y, alpha=0.0, beta=0.5, mu=0.3),
    "uskd_official": lambda z, u, w, y: uskd_loss(z, w, y, alpha=0.0, beta=0.5, mu=0.3, rank="official"),
    "kd": lambda z, u, w, y: kd_loss(z, u, temperature=2.0),
    "dkd": lambda z, u, w, y: dkd_loss(z, u, y, beta=3.0, temperature=2.0),
    "ls": lambda z, u, w, y: label_smoothing_loss(z, y),
    "zipf_ls": lambda z, u, w, y: zipf_ls_loss(z, y),
    "tfkd": lambda z, u, w, y: tfkd_loss(z, y, temperature=2.0),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK))
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(name, soft, reduction):
    n, c = 5, 6
    z, u, w = rand(n, c, grad=True), rand(n, c, seed=1), rand(n, c, seed=2, grad=True)
    y = mixed(n, c, lam=0.7) if soft else labels(n, c)
    fn = GRADCHECK[name]
    if reduction == "none":  # weight rows differently so per-row gradients are checked
        wts = torch.arange(1, n + 1, dtype=D)
        if name.startswith("uskd"):
            f = lambda z, w: (uskd_loss(z, w, y, alpha=0.0, beta=0.5, mu=0.3, reduction="none",  # noqa: E731
                                        rank=name.split("_")[1]) * wts).sum()
        else:
            f = None
    else:
        f = None
    if f is None:
        f = lambda z, w: fn(z, u, w, y)  # noqa: E731
    assert torch.autograd.gradcheck(f, (z, w), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("rank", ["paper", "official"])
def test_gradcheck_uskd_weak_head_with_target_term(rank):
    z, w, y = rand(5, 6), rand(5, 6, seed=2, grad=True), mixed(5, 6)
    assert torch.autograd.gradcheck(lambda w: uskd_loss(z, w, y, alpha=1.0, beta=0.5, mu=0.3, rank=rank), (w,))


def test_gradcheck_nkd_per_row_weights_and_ignore_index():
    z, u = rand(6, 5, grad=True), rand(6, 5, seed=1)
    t = labels(6, 5)
    t[2] = -100
    wts = torch.arange(1, 7, dtype=D)
    assert torch.autograd.gradcheck(lambda z: (nkd_loss(z, u, t, reduction="none") * wts).sum(), (z,))


# ----------------------------------------------------------------------------- properties
finite = st.floats(-20, 20, allow_nan=False, width=64)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6), c=st.integers(2, 9), seed=st.integers(0, 10_000),
    temperature=st.floats(0.5, 5.0), gamma=st.floats(0.1, 4.0), shift=finite,
)
def test_nkd_properties(n, c, seed, temperature, gamma, shift):
    z = rand(n, c, seed=seed, grad=True)
    t = labels(n, c, seed)
    # non-target term has zero gradient when student == teacher
    g_full = grad_of(lambda: nkd_loss(z, z.detach(), t, temperature=temperature, gamma=gamma), z)[0]
    g_tgt = grad_of(lambda: nkd_loss(z, z.detach(), t, temperature=temperature, gamma=0.0), z)[0]
    torch.testing.assert_close(g_full, g_tgt, atol=1e-10, rtol=0)
    # invariant to adding a constant to all logits of a row (student and teacher separately)
    u = rand(n, c, seed=seed + 1)
    shifts = torch.linspace(-1, 1, n, dtype=D)[:, None] * shift
    base = nkd_loss(z, u, t, temperature=temperature, gamma=gamma, reduction="none")
    torch.testing.assert_close(nkd_loss(z + shifts, u - shifts, t, temperature=temperature, gamma=gamma,
                                        reduction="none"), base)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(3, 8), seed=st.integers(0, 10_000))
def test_one_hot_soft_labels_equal_hard_labels(n, c, seed):
    z, u, w = rand(n, c, seed=seed), rand(n, c, seed=seed + 1), rand(n, c, seed=seed + 2)
    t = labels(n, c, seed)
    y = torch.nn.functional.one_hot(t, c).to(D)
    for fn in (
        lambda y: nkd_loss(z, u, y, reduction="none"),
        lambda y: uskd_loss(z, w, y, reduction="none", mu=0.5, beta=0.5),
        lambda y: uskd_loss(z, w, y, reduction="none", rank="official"),
        lambda y: dkd_loss(z, u, y, reduction="none"),
        lambda y: label_smoothing_loss(z, y, reduction="none"),
        lambda y: zipf_ls_loss(z, y, reduction="none"),
        lambda y: tfkd_loss(z, y, reduction="none"),
    ):
        torch.testing.assert_close(fn(y), fn(t))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 8), c=st.integers(2, 10), seed=st.integers(0, 10_000))
def test_reductions_are_consistent(n, c, seed):
    z, u, w = rand(n, c, seed=seed), rand(n, c, seed=seed + 1), rand(n, c, seed=seed + 2)
    t = labels(n, c, seed)
    t[0] = -100
    for name, fn in {
        "nkd": lambda r: nkd_loss(z, u, t, reduction=r),
        "uskd": lambda r: uskd_loss(z, w, t, reduction=r),
        "dkd": lambda r: dkd_loss(z, u, t, reduction=r),
        "ls": lambda r: label_smoothing_loss(z, t, reduction=r),
        "zipf_ls": lambda r: zipf_ls_loss(z, t, reduction=r),
        "tfkd": lambda r: tfkd_loss(z, t, reduction=r),
    }.items():
        none, total, mean = fn("none"), fn("sum"), fn("mean")
        assert none.shape == (n,), name
        assert none[0] == 0, name
        torch.testing.assert_close(none.sum(), total, msg=name)
        torch.testing.assert_close(mean, total / (n - 1), msg=name)
    torch.testing.assert_close(kd_loss(z, u, reduction="none").sum(), kd_loss(z, u, reduction="sum"))


def test_uskd_rank_modes_differ_only_through_ranking():
    n, c = 12, 10
    z, w = rand(n, c, seed=3, grad=True), rand(n, c, seed=4, grad=True)
    t = labels(n, c, 3)
    # beta = 0 removes the only term that depends on the ranking: identical loss and grads
    a = grad_of(lambda: uskd_loss(z, w, t, beta=0.0, rank="paper"), z, w)
    b = grad_of(lambda: uskd_loss(z, w, t, beta=0.0, rank="official"), z, w)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(uskd_loss(z, w, t, beta=0.0), uskd_loss(z, w, t, beta=0.0, rank="official"))
    # a weak head that agrees with the logits gives the same order in both modes
    same = uskd_loss(z, z.detach() * 50, t, mu=0.0, rank="paper", reduction="none")
    other = uskd_loss(z, z.detach() * 50, t, mu=0.0, rank="official", reduction="none")
    torch.testing.assert_close(same, other)
    # and in general the two modes do differ
    assert not torch.allclose(uskd_loss(z, w, t, rank="paper"), uskd_loss(z, w, t, rank="official"))


def test_uskd_ignore_index_rows_leave_the_batch_mean():
    z, w, t = rand(8, 6, seed=5), rand(8, 6, seed=6), labels(8, 6, 5)
    t2 = t.clone()
    t2[[1, 4]] = -100
    keep = [0, 2, 3, 5, 6, 7]
    full = uskd_loss(z, w, t2, reduction="none")
    sub = uskd_loss(z[keep], w[keep], t[keep], reduction="none")
    torch.testing.assert_close(full[keep], sub)
    assert (full[[1, 4]] == 0).all()
    torch.testing.assert_close(uskd_loss(z, w, t2), sub.mean())


def test_token_shaped_logits_match_flattened():
    z, u, w = rand(2, 3, 5, 7), rand(2, 3, 5, 7, seed=1), rand(2, 3, 5, 7, seed=2)
    t = torch.randint(0, 7, (2, 3, 5), generator=torch.Generator().manual_seed(0))
    t[0, 1, 2] = -100
    out = nkd_loss(z, u, t, reduction="none")
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out.reshape(-1), nkd_loss(z.reshape(-1, 7), u.reshape(-1, 7), t.reshape(-1),
                                                         reduction="none"))
    torch.testing.assert_close(uskd_loss(z, w, t), uskd_loss(z.reshape(-1, 7), w.reshape(-1, 7), t.reshape(-1)))
    torch.testing.assert_close(kd_loss(z, u, reduction="none").shape, torch.Size([2, 3, 5]))
    y = torch.softmax(rand(2, 3, 5, 7, seed=3), -1)
    torch.testing.assert_close(dkd_loss(z, u, y), dkd_loss(z.reshape(-1, 7), u.reshape(-1, 7), y.reshape(-1, 7)))


# ----------------------------------------------------------------------------- numerics
ALL_WITH_TARGET = {
    "nkd": lambda z, u, w, t: nkd_loss(z, u, t, temperature=2.0),
    "uskd": lambda z, u, w, t: uskd_loss(z, w, t),
    "uskd_official": lambda z, u, w, t: uskd_loss(z, w, t, rank="official"),
    "kd": lambda z, u, w, t: kd_loss(z, u),
    "dkd": lambda z, u, w, t: dkd_loss(z, u, t),
    "ls": lambda z, u, w, t: label_smoothing_loss(z, t),
    "zipf_ls": lambda z, u, w, t: zipf_ls_loss(z, t),
    "tfkd": lambda z, u, w, t: tfkd_loss(z, t),
}


@pytest.mark.parametrize("name", sorted(ALL_WITH_TARGET))
@pytest.mark.parametrize("soft", [False, True])
def test_finite_for_extreme_logits_float32(name, soft):
    n, c = 16, 10
    z = (torch.randint(-1, 2, (n, c)).float() * 1e4).requires_grad_(True)
    w = (torch.randint(-1, 2, (n, c)).float() * 1e4).requires_grad_(True)
    u = torch.randint(-1, 2, (n, c)).float() * 1e4
    t = labels(n, c)
    u[torch.arange(n), t] = 1e4  # teacher puts probability 1 on the target
    y = mixed(n, c).float() if soft else t
    loss = ALL_WITH_TARGET[name](z, u, w, y)
    loss.backward()
    assert torch.isfinite(loss), name
    assert torch.isfinite(z.grad).all(), name
    assert torch.isfinite(w.grad).all() if w.grad is not None else True


@pytest.mark.parametrize("name", sorted(ALL_WITH_TARGET))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_in_float32_and_returns_input_dtype_grads(name, dtype):
    lin = torch.nn.Linear(8, 6)
    x = torch.randn(10, 8)
    u = torch.randn(10, 6)
    t = labels(10, 6)
    with torch.autocast("cpu", dtype=dtype):
        z = lin(x)
        w = lin(x * 0.5)
        z.retain_grad()
        loss = ALL_WITH_TARGET[name](z, u, w, t)
    assert z.dtype == dtype
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad.dtype == dtype
    assert torch.isfinite(lin.weight.grad).all()
    # close to the float32 value
    ref = ALL_WITH_TARGET[name](lin(x).float(), u, lin(x * 0.5).float(), t)
    torch.testing.assert_close(loss, ref, atol=0.05, rtol=0.05)


def test_two_classes_single_non_target():
    z, u, w = rand(6, 2, grad=True), rand(6, 2, seed=1), rand(6, 2, seed=2, grad=True)
    t = labels(6, 2)
    # the normalized non-target distribution of one class is 1 for both: L_non = 0
    torch.testing.assert_close(nkd_loss(z, u, t, gamma=5.0), nkd_loss(z, u, t, gamma=0.0))
    torch.testing.assert_close(uskd_loss(z, w, t, beta=5.0), uskd_loss(z, w, t, beta=0.0))
    for name, fn in ALL_WITH_TARGET.items():
        loss = fn(z, u, w, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), name


def test_uskd_ties_are_broken_by_class_index():
    # all-equal logits and weak logits: every score ties, ranking must follow class index
    z = torch.zeros(3, 5, dtype=D)
    w = torch.zeros(3, 5, dtype=D)
    t = torch.tensor([0, 2, 4])
    out = uskd_loss(z, w, t, alpha=0.0, mu=0.0, beta=1.0, reduction="none")
    ref = ref_uskd(z, w, t, alpha=0.0, mu=0.0, beta=1.0)
    torch.testing.assert_close(out, ref)
    # determinism on repeated calls
    for _ in range(3):
        torch.testing.assert_close(uskd_loss(z, w, t, reduction="none", beta=1.0), uskd_loss(z, w, t, reduction="none",
                                                                                             beta=1.0))


def test_all_rows_ignored_gives_zero_not_nan():
    z, u, w = rand(3, 4, grad=True), rand(3, 4, seed=1), rand(3, 4, seed=2)
    t = torch.full((3,), -100)
    for fn in (nkd_loss(z, u, t), uskd_loss(z, w, t), dkd_loss(z, u, t), label_smoothing_loss(z, t)):
        assert fn.item() == 0.0
        fn.backward()
        assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------- modules
def test_modules_forward_to_functions():
    z, u, t = rand(6, 5), rand(6, 5, seed=1), labels(6, 5)
    torch.testing.assert_close(NKDLoss(temperature=2.0, gamma=3.0)(z, u, t), nkd_loss(z, u, t, temperature=2.0,
                                                                                         gamma=3.0))
    torch.testing.assert_close(KDLoss(temperature=3.0)(z, u), kd_loss(z, u, temperature=3.0))
    torch.testing.assert_close(DKDLoss(beta=2.0)(z, u, t), dkd_loss(z, u, t, beta=2.0))
    m = USKDLoss(in_features=4, num_classes=5, mu=0.1).double()
    f = rand(6, 4, seed=3, grad=True)
    loss = m(f, z, t)
    torch.testing.assert_close(loss, uskd_loss(z, m.head(f), t, mu=0.1))
    loss.backward()
    assert m.head.weight.grad is not None and f.grad is not None and f.grad.abs().sum() > 0
    assert set(LOSSES) == {"nkd", "uskd", "kd", "dkd", "ls", "zipf_ls", "tfkd", "dist", "kd_zscore", "dkd_zscore", "jsd"}


def test_kd_ignore_index_leaves_rows_out_of_the_mean():
    z, u = rand(6, 7, grad=True), rand(6, 7, seed=1)
    t = labels(6, 7)
    t[[1, 4]] = -100
    keep = t != -100
    per_row = kd_loss(z, u, reduction="none")
    ours = kd_loss(z, u, t)
    torch.testing.assert_close(ours, per_row[keep].mean())
    torch.testing.assert_close(kd_loss(z, u, t, reduction="none"), torch.where(keep, per_row, 0.0))
    torch.testing.assert_close(KDLoss(ignore_index=3)(z, u, torch.full((6,), 3)), torch.zeros((), dtype=D))
    (g,) = grad_of(lambda: kd_loss(z, u, t), z)
    assert g[~keep].abs().max() == 0 and g[keep].abs().max() > 0


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: nkd_loss(torch.randn(4, 5), torch.randn(4, 6), labels(4, 5)), ValueError, "teacher_logits"),
        (lambda: nkd_loss(torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 5, 2])), ValueError,
         r"\[0, 5\)"),
        (lambda: nkd_loss(torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, -1, 2])), ValueError,
         "ignore_index"),
        (lambda: nkd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(3, 5)), ValueError, "hard target"),
        (lambda: nkd_loss(torch.randn(4, 5), torch.randn(4, 5), torch.full((4, 5), 0.3)), ValueError, "sum to 1"),
        (lambda: nkd_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([[1.2, -0.2, 0.0]] * 2)), ValueError,
         "non-negative"),
        (lambda: nkd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), temperature=0.0), ValueError,
         "temperature"),
        (lambda: kd_loss(torch.randn(4, 5), torch.randn(4, 5), temperature=-1.0), ValueError, "temperature"),
        (lambda: dkd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), temperature=0), ValueError,
         "temperature"),
        (lambda: nkd_loss(torch.randn(4, 1), torch.randn(4, 1), torch.zeros(4, dtype=torch.long)), ValueError,
         "at least 2 classes"),
        (lambda: uskd_loss(torch.randn(4, 2), torch.randn(4, 2), torch.full((4, 2), 0.5)), ValueError,
         "at least 3 classes"),
        (lambda: uskd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), rank="nope"), ValueError, "rank"),
        (lambda: nkd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), reduction="avg"), ValueError,
         "reduction"),
        (lambda: nkd_loss(torch.randint(0, 3, (4, 5)), torch.randn(4, 5), labels(4, 5)), TypeError,
         "floating-point"),
        (lambda: uskd_loss(torch.randn(4, 5), torch.randn(4, 6), labels(4, 5)), ValueError, "weak_logits"),
        (lambda: nkd_loss(torch.randn(4, 5), torch.randn(4, 5), torch.ones(4, dtype=torch.bool)), TypeError,
         "target"),
        (lambda: USKDLoss(0, 10), ValueError, "in_features"),
        (lambda: USKDLoss(8, 10)(torch.randn(4, 7), torch.randn(4, 10), labels(4, 10)), ValueError, "features"),
        (lambda: NKDLoss(gamma=-1), ValueError, "gamma"),
        (lambda: label_smoothing_loss(torch.randn(4, 5), labels(4, 5), epsilon=1.5), ValueError, "epsilon"),
        # non-finite hyper-parameters: never a NaN or inf loss
        (lambda: kd_loss(torch.randn(4, 5), torch.randn(4, 5), temperature=float("inf")), ValueError, "temperature"),
        (lambda: nkd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), temperature=float("inf")), ValueError,
         "temperature"),
        (lambda: nkd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), gamma=float("nan")), ValueError, "gamma"),
        (lambda: dkd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), beta=float("inf")), ValueError, "beta"),
        (lambda: uskd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), mu=float("inf")), ValueError, "mu"),
        (lambda: tfkd_loss(torch.randn(4, 5), labels(4, 5), temperature=float("inf")), ValueError, "temperature"),
        (lambda: tfkd_loss(torch.randn(4, 5), labels(4, 5), correct_prob=float("nan")), ValueError, "correct_prob"),
        (lambda: label_smoothing_loss(torch.randn(4, 5), labels(4, 5), epsilon=float("nan")), ValueError, "epsilon"),
        (lambda: kd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(4, 5), ignore_index=1.5), TypeError,
         "ignore_index"),
        (lambda: kd_loss(torch.randn(4, 5), torch.randn(4, 5), labels(3, 5)), ValueError, "hard target"),
    ],
)
def test_bad_input_is_rejected_with_a_named_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_value_checks_can_be_switched_off_for_validated_hot_loops():
    from nkd.losses import value_checks

    z, u = torch.randn(4, 5), torch.randn(4, 5)
    bad = torch.tensor([0, 1, 7, 2])
    with value_checks(False):
        nkd_loss(z, u, torch.tensor([0, 1, 3, 2]))  # fine either way
        with pytest.raises(ValueError, match="teacher_logits"):  # shape checks stay on
            nkd_loss(z, torch.randn(4, 6), bad)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):  # and the default is restored
        nkd_loss(z, u, bad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nkd_parts_are_its_two_terms_and_sum_to_the_loss(reduction):
    z, u = rand(12, 7, grad=True), rand(12, 7, seed=1)
    t = labels(12, 7)
    t[3] = -100
    kw = dict(temperature=2.0, gamma=1.5, reduction=reduction)
    loss, parts = nkd_loss(z, u, t, return_parts=True, **kw)
    torch.testing.assert_close(loss, nkd_loss(z, u, t, **kw))
    if reduction == "none":  # per row, bitwise
        assert torch.equal(parts["target"] + parts["non_target"], loss.detach())
    torch.testing.assert_close(parts["target"] + parts["non_target"], loss.detach())
    torch.testing.assert_close(parts["target"], nkd_loss(z, u, t, **{**kw, "gamma": 0.0}).detach())
    torch.testing.assert_close(parts["non_target"], (loss - nkd_loss(z, u, t, **{**kw, "gamma": 0.0})).detach())
    assert not any(v.requires_grad for v in parts.values())
    assert float(parts["non_target"].sum()) > 0  # a cross-entropy over the non-targets


@pytest.mark.parametrize("soft", [False, True])
def test_uskd_parts_are_its_weighted_terms_and_sum_to_the_loss(soft):
    z, w = rand(12, 7, grad=True), rand(12, 7, seed=1)
    t = mixed(12, 7) if soft else labels(12, 7)
    loss, parts = uskd_loss(z, w, t, alpha=0.3, beta=0.7, mu=0.2, return_parts=True)
    torch.testing.assert_close(loss, uskd_loss(z, w, t, alpha=0.3, beta=0.7, mu=0.2))
    torch.testing.assert_close(sum(parts.values()), loss.detach())
    alone = {"target": dict(alpha=1.0, beta=0.0, mu=0.0), "non_target": dict(alpha=0.0, beta=1.0, mu=0.0),
             "weak": dict(alpha=0.0, beta=0.0, mu=1.0)}
    weight = {"target": 0.3, "non_target": 0.7, "weak": 0.2}
    for name, kw in alone.items():
        torch.testing.assert_close(parts[name], weight[name] * uskd_loss(z, w, t, **kw).detach(), msg=name)
        assert not parts[name].requires_grad
