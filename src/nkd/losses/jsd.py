r"""Generalized Jensen–Shannon divergence (the GKD convention of Agarwal et al., 2024, as in TRL).

Per row with ``S = softmax(z/λ)``, ``T = softmax(u/λ)`` (no ``λ²`` factor, as TRL) and
``M = β·T + (1−β)·S``::

    β = 0:       KL(T ‖ S)                           (forward KL)
    β = 1:       KL(S ‖ T)                           (reverse KL)
    otherwise:   β·KL(T ‖ M) + (1−β)·KL(S ‖ M)

summed over the vocabulary; ``0·log 0 = 0``. Its gradient w.r.t. the student's logits, used in
one pass by the dense and the fused forms, is ``∂L/∂z = (1/λ)·S ⊙ (g − Σ_i S_i g_i)`` with
``g = (1−β)·log(S/M)`` for ``0 < β < 1``, ``g = log(S/T)`` for ``β = 1``, and ``(S − T)/λ`` for
``β = 0``. Sources and what is a constant: docs/lm.md, "Divergences".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _inplace
from .spec import LossSpec, RowOut, hp, in_range, positive, register_loss

__all__ = ["jsd_loss", "JSDLoss", "JSD"]


def _plogp_ratio(log_p: Tensor, log_q: Tensor, p: Tensor) -> Tensor:
    """``Σ_i p_i (log p_i − log q_i)`` per row, 0 where ``p_i = 0``."""
    return torch.sub(log_p, log_q).mul_(p).masked_fill_(p == 0, 0.0).sum(-1)


@register_loss("jsd", function="jsd_loss", module="JSDLoss")
@dataclass
class JSD(LossSpec):
    """Generalized JSD per row, with ``S = softmax(z/λ)``, ``T = softmax(u/λ)``, ``M = β·T + (1−β)·S``::

        JSD_β = β·KL(T ‖ M) + (1−β)·KL(S ‖ M)     (β = 0: KL(T ‖ S), forward; β = 1: KL(S ‖ T), reverse)

    summed over the classes (no ``λ²`` factor; TRL's ``generalized_jsd_loss``). The teacher is a
    constant. The loss uses the label only to leave out ``ignore_index`` rows. Floor 0.
    """

    title = "generalized Jensen–Shannon divergence"
    target = "optional"
    target_doc = "int64 labels ``[...]`` or soft labels ``[..., C]``; only marks ``ignore_index`` rows to leave out"
    dense_analytic = True
    beta: float = hp(0.5, in_range(0.0, 1.0, False, False), "β in ``[0, 1]``: 0 = forward KL(T ‖ S), 1 = reverse "
                                                              "KL(S ‖ T), otherwise the β-skewed JSD (TRL's default 0.5)")
    temperature: float = hp(1.0, positive, "λ > 0, divides both logits (no λ² factor)")

    def rows(self, z, u, r, need_grad):
        lam, beta = float(self.temperature), float(self.beta)
        log_s = torch.log_softmax(z / lam, -1)
        log_t = torch.log_softmax(u / lam, -1)
        s, t = log_s.exp(), log_t.exp()
        if beta == 0.0:
            loss = _plogp_ratio(log_t, log_s, t)
        elif beta == 1.0:
            loss = _plogp_ratio(log_s, log_t, s)
            g = log_s - log_t
        else:
            log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), 0)
            loss = beta * _plogp_ratio(log_t, log_m, t) + (1 - beta) * _plogp_ratio(log_s, log_m, s)
            g = (log_s - log_m).mul_(1 - beta)
        if r.valid is not None:
            loss = torch.where(r.valid, loss, torch.zeros_like(loss))
        if not need_grad:
            return RowOut(loss)
        if beta == 0.0:
            grad = (s - t).div_(lam)
        else:
            g = g.masked_fill_(s == 0, 0.0)
            grad = s * (g - (s * g).sum(-1, keepdim=True)) / lam
        if r.valid is not None:
            grad.mul_(r.valid[:, None])
        return RowOut(loss, grad)

    def chunk_rows(self, z, u, idx, need_grad, ce_weight: float = 0.0, ws=None):
        lam, beta = float(self.temperature), float(self.beta)
        if beta == 0.0:
            return _inplace.forward_kl(z, u, idx, need_grad, lam, 1.0, 1.0 / lam, ce_weight=ce_weight, ws=ws)
        if beta == 1.0:
            return _inplace.reverse_kl(z, u, idx, need_grad, lam, ce_weight=ce_weight, ws=ws)
        return _inplace.skew_jsd(z, u, idx, need_grad, lam, beta, ce_weight=ce_weight, ws=ws)


jsd_loss = JSD.function
JSDLoss = JSD.module
