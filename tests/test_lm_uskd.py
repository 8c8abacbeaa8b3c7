"""Token-level USKD fused with the LM head (nkd.losses.fused_uskd): against the dense ``uskd_loss``
on the materialized logits in float64 (values and all six gradients), gradcheck, chunk-size
independence, ignored tokens out of the loss and of the batch mean, the exact rank's fast sort,
the module form, and bad input named by argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nkd.losses import FusedLinearUSKDLoss, fused_linear_uskd_loss, uskd_loss
from nkd.losses._common import descending_order
from nkd.losses.chunked import LinearTeacher, fused_linear_loss
from nkd.losses.uskd import USKD

F64 = torch.float64


def make(n=13, h=5, hw=7, v=17, seed=0, dtype=F64, ignored=(2, 7), bias=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype).requires_grad_()

    x = dict(hidden=r(n, h), weight=r(v, h), weak_hidden=r(n, hw), weak_weight=r(v, hw, scale=0.7),
             bias=r(v) if bias else None, weak_bias=r(v) if bias else None)
    target = torch.randint(0, v, (n,), generator=g)
    target[list(ignored)] = -100
    return x, target


def materialized(x, target, ce_weight=0.0, reduction="mean", ignore_index=-100, **hp):
    """The reference: the dense USKD (tested against the official formulation) + CE on the full logits."""
    z = x["hidden"] @ x["weight"].T + (0 if x["bias"] is None else x["bias"])
    w = x["weak_hidden"] @ x["weak_weight"].T + (0 if x["weak_bias"] is None else x["weak_bias"])
    loss = uskd_loss(z, w, target, reduction=reduction, ignore_index=ignore_index, **hp)
    if ce_weight:
        ce = F.cross_entropy(z.reshape(-1, z.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                             reduction=reduction).reshape(loss.shape)
        loss = loss + ce_weight * ce
    return loss


def fused(x, target, **kw):
    return fused_linear_uskd_loss(x["hidden"], x["weight"], x["weak_hidden"], x["weak_weight"], target, bias=x["bias"],
                                  weak_bias=x["weak_bias"], **kw)


def grads(loss, x):
    keys = [k for k, t in x.items() if t is not None and t.requires_grad]
    return dict(zip(keys, torch.autograd.grad(loss, [x[k] for k in keys])))


def assert_same(a, b, x, rtol=1e-7, weights=None, atol=1e-12):
    """Values and every gradient (for reduction "none": of Σ weights·loss) to ``rtol``."""
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    if weights is not None:
        a, b = (a * weights).sum(), (b * weights).sum()
    ga, gb = grads(a, x), grads(b, x)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"gradient of {k}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rank", ["paper", "official"])
def test_equals_the_materialized_dense_uskd_float64(reduction, rank):
    x, target = make()
    hp = dict(alpha=0.7, beta=0.4, mu=0.3, rank=rank)
    ours = fused(x, target, ce_weight=0.3, reduction=reduction, chunk_size=4, **hp)
    ref = materialized(x, target, ce_weight=0.3, reduction=reduction, **hp)
    weights = torch.linspace(0.5, 2.0, 13, dtype=F64) if reduction == "none" else None
    assert_same(ours, ref, x, weights=weights)


def test_defaults_token_shaped_input_and_no_bias():
    x, target = make(n=12, bias=False, ignored=(0,))
    x = {k: (None if t is None else t.detach().reshape(3, 4, -1).requires_grad_() if k.endswith("hidden") else t)
         for k, t in x.items()}
    t3 = target.reshape(3, 4)
    assert_same(fused(x, t3), materialized(x, t3), x)
    none = fused(x, t3, reduction="none")
    assert none.shape == (3, 4) and float(none[0, 0].detach()) == 0.0


def test_gradcheck_all_six_inputs():
    # p = sg(s_t² + 1 − mean s_t²) is a constant of the gradient (stop-gradient, as in USKD), so the
    # value's numerical Jacobian w.r.t. the student is USKD's gradient only at α = 0; the weak head
    # does not enter p and is checked with α > 0 too (as the dense form's gradcheck)
    x, target = make(n=6, h=3, hw=4, v=7, ignored=(1,))
    names = list(x)

    def fn(*tensors, **kw):
        return fused(dict(zip(names, tensors)), target, mu=0.5, beta=0.5, ce_weight=0.2, chunk_size=4, **kw)

    assert torch.autograd.gradcheck(lambda *t: fn(*t, alpha=0.0), tuple(x[k] for k in names), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda *t: fn(*t, alpha=0.0, reduction="none").sum(), tuple(x[k] for k in names),
                                    eps=1e-6, atol=1e-5)
    student = {k: x[k].detach() for k in ("hidden", "weight", "bias")}
    weak = [k for k in names if k.startswith("weak")]

    def fn_weak(*tensors):
        return fused({**student, **dict(zip(weak, tensors))}, target, alpha=1.0, mu=0.5, beta=0.5, chunk_size=2)

    assert torch.autograd.gradcheck(fn_weak, tuple(x[k] for k in weak), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 100, None])
def test_the_result_does_not_depend_on_the_chunk_size(chunk):
    x, target = make(n=13, v=11, seed=3)
    ref = fused(x, target, ce_weight=1.0, chunk_size=13)
    assert_same(fused(x, target, ce_weight=1.0, chunk_size=chunk), ref, x, rtol=1e-12)


def test_ignored_tokens_are_out_of_the_loss_and_of_the_batch_mean():
    x, target = make(n=10, ignored=(1, 4, 5), seed=4)
    keep = target != -100
    # the same call on the kept tokens only: equal value, equal gradients of the shared tensors
    kept = {k: (t.detach()[keep].requires_grad_() if k.endswith("hidden") else t) for k, t in x.items()}
    a = fused(x, target, ce_weight=0.5, chunk_size=3)
    b = fused(kept, target[keep], ce_weight=0.5, chunk_size=3)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    ga, gb = grads(a, x), grads(b, kept)
    for k in ("weight", "weak_weight", "bias", "weak_bias"):
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-12, atol=1e-15)
    for k in ("hidden", "weak_hidden"):
        assert not ga[k][~keep].any()
        torch.testing.assert_close(ga[k][keep], gb[k], rtol=1e-12, atol=1e-15)
    # an ignored token's hidden states change nothing (they would move the batch mean otherwise)
    y = dict(x)
    y["hidden"] = x["hidden"].detach().clone()
    y["hidden"][~keep] *= 5
    torch.testing.assert_close(fused(y, target, ce_weight=0.5), fused(x, target, ce_weight=0.5), rtol=1e-12, atol=0)
    # another ignore_index
    t2 = torch.where(keep, target, torch.full_like(target, 3 if 3 not in target[keep] else 16))
    ii = int(t2[~keep][0])
    assert_same(fused(x, t2, ignore_index=ii), materialized(x, t2, ignore_index=ii), x)


def test_the_batch_mean_couples_the_tokens_of_one_call():
    # the mean is over the call: two calls on halves differ from one call on the whole
    x, target = make(n=8, ignored=(), seed=5)
    whole = fused(x, target, reduction="sum")
    halves = sum(fused({k: (t[s] if k.endswith("hidden") else t) for k, t in x.items()}, target[s], reduction="sum")
                 for s in (slice(0, 4), slice(4, 8)))
    assert abs(float((whole - halves).detach())) > 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_valid_token_gives_zero_and_zero_gradients(reduction):
    x, target = make(n=4, ignored=(0, 1, 2, 3))
    loss = fused(x, target, ce_weight=1.0, reduction=reduction)
    assert not loss.any() and not torch.isnan(loss).any()
    for g in grads(loss.sum(), x).values():
        assert not g.any()
    empty, t0 = make(n=0, ignored=())
    assert float(fused(empty, t0, reduction=reduction).sum().detach()) == 0.0


def test_weak_head_tied_to_the_lm_head():
    x, target = make(hw=5, seed=6)
    x["weak_weight"] = x["weight"]  # logit-lens weak head: the gradients of both uses add up
    assert_same(fused(x, target, mu=0.2, ce_weight=1.0), materialized(x, target, mu=0.2, ce_weight=1.0), x)


def test_only_some_inputs_requiring_grad():
    x, target = make(seed=7)
    x = {k: (t.detach() if k in ("weight", "weak_bias") else t) for k, t in x.items()}
    assert_same(fused(x, target, chunk_size=5), materialized(x, target), x)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, target), materialized(x, target), rtol=1e-7, atol=0)


def test_float32_at_a_vocabulary_that_takes_the_fast_sort():
    # V = 300, 16-token chunks: 4800 scores per chunk, above the threshold of the int64-key sort
    x, target = make(n=40, h=16, hw=12, v=300, seed=8, dtype=torch.float32)
    ours = fused(x, target, ce_weight=1.0, chunk_size=16, mu=0.1)
    ref = materialized(x, target, ce_weight=1.0, mu=0.1)
    assert_same(ours, ref, x, rtol=2e-5, atol=1e-6)
    x64 = {k: (None if t is None else t.detach().double().requires_grad_()) for k, t in x.items()}
    torch.testing.assert_close(ours.double(), materialized(x64, target, ce_weight=1.0, mu=0.1), rtol=1e-5, atol=0)


def test_bf16_autocast_runs_the_heads_in_bf16_and_returns_float32():
    x, target = make(n=9, h=8, hw=8, v=33, dtype=torch.float32, seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused(x, target, ce_weight=1.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x["weak_weight"].grad.dtype == torch.float32 and torch.isfinite(x["weak_weight"].grad).all()
    ref = materialized({k: (None if t is None else t.detach().bfloat16().float()) for k, t in x.items()}, target, ce_weight=1.0)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_descending_order_is_the_stable_sort(threads):
    g = torch.Generator().manual_seed(10)
    s = torch.randn(37, 500, generator=g).softmax(-1)
    s[:, :60] = 0.0  # ties, resolved by the lower index
    s[:, 30] = -0.0  # equal to +0.0
    s[0, 5:9] = float("-inf")
    s[1, ::3] = s[1, 7]
    s[2] = -s[2]  # negative scores (rank="official")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.testing.assert_close(descending_order(s), torch.sort(s, dim=-1, descending=True, stable=True).indices)
    finally:
        torch.set_num_threads(before)
    small = s[:2, :10]  # below the threshold: torch.sort itself
    torch.testing.assert_close(descending_order(small), torch.sort(small, dim=-1, descending=True, stable=True).indices)


def test_module_owns_the_weak_head():
    torch.manual_seed(11)
    x, target = make(hw=6, bias=False, seed=11)
    m = FusedLinearUSKDLoss(6, 17, mu=0.2, ce_weight=1.0, chunk_size=5)
    assert list(m.parameters()) == [m.head.weight] and m.head.weight.shape == (17, 6)
    ours = m(x["hidden"], x["weight"], x["weak_hidden"], target)
    ref = fused(dict(x, weak_weight=m.head.weight), target, mu=0.2, ce_weight=1.0)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    ours.backward()
    assert m.head.weight.grad is not None and m.head.weight.grad.abs().sum() > 0
    assert FusedLinearUSKDLoss(6, 17, weak_bias=True).head.bias is not None
    assert "mu=0.2" in repr(m)
    for args, kw, match in [((0, 17), {}, "in_features"), ((6, 1), {}, "vocab_size"), ((6, 17), {"mu": -1.0}, "mu"),
                            ((6, 17), {"reduction": "avg"}, "reduction"), ((6, 17), {"chunk_size": 0}, "chunk_size"),
                            ((6, 17), {"rank": "exact"}, "rank"), ((6, 17), {"ce_weight": float("nan")}, "ce_weight")]:
        with pytest.raises((ValueError, TypeError), match=match):
            FusedLinearUSKDLoss(*args, **kw)


def _bad_cases():
    x, t = make(n=6, h=5, hw=7, v=17, bias=True, ignored=(2,))
    d = {k: (None if v is None else v.detach()) for k, v in x.items()}
    return d, t, [
        (dict(weak_weight=torch.randn(17, 6, dtype=F64)), ValueError, r"weak_weight \[V, H\] must match the width of "
                                                                      r"weak_hidden.*H=6.*H=7"),
        (dict(weight=torch.randn(17, 4, dtype=F64)), ValueError, r"weight \[V, H\] must match.*hidden.*H=4.*H=5"),
        (dict(weak_weight=torch.randn(16, 7, dtype=F64), weak_bias=None), ValueError,
         r"weak_weight must have the student's vocabulary.*V=16"),
        (dict(weak_hidden=torch.randn(5, 7, dtype=F64)), ValueError, r"weak_hidden must have leading shape \(6,\)"),
        (dict(weak_bias=torch.randn(16, dtype=F64)), ValueError, r"weak_bias must have shape \[V\] = \(17,\)"),
        (dict(weak_hidden=torch.ones(6, 7, dtype=torch.long)), TypeError, "weak_hidden must be a floating-point"),
        (dict(target=t[:5]), ValueError, r"target must have shape \(6,\)"),
        (dict(target=torch.full((6,), 17)), ValueError, r"target token ids must lie in \[0, 17\)"),
        (dict(target=torch.full((6,), -1)), ValueError, r"ignore_index=-100.*found -1"),
        (dict(target=torch.rand(6, 17)), TypeError, "target must hold integer token ids"),
        (dict(target=None), ValueError, "target is required"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(rank="approx"), ValueError, "rank"),
        (dict(ce_weight=-0.1), ValueError, "ce_weight"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(ignore_index=True), TypeError, "ignore_index"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases()[2])))
def test_bad_input_is_rejected_naming_the_argument(case):
    x, t, cases = _bad_cases()
    over, exc, match = cases[case]
    tensors = {k: over.pop(k) if k in over else x[k] for k in list(x)}
    target = over.pop("target", t)
    with pytest.raises(exc, match=match):
        fused_linear_uskd_loss(tensors["hidden"], tensors["weight"], tensors["weak_hidden"], tensors["weak_weight"], target,
                               bias=tensors["bias"], weak_bias=tensors["weak_bias"], **over)


def test_the_row_wise_driver_points_to_the_uskd_driver():
    x, t = make()
    with pytest.raises(ValueError, match="couples the rows.*fused_linear_uskd_loss"):
        fused_linear_loss(USKD(), x["hidden"], x["weight"], LinearTeacher(x["weak_hidden"], x["weak_weight"]), t)
