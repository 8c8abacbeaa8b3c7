"""Generalized JSD (TRL's convention), dense and fused over the LM head: against an independent
materialized formula in float64, gradcheck, the β = 0 / β = 1 ends, ignore_index, bad input."""

from __future__ import annotations

import pytest
import torch

from nkd.losses import FusedLinearJSDLoss, JSDLoss, fused_linear_jsd_loss, jsd_loss, kd_loss


def reference(z: torch.Tensor, u: torch.Tensor, beta: float, lam: float = 1.0) -> torch.Tensor:
    """Per row, written from the definition with torch.nn.functional.kl_div (mean over rows)."""
    ls, lt = torch.log_softmax(z / lam, -1), torch.log_softmax(u / lam, -1)
    kl = torch.nn.functional.kl_div  # kl_div(input=log q, target=log p, log_target=True) = Σ p (log p − log q)
    if beta == 0:
        per = kl(ls, lt, reduction="none", log_target=True).sum(-1)
    elif beta == 1:
        per = kl(lt, ls, reduction="none", log_target=True).sum(-1)
    else:
        m = (beta * lt.exp() + (1 - beta) * ls.exp()).log()
        per = beta * kl(m, lt, reduction="none", log_target=True).sum(-1) + \
            (1 - beta) * kl(m, ls, reduction="none", log_target=True).sum(-1)
    return per.mean()


def data(n=9, c=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    return z, u


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("lam", [1.0, 2.0])
def test_dense_jsd_equals_the_definition_value_and_gradient(beta, lam):
    z, u = data()
    ours = jsd_loss(z, u, beta=beta, temperature=lam)
    ref = reference(z, u, beta, lam)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    (g1,), (g2,) = torch.autograd.grad(ours, z), torch.autograd.grad(ref, z)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: jsd_loss(x, u, beta=beta, temperature=lam), (z,))


def test_jsd_ends_are_forward_and_reverse_kl():
    z, u = data(seed=1)
    torch.testing.assert_close(jsd_loss(z, u, beta=0.0), kd_loss(z, u, temperature=1.0))
    torch.testing.assert_close(jsd_loss(z, u, beta=1.0), kd_loss(u, z.detach(), temperature=1.0))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_jsd_equals_the_materialized_loss_float64(beta):
    g = torch.Generator().manual_seed(2)
    n, h, ht, v = 13, 5, 7, 17
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(n, ht, generator=g, dtype=torch.float64), torch.randn(v, ht, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (n,), generator=g)
    target[[2, 7]] = -100
    keep = target != -100
    fused = fused_linear_jsd_loss(hidden, head, th, tw, target, beta=beta, ce_weight=0.3, chunk_size=4)
    z = hidden @ head.T
    ref = reference(z[keep], (th @ tw.T)[keep], beta) + 0.3 * torch.nn.functional.cross_entropy(z[keep], target[keep])
    torch.testing.assert_close(fused, ref, rtol=1e-7, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, (hidden, head)), torch.autograd.grad(ref, (hidden, head))):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, w: fused_linear_jsd_loss(x, w, th, tw, target, beta=beta, chunk_size=5), (hidden, head))
    module = FusedLinearJSDLoss(beta=beta, ce_weight=0.3, chunk_size=4)
    torch.testing.assert_close(module(hidden, head, th, tw, target), fused)
    torch.testing.assert_close(JSDLoss(beta=beta)(z, th @ tw.T, target), jsd_loss(z, th @ tw.T, target, beta=beta))


def test_jsd_bad_input():
    z, u = data()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            jsd_loss(z, u, beta=bad)
        with pytest.raises(ValueError, match="beta"):
            fused_linear_jsd_loss(torch.randn(3, 2), torch.randn(4, 2), teacher_logits=torch.randn(3, 4), beta=bad)
    with pytest.raises(ValueError, match="temperature"):
        JSDLoss(temperature=0.0)
    with pytest.raises(ValueError, match="target is required"):
        fused_linear_jsd_loss(torch.randn(3, 2), torch.randn(4, 2), teacher_logits=torch.randn(3, 4), ce_weight=1.0)
