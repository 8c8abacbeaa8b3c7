"""nkd.losses.fused: the chunked fused-linear losses equal the materialized ones (value and gradients),
gradcheck, sparse teachers, precision, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tensors
from nkd.losses import (
    FusedLinearKDLoss,
    FusedLinearNKDLoss,
    chunked,
    fused_linear_kd_loss,
    fused_linear_nkd_loss,
    kd_loss,
    nkd_loss,
    value_checks,
)
from nkd.losses.chunked import _spec_rows
from nkd.losses.fused import default_chunk_size, fused_linear_jsd_loss
from nkd.losses.jsd import JSD, jsd_loss
from nkd.losses.kd import KD
from nkd.losses.nkd import NKD
from tensors import D


def rand(*shape, seed=0, scale=1.0, dtype=D, grad=False):
    return tensors.rand(*shape, seed=seed, scale=scale, dtype=dtype, grad=grad)


def labels(shape, v, seed=0, ignore=()):
    t = torch.randint(0, v, shape, generator=torch.Generator().manual_seed(seed))
    for i in ignore:
        if i < t.numel():
            t.view(-1)[i] = -100
    return t


def problem(n=13, h=5, ht=7, v=11, seed=0, lead=None):
    """Student hidden [.., H] + head [V, H] + bias, teacher hidden [.., H_t] + head [V, H_t], labels."""
    lead = lead or (n,)
    return dict(
        hidden=rand(*lead, h, seed=seed, grad=True),
        weight=rand(v, h, seed=seed + 1, grad=True),
        bias=rand(v, seed=seed + 2, grad=True),
        teacher_hidden=rand(*lead, ht, seed=seed + 3, scale=1.5),
        teacher_weight=rand(v, ht, seed=seed + 4),
        teacher_bias=rand(v, seed=seed + 5),
        target=labels(lead, v, seed, ignore=(2, 5)),
    )


def materialized(method, p, reduction="mean", temperature=2.0, gamma=1.3, ce_weight=0.0, teacher_logits=None):
    """The reference: logits with autograd, then nkd_loss / kd_loss / F.cross_entropy."""
    z = p["hidden"] @ p["weight"].T + p["bias"]
    u = p["teacher_hidden"] @ p["teacher_weight"].T + p["teacher_bias"] if teacher_logits is None else teacher_logits
    t = p["target"]
    if method == "nkd":
        loss = nkd_loss(z, u, t, temperature=temperature, gamma=gamma, reduction=reduction)
    else:
        loss = kd_loss(z, u, t, temperature=temperature, reduction=reduction)
    if ce_weight:
        v = z.shape[-1]
        ce = F.cross_entropy(z.reshape(-1, v), t.reshape(-1), reduction="none" if reduction == "none" else "sum")
        if reduction == "mean":  # F.cross_entropy's mean is NaN when every row is ignored; ours is 0
            ce = ce / (t != -100).sum().clamp(min=1)
        loss = loss + ce_weight * (ce.reshape(t.shape) if reduction == "none" else ce)
    return loss


def fused(method, p, reduction="mean", temperature=2.0, gamma=1.3, ce_weight=0.0, chunk_size=None, **teacher):
    if not teacher:
        teacher = dict(teacher_hidden=p["teacher_hidden"], teacher_weight=p["teacher_weight"], teacher_bias=p["teacher_bias"])
    kw = dict(bias=p["bias"], temperature=temperature, ce_weight=ce_weight, reduction=reduction, chunk_size=chunk_size, **teacher)
    if method == "nkd":
        return fused_linear_nkd_loss(p["hidden"], p["weight"], target=p["target"], gamma=gamma, **kw)
    return fused_linear_kd_loss(p["hidden"], p["weight"], target=p["target"], **kw)


def value_and_grads(fn, p, reduction):
    xs = (p["hidden"], p["weight"], p["bias"])
    for x in xs:
        x.grad = None
    out = fn()
    if reduction == "none":  # weight rows differently so per-row gradients are checked
        (out * torch.arange(1, out.numel() + 1, dtype=out.dtype).reshape(out.shape)).sum().backward()
    else:
        out.backward()
    return [out.detach()] + [x.grad.clone() for x in xs]


def assert_same(a, b, rtol=1e-7, atol=1e-12):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- equality with the materialized path
@pytest.mark.parametrize("method", ["nkd", "kd"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 3, 13, 40, None])
def test_equals_materialized_loss_and_gradients(method, reduction, chunk_size):
    p = problem()
    kw = dict(reduction=reduction, ce_weight=0.0)
    ours = value_and_grads(lambda: fused(method, p, chunk_size=chunk_size, **kw), p, reduction)
    ref = value_and_grads(lambda: materialized(method, p, **kw), p, reduction)
    assert_same(ours, ref)


@pytest.mark.parametrize("method", ["nkd", "kd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_in_the_same_pass(method, reduction):
    p = problem(seed=3)
    ours = value_and_grads(lambda: fused(method, p, reduction=reduction, ce_weight=0.7, chunk_size=4), p, reduction)
    ref = value_and_grads(lambda: materialized(method, p, reduction=reduction, ce_weight=0.7), p, reduction)
    assert_same(ours, ref)
    # and the CE part alone (gamma = 0, teacher = student: the KD term and its gradient vanish)
    if method == "nkd":
        q = dict(p)
        base = value_and_grads(lambda: fused("nkd", q, reduction=reduction, ce_weight=0.7, gamma=0.0), q, reduction)
        base0 = value_and_grads(lambda: fused("nkd", q, reduction=reduction, ce_weight=0.0, gamma=0.0), q, reduction)
        z = q["hidden"] @ q["weight"].T + q["bias"]
        ce = F.cross_entropy(z, q["target"], reduction=reduction)
        torch.testing.assert_close(base[0] - base0[0], 0.7 * ce.detach(), rtol=1e-7, atol=1e-12)


def test_token_shaped_input_and_teacher_wider_than_student():
    p = problem(lead=(3, 5), h=4, ht=9, v=17, seed=7)
    for method in ("nkd", "kd"):
        for reduction in ("mean", "none"):
            ours = value_and_grads(lambda: fused(method, p, reduction=reduction, chunk_size=4), p, reduction)  # noqa: B023
            ref = value_and_grads(lambda: materialized(method, p, reduction=reduction), p, reduction)  # noqa: B023
            assert ours[0].shape == ref[0].shape
            assert_same(ours, ref)


def test_precomputed_teacher_logits_equal_teacher_head():
    p = problem(seed=11)
    u = p["teacher_hidden"] @ p["teacher_weight"].T + p["teacher_bias"]
    for method in ("nkd", "kd"):
        a = value_and_grads(lambda: fused(method, p, chunk_size=5, teacher_logits=u), p, "mean")  # noqa: B023
        b = value_and_grads(lambda: materialized(method, p), p, "mean")  # noqa: B023
        assert_same(a, b)


def test_without_bias_and_only_some_inputs_requiring_grad():
    p = problem(seed=4)
    h, w = p["hidden"].detach(), p["weight"].detach().requires_grad_(True)
    th, tw = p["teacher_hidden"], p["teacher_weight"]
    out = fused_linear_nkd_loss(h, w, th, tw, p["target"], chunk_size=3)
    out.backward()
    w2 = w.detach().clone().requires_grad_(True)
    nkd_loss(h @ w2.T, th @ tw.T, p["target"]).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-7, atol=1e-12)
    with torch.no_grad():  # no graph, same value
        torch.testing.assert_close(fused_linear_nkd_loss(h, w, th, tw, p["target"]), out.detach())


def test_kd_without_target_uses_every_row():
    p = problem(seed=5)
    z = p["hidden"] @ p["weight"].T
    u = p["teacher_hidden"] @ p["teacher_weight"].T
    ours = fused_linear_kd_loss(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"], temperature=3.0, chunk_size=4)
    torch.testing.assert_close(ours, kd_loss(z, u, temperature=3.0), rtol=1e-7, atol=1e-12)


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("method", ["nkd", "kd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(method, reduction):
    p = problem(n=6, h=3, ht=4, v=5, seed=2)
    p["target"] = labels((6,), 5, 2, ignore=(1,))
    th, tw = p["teacher_hidden"], p["teacher_weight"]
    wts = torch.arange(1, 7, dtype=D)
    loss = fused_linear_nkd_loss if method == "nkd" else fused_linear_kd_loss
    extra = dict(gamma=1.5) if method == "nkd" else {}

    def f(h, w, b):
        out = loss(h, w, th, tw, p["target"], bias=b, temperature=2.0, ce_weight=0.3, reduction=reduction, chunk_size=4, **extra)
        return (out * wts).sum() if reduction == "none" else out

    assert torch.autograd.gradcheck(f, (p["hidden"], p["weight"], p["bias"]), eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 9), v=st.integers(2, 8), seed=st.integers(0, 10_000), chunk=st.integers(1, 12),
    temperature=st.floats(0.5, 4.0), gamma=st.floats(0.0, 3.0), n_ignored=st.integers(0, 9),
)
def test_any_chunk_size_gives_the_materialized_result(n, v, seed, chunk, temperature, gamma, n_ignored):
    p = problem(n=n, h=3, ht=2, v=v, seed=seed)
    p["target"] = labels((n,), v, seed, ignore=range(min(n_ignored, n)))
    kw = dict(temperature=temperature, gamma=gamma, ce_weight=0.5)
    ours = value_and_grads(lambda: fused("nkd", p, chunk_size=chunk, **kw), p, "mean")
    ref = value_and_grads(lambda: materialized("nkd", p, **kw), p, "mean")
    assert_same(ours, ref)
    assert all(torch.isfinite(x).all() for x in ours)


def test_teacher_equal_to_student_leaves_only_the_target_term():
    p = problem(seed=6)
    h, w = p["hidden"], p["weight"]
    b_ = p["bias"]
    a = value_and_grads(lambda: fused_linear_nkd_loss(h, w, h.detach(), w.detach(), p["target"], bias=b_, teacher_bias=b_.detach(),
                                                      gamma=2.0), p, "mean")
    b = value_and_grads(lambda: fused_linear_nkd_loss(h, w, h.detach(), w.detach(), p["target"], bias=b_, teacher_bias=b_.detach(),
                                                      gamma=0.0), p, "mean")
    assert_same(a[1:], b[1:], atol=1e-10)
    kd = fused_linear_kd_loss(h, w, h.detach(), w.detach(), p["target"])
    assert abs(float(kd.detach())) < 1e-12


def test_default_chunk_size_bounds_the_buffer():
    assert default_chunk_size(32000) == 512
    assert default_chunk_size(128256) == 261  # a [chunk, V] float32 buffer of at most 128 MiB
    assert default_chunk_size(128256, torch.bfloat16) == 512
    assert default_chunk_size(2**30) == 1
    p = problem(seed=8)
    assert_same(value_and_grads(lambda: fused("nkd", p), p, "mean"), value_and_grads(lambda: materialized("nkd", p), p, "mean"))


# ----------------------------------------------------------------------------- sparse (top-k) teachers
def topk_of(u, k):
    lp = torch.log_softmax(u, -1)
    vals, ids = lp.topk(k, dim=-1)
    return ids, vals


def ref_sparse_nkd(z, ids, lp, t, rest, temperature, gamma):
    """NKD with a sparse teacher written from the documented definitions, one row at a time."""
    n, v = z.shape
    out = []
    for r in range(n):
        if int(t[r]) == -100:
            out.append(z.new_zeros(()))
            continue
        p = {int(i): math.exp(float(x)) for i, x in zip(ids[r], lp[r])}
        m = sum(p.values())
        k = len(p)
        if rest == "zero":
            full = torch.tensor([p.get(i, 0.0) / m for i in range(v)], dtype=D)
        else:
            rr = max(1 - m, 0.0)
            full = torch.tensor([p.get(i, rr / (v - k)) for i in range(v)], dtype=D)
        tr = int(t[r])
        t_t = full[tr]
        keep = [i for i in range(v) if i != tr]
        th = full[keep] ** (1 / temperature)  # T_hat at temperature λ from probabilities
        th = th / th.sum()
        log_sh = torch.log_softmax(z[r, keep] / temperature, 0)
        out.append(-t_t * torch.log_softmax(z[r], 0)[tr] - gamma * temperature**2 * (th * log_sh).sum())
    return torch.stack(out)


@pytest.mark.parametrize("rest", ["zero", "uniform"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_teacher_follows_its_definition(rest, temperature):
    p = problem(n=9, v=10, seed=9)
    u = p["teacher_hidden"] @ p["teacher_weight"].T
    ids, lp = topk_of(u, 4)
    # make sure some targets fall outside the top-k set and some inside
    t = p["target"].clone()
    t[0], t[1] = ids[0, 0], int(torch.tensor([i for i in range(10) if i not in ids[1].tolist()])[0])
    p["target"] = t
    out = fused_linear_nkd_loss(p["hidden"], p["weight"], target=t, bias=p["bias"], teacher_topk=(ids, lp), topk_rest=rest,
                                temperature=temperature, gamma=1.3, reduction="none", chunk_size=4)
    z = (p["hidden"] @ p["weight"].T + p["bias"]).detach()
    torch.testing.assert_close(out.detach(), ref_sparse_nkd(z, ids, lp, t, rest, temperature, 1.3), rtol=1e-7, atol=1e-12)
    # and the gradient is still that of the materialized loss on the documented dense teacher
    fill = torch.full_like(u, float("-inf"))
    if rest == "uniform":
        r = 1 - lp.exp().sum(-1, keepdim=True)
        fill = (r / (10 - 4)).log().expand_as(u).clone()
    dense_u = fill.scatter(1, ids, lp)
    ours = value_and_grads(lambda: fused("nkd", p, teacher_topk=(ids, lp), topk_rest=rest, chunk_size=3), p, "mean")
    ref = value_and_grads(lambda: materialized("nkd", p, teacher_logits=dense_u), p, "mean")
    assert_same(ours, ref)


@pytest.mark.parametrize("method", ["nkd", "kd"])
@pytest.mark.parametrize("rest", ["zero", "uniform"])
def test_sparse_teacher_with_the_whole_vocabulary_equals_dense(method, rest):
    p = problem(n=8, v=7, seed=12)
    u = p["teacher_hidden"] @ p["teacher_weight"].T + p["teacher_bias"]
    ids, lp = topk_of(u, 7)
    a = value_and_grads(lambda: fused(method, p, teacher_topk=(ids, lp), topk_rest=rest, ce_weight=0.2), p, "mean")
    b = value_and_grads(lambda: materialized(method, p, ce_weight=0.2), p, "mean")
    assert_same(a, b)


@pytest.mark.parametrize("method", ["nkd", "kd"])
def test_uniform_rest_equals_dense_when_the_teacher_is_flat_outside_the_top_k(method):
    p = problem(n=10, v=12, seed=13)
    u = p["teacher_hidden"] @ p["teacher_weight"].T
    ids, _ = topk_of(u, 5)
    flat = torch.full_like(u, -1.0).scatter(1, ids, u.gather(1, ids).abs() + 1)  # top-k above a flat rest
    ids, lp = topk_of(flat, 5)
    a = value_and_grads(lambda: fused(method, p, teacher_topk=(ids, lp), topk_rest="uniform"), p, "mean")
    b = value_and_grads(lambda: materialized(method, p, teacher_logits=flat), p, "mean")
    assert_same(a, b)


@pytest.mark.parametrize("method", ["nkd", "kd"])
def test_zero_rest_equals_dense_when_the_teacher_has_no_mass_outside_the_top_k(method):
    p = problem(n=10, v=12, seed=14)
    u = p["teacher_hidden"] @ p["teacher_weight"].T
    ids, _ = topk_of(u, 5)
    cut = torch.full_like(u, -1e4).scatter(1, ids, u.gather(1, ids))  # exp(-1e4) == 0 in float64
    ids, lp = topk_of(cut, 5)
    a = value_and_grads(lambda: fused(method, p, teacher_topk=(ids, lp), topk_rest="zero", ce_weight=0.1), p, "mean")
    b = value_and_grads(lambda: materialized(method, p, teacher_logits=cut, ce_weight=0.1), p, "mean")
    assert_same(a, b)


def test_uniform_rest_stays_finite_when_the_top_k_holds_all_the_mass():
    p = problem(n=4, v=6, seed=15)
    ids = torch.tensor([[0], [1], [2], [3]])
    lp = torch.zeros(4, 1, dtype=D)  # probability 1 on one token
    p["target"] = torch.tensor([0, 2, 2, 5])
    out = value_and_grads(lambda: fused("nkd", p, teacher_topk=(ids, lp), topk_rest="uniform"), p, "mean")
    assert all(torch.isfinite(x).all() for x in out)


# ----------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["nkd", "kd"])
def test_low_precision_inputs_compute_in_float32_and_return_input_dtype_grads(dtype, method):
    p = problem(n=24, h=16, ht=16, v=50, seed=16)
    h = p["hidden"].detach().to(dtype).requires_grad_(True)
    w = (p["weight"].detach() * 0.5).to(dtype).requires_grad_(True)
    th, tw = p["teacher_hidden"].to(dtype), p["teacher_weight"].to(dtype)
    fn = fused_linear_nkd_loss if method == "nkd" else fused_linear_kd_loss
    out = fn(h, w, th, tw, p["target"], ce_weight=0.5, chunk_size=5)
    assert out.dtype == torch.float32
    out.backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    # the materialized path in the same dtype
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref_fn = nkd_loss if method == "nkd" else kd_loss
    z = h2 @ w2.T
    ref = ref_fn(z, th @ tw.T, p["target"], temperature=1.0) + 0.5 * F.cross_entropy(z.float(), p["target"])
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.grad.float(), h2.grad.float(), rtol=0.02, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), w2.grad.float(), rtol=0.02, atol=2e-3)


def test_autocast_runs_the_head_in_the_autocast_dtype_like_f_linear():
    p = problem(n=20, h=16, ht=8, v=40, seed=17)
    h = p["hidden"].detach().float().requires_grad_(True)
    w = p["weight"].detach().float().requires_grad_(True)
    th, tw = p["teacher_hidden"].float(), p["teacher_weight"].float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_nkd_loss(h, w, th, tw, p["target"], chunk_size=6)
        z = F.linear(h, w)
        ref = nkd_loss(z, F.linear(th, tw), p["target"])
    assert z.dtype == torch.bfloat16 and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    gh, gw = torch.autograd.grad(out, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert gh.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(gh, rh, rtol=0.02, atol=1e-3)
    torch.testing.assert_close(gw, rw, rtol=0.02, atol=1e-3)


def test_float32_matches_float64_reference():
    p = problem(n=30, h=8, ht=6, v=300, seed=18)
    ref = value_and_grads(lambda: fused("nkd", p, ce_weight=1.0), p, "mean")
    q = {k: (v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v) for k, v in p.items()}
    ours = value_and_grads(lambda: fused("nkd", q, ce_weight=1.0, chunk_size=7), q, "mean")
    for a, b in zip(ours, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the in-place kernels
KERNEL_SPECS = [KD(temperature=1.0), KD(temperature=2.5), NKD(temperature=1.0, gamma=1.5), NKD(temperature=3.0, gamma=1.3),
                JSD(beta=0.0), JSD(beta=0.0, temperature=2.0), JSD(beta=0.5), JSD(beta=0.3, temperature=1.7), JSD(beta=1.0),
                JSD(beta=1.0, temperature=0.7)]


@pytest.mark.parametrize("spec", KERNEL_SPECS, ids=repr)
@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
def test_in_place_kernel_equals_the_spec_rows(spec, ce_weight):
    """chunk_rows (in place, no masks) = rows() (+ the CE term), value and gradient, with and without grad."""
    z, u = rand(9, 50, seed=30, scale=3.0), rand(9, 50, seed=31, scale=3.0)
    idx = labels((9,), 50, seed=32)
    ref = _spec_rows(spec, ce_weight)(z.clone(), u.clone(), idx, True)
    loss, grad = spec.chunk_rows(z.clone(), u.clone(), idx, True, ce_weight=ce_weight)
    torch.testing.assert_close(loss, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref[1], rtol=1e-12, atol=1e-12)
    loss2, none = spec.chunk_rows(z.clone(), u.clone(), idx, False, ce_weight=ce_weight)
    assert none is None
    torch.testing.assert_close(loss2, loss, rtol=1e-14, atol=0)


@pytest.mark.parametrize("spec", [KD(temperature=1.0), JSD(beta=0.0), JSD(beta=0.5), JSD(beta=1.0)], ids=repr)
def test_in_place_kernel_declines_a_non_finite_row(spec):
    """A teacher with −∞ logits (a sparse teacher's zeros): 0·log 0 terms are NaN without masks, so the
    kernel returns None and the driver takes rows()."""
    z, u = rand(4, 10, seed=33), rand(4, 10, seed=34)
    u[1, 3] = float("-inf")
    assert spec.chunk_rows(z.clone(), u.clone(), torch.zeros(4, dtype=torch.long), True) is None


@pytest.mark.parametrize("method", ["nkd", "kd", "jsd0", "jsd3", "jsd1"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_blocks_within_a_chunk_and_a_fallback_block(monkeypatch, method, reduction):
    """Chunks of 7 rows run by the kernels in blocks of 3; one student logit −∞ sends its chunk to rows()."""
    monkeypatch.setattr(chunked, "_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(chunked, "_BLOCK_ROWS_MIN", 3)
    p = problem(n=20, v=11, seed=35)
    if method in ("nkd", "kd"):
        ours = value_and_grads(lambda: fused(method, p, reduction=reduction, ce_weight=0.4, chunk_size=7), p, reduction)
        ref = value_and_grads(lambda: materialized(method, p, reduction=reduction, ce_weight=0.4), p, reduction)
        assert_same(ours, ref)
    else:
        beta = {"jsd0": 0.0, "jsd3": 0.3, "jsd1": 1.0}[method]
        th, tw, tb = p["teacher_hidden"], p["teacher_weight"], p["teacher_bias"]

        def run(**kw):
            return fused_linear_jsd_loss(p["hidden"], p["weight"], th, tw, p["target"], bias=p["bias"], teacher_bias=tb, beta=beta,
                                         temperature=1.5, reduction=reduction, **kw)

        ours = value_and_grads(lambda: run(chunk_size=7), p, reduction)
        with monkeypatch.context() as m:
            m.setattr(chunked, "_fast_rows", lambda spec, w: None)  # rows() only
            ref = value_and_grads(lambda: run(chunk_size=7), p, reduction)
        assert_same(ours, ref, rtol=1e-12, atol=1e-14)
    # a −∞ student logit (a masked vocabulary entry): the kernels decline, rows() masks its 0·log 0 terms
    with torch.no_grad():
        p["bias"][4] = float("-inf")
    if method in ("nkd", "kd"):
        ours = fused(method, p, reduction=reduction, chunk_size=7)
        ref = materialized(method, p, reduction=reduction)
        torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-12)


def test_dense_teacher_logits_are_not_overwritten():
    p = problem(n=12, v=9, seed=36)
    u = rand(12, 9, seed=37)
    keep = u.clone()
    for fn in (fused_linear_nkd_loss, fused_linear_kd_loss, fused_linear_jsd_loss):
        fn(p["hidden"], p["weight"], target=p["target"], teacher_logits=u, chunk_size=5).backward()
        assert torch.equal(u, keep)


@pytest.mark.parametrize("method", ["nkd", "kd", "jsd"])
def test_bf16_logits_with_float32_maths_match_float64_of_the_same_logits(method):
    """bf16 inputs: the logits of the bf16 matmul, the loss maths in float32 — within 1e-5 of float64 on those logits."""
    g = torch.Generator().manual_seed(38)
    n, h, v = 64, 32, 3000
    hidden = torch.randn(n, h, generator=g).bfloat16().requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) * h**-0.5).bfloat16().requires_grad_(True)
    th, tw = torch.randn(n, h, generator=g).bfloat16(), (torch.randn(v, h, generator=g) * 1.5 * h**-0.5).bfloat16()
    t = torch.randint(0, v, (n,), generator=g)
    fn = {"nkd": fused_linear_nkd_loss, "kd": fused_linear_kd_loss, "jsd": fused_linear_jsd_loss}[method]
    out = fn(hidden, weight, th, tw, t, chunk_size=24)
    z, u = (hidden.detach() @ weight.detach().T).double(), (th @ tw.T).double()
    ref = {"nkd": nkd_loss(z, u, t), "kd": kd_loss(z, u, t, temperature=1.0), "jsd": jsd_loss(z, u, t)}[method]
    assert out.dtype == torch.float32
    assert abs(float(out.detach()) - float(ref)) <= 1e-5 * abs(float(ref))
    out.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- teachers are constants, empty input
def test_teacher_tensors_requiring_grad_are_treated_as_constants():
    p = problem(seed=19)
    th = p["teacher_hidden"].clone().requires_grad_(True)
    tw = p["teacher_weight"].clone().requires_grad_(True)
    out = fused_linear_nkd_loss(p["hidden"], p["weight"], th, tw, p["target"])
    out.backward()
    assert th.grad is None and tw.grad is None
    assert p["hidden"].grad is not None
    u = (th @ tw.T).detach().requires_grad_(True)
    fused_linear_kd_loss(p["hidden"], p["weight"], teacher_logits=u).backward()
    assert u.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input_and_all_ignored_rows_give_zero_not_nan(reduction):
    p = problem(seed=20)
    w = p["weight"]
    empty = torch.zeros(0, 5, dtype=D, requires_grad=True)
    out = fused_linear_nkd_loss(empty, w, torch.zeros(0, 7, dtype=D), p["teacher_weight"], torch.zeros(0, dtype=torch.long),
                                reduction=reduction)
    assert out.numel() == (0 if reduction == "none" else 1)
    if reduction != "none":
        assert float(out.detach()) == 0.0
        out.backward()
        assert empty.grad.shape == (0, 5) and float(w.grad.abs().sum()) == 0.0
    t = torch.full((13,), -100)
    for fn in (fused_linear_nkd_loss, fused_linear_kd_loss):
        out = fn(p["hidden"], w, p["teacher_hidden"], p["teacher_weight"], t, reduction=reduction)
        assert torch.isfinite(out).all() and float(out.detach().abs().sum()) == 0.0
        out.sum().backward()
        assert float(p["hidden"].grad.abs().sum()) == 0.0


# ----------------------------------------------------------------------------- modules
def test_modules_forward_to_functions():
    p = problem(seed=21)
    th, tw, t = p["teacher_hidden"], p["teacher_weight"], p["target"]
    m = FusedLinearNKDLoss(temperature=2.0, gamma=1.3, ce_weight=0.5, chunk_size=4)
    torch.testing.assert_close(m(p["hidden"], p["weight"], th, tw, t, bias=p["bias"]),
                               fused_linear_nkd_loss(p["hidden"], p["weight"], th, tw, t, bias=p["bias"], temperature=2.0,
                                                     gamma=1.3, ce_weight=0.5))
    k = FusedLinearKDLoss(temperature=3.0, reduction="sum")
    torch.testing.assert_close(k(p["hidden"], p["weight"], target=t, teacher_logits=th @ tw.T),
                               kd_loss(p["hidden"] @ p["weight"].T, th @ tw.T, t, temperature=3.0, reduction="sum"))
    assert "gamma=1.3" in repr(m)


# ----------------------------------------------------------------------------- bad input
def _args(**over):
    p = problem(seed=22)
    kw = dict(hidden=p["hidden"], weight=p["weight"], teacher_hidden=p["teacher_hidden"], teacher_weight=p["teacher_weight"],
              target=p["target"])
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(weight=torch.randn(11, 6, dtype=D)), ValueError, r"weight has H=6, hidden has H=5"),
        (dict(teacher_weight=torch.randn(11, 3, dtype=D)), ValueError, r"teacher_weight has H=3, teacher_hidden has H=7"),
        (dict(teacher_weight=torch.randn(12, 7, dtype=D)), ValueError, r"teacher_weight has V=12, weight has V=11"),
        (dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(13, 10, dtype=D)), ValueError,
         r"teacher_logits has V=10, weight has V=11"),
        (dict(teacher_hidden=torch.randn(12, 7, dtype=D)), ValueError, "teacher_hidden must have leading shape"),
        (dict(target=torch.tensor([0] * 12 + [11])), ValueError, r"\[0, 11\).*found 11"),
        (dict(target=torch.tensor([0] * 12 + [-1])), ValueError, "ignore_index"),
        (dict(target=torch.zeros(12, dtype=torch.long)), ValueError, "target must have shape"),
        (dict(target=torch.zeros(13)), TypeError, "hard labels only"),
        (dict(target=None), ValueError, "target is required"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(gamma=float("nan")), ValueError, "gamma"),
        (dict(ce_weight=-1.0), ValueError, "ce_weight"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=-3), ValueError, "chunk_size"),
        (dict(chunk_size=2.5), ValueError, "chunk_size"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(target=torch.zeros(13, dtype=torch.long, device="meta")), ValueError, "target must be on hidden's device"),
        (dict(bias=torch.randn(10, dtype=D)), ValueError, "bias must have shape"),
        (dict(teacher_weight=None), ValueError, "teacher_weight is required"),
        (dict(teacher_hidden=None, teacher_weight=None), ValueError, "exactly one teacher"),
        (dict(teacher_logits=torch.randn(13, 11, dtype=D)), ValueError, "exactly one teacher"),
        (dict(hidden=torch.ones(13, 5, dtype=torch.long)), TypeError, "hidden must be a floating-point"),
        (dict(weight=torch.randn(11, 5, 1, dtype=D)), ValueError, r"weight must have shape \[V, H\]"),
        (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(torch.zeros(13, 3, dtype=torch.long), torch.zeros(13, 3))),
         ValueError, "distinct"),
        (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(torch.arange(3).repeat(13, 1) + 9, torch.zeros(13, 3) - 2)),
         ValueError, r"ids must lie in \[0, 11\)"),
        (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(torch.arange(3).repeat(13, 1), torch.zeros(13, 3) - 0.1)),
         ValueError, "sum to at most 1"),
        (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(torch.arange(3).repeat(13, 1), torch.full((13, 3), float("nan")))),
         ValueError, "finite log-probabilities"),
        (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(torch.arange(1).repeat(13, 1), torch.zeros(13, 1) - 1)),
         ValueError, r"2 <= k"),
        (dict(teacher_hidden=None, teacher_weight=None, teacher_topk=(torch.arange(3).repeat(13, 1), torch.zeros(13, 3) - 2),
              topk_rest="spread"), ValueError, "topk_rest"),
    ],
)
def test_bad_input_is_rejected_with_a_named_argument(over, exc, match):
    kw = _args(**over)
    with pytest.raises(exc, match=match):
        fused_linear_nkd_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("teacher_hidden"), kw.pop("teacher_weight"),
                              kw.pop("target"), **kw)


def test_kd_bad_input():
    p = problem(seed=23)
    with pytest.raises(ValueError, match="ce_weight > 0"):
        fused_linear_kd_loss(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"], ce_weight=1.0)
    with pytest.raises(ValueError, match="teacher_weight has V=12, weight has V=11"):
        fused_linear_kd_loss(p["hidden"], p["weight"], p["teacher_hidden"], torch.randn(12, 7, dtype=D))
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearKDLoss(chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearNKDLoss(temperature=float("nan"))


def test_value_checks_can_be_switched_off():
    p = problem(seed=24)
    bad = torch.tensor([0] * 12 + [3])
    with value_checks(False):
        fused_linear_nkd_loss(p["hidden"], p["weight"], p["teacher_hidden"], p["teacher_weight"], bad)
        with pytest.raises(ValueError, match="H=6"):  # shape checks stay on
            fused_linear_nkd_loss(p["hidden"], torch.randn(11, 6, dtype=D), p["teacher_hidden"], p["teacher_weight"], bad)
