r"""Classic knowledge distillation (Hinton et al., 2015).

.. math::

    \mathrm{KD} = \lambda^2 \sum_i T^\lambda_i \,(\log T^\lambda_i - \log S^\lambda_i),
    \qquad S^\lambda = \mathrm{softmax}(z/\lambda),\; T^\lambda = \mathrm{softmax}(u/\lambda)

per sample (KL summed over classes), then reduced over samples; ``∂KD/∂z = λ(S^λ − T^λ)``. The
objective is ``w_ce·CE + w_kd·KD`` (CRD/mdistiller CIFAR-100: λ=4, w_ce=0.1, w_kd=0.9; official
cls_KD: λ=3 on CIFAR-100 and λ=1 on ImageNet, w_ce=w_kd=0.5). The teacher's logits are treated
as constants. Computed in log space, so a teacher with probability 1 on one class gives finite
values.

Scale: a KL divergence, so the floor is 0; the ``λ²`` factor multiplies its size (16 at λ=4).
Codes that use the cross-entropy form ``−λ²Σ T^λ log S^λ`` (e.g. cls_KD) log an extra constant
``λ²·H(T^λ)`` with the same gradient. Sources and published numbers: docs/methods.md, section KD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _inplace
from .spec import LossSpec, RowOut, hp, positive, register_loss

__all__ = ["kd_loss", "KDLoss", "KD"]


def _kd_rows(
    z: Tensor, u: Tensor, idx: Tensor, valid: Tensor | None, lam: float, need_grad: bool, ce_weight: float = 0.0
) -> tuple[Tensor, Tensor | None]:
    r"""Per-row KD loss ``[M]`` and (optionally) its analytic gradient w.r.t. ``z`` ``[M, C]``.

    .. math::

        L_r = \lambda^2\,\mathrm{KL}(T^\lambda \| S^\lambda) + w\,(-\log S_{t}),\qquad
        \partial L_r/\partial z = \lambda\,(S^\lambda - T^\lambda) + w\,(S - e_t)

    (``w = ce_weight``; the cross-entropy part uses ``idx``; rows where ``valid`` is False are 0,
    ``valid=None`` means every row counts.) The KL value is the elementwise ``T (log T − log S)``
    of :func:`kd_loss` (0 where ``T = 0``). Used by the chunked fused-linear losses.
    """
    log_s = F.log_softmax(z / lam, dim=-1)
    log_t = F.log_softmax(u / lam, dim=-1)
    t = log_t.exp()
    # T (log T - log S) elementwise, 0 where T == 0 (as kl_terms, with fewer [M, C] buffers)
    kl = torch.sub(log_t, log_s).mul_(t).masked_fill_(t == 0, 0.0)
    loss = kl.sum(-1) * lam**2
    del kl, log_t
    lse_z = None
    if ce_weight:
        col = idx[:, None]
        lse_z = torch.logsumexp(z, dim=-1, keepdim=True)
        loss = loss + ce_weight * (lse_z - z.gather(1, col)).squeeze(1)
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not need_grad:
        return loss, None
    grad = log_s.exp_().sub_(t).mul_(lam)
    del t
    if lse_z is not None:
        grad.add_(torch.sub(z, lse_z).exp_(), alpha=ce_weight)
        grad.scatter_add_(1, col, torch.full_like(lse_z, -ce_weight))
    if valid is not None:
        grad.mul_(valid[:, None])
    return loss, grad


@register_loss("kd", function="kd_loss", module="KDLoss")
@dataclass
class KD(LossSpec):
    r"""Hinton's KD, per row with ``S^λ = softmax(z/λ)``, ``T^λ = softmax(u/λ)``::

        KD_r = λ² · Σ_i T^λ_i (log T^λ_i − log S^λ_i),    ∂KD_r/∂z = λ (S^λ − T^λ)

    KD does not use the label: ``target`` only marks rows to leave out (hard labels equal to
    ``ignore_index``, e.g. padding tokens); soft labels leave every row in. Training objective
    (method ``kd``): ``ce_weight·CE + kd_weight·KD`` (defaults 0.1 and 0.9). Floor 0.
    """

    title = "Hinton's KD ``λ²·KL(softmax(u/λ) ‖ softmax(z/λ))``"
    target = "optional"
    target_doc = "int64 labels ``[...]`` or soft labels ``[..., C]``; only marks ``ignore_index`` rows to leave out"
    fuses_ce = True
    temperature: float = hp(4.0, positive, "λ > 0; 4.0 = the CIFAR-100 CRD benchmark setting (RepDistiller/mdistiller), "
                                           "official cls_KD: 3 on CIFAR-100, 1 on ImageNet")

    def rows(self, z, u, r, need_grad, ce_weight: float = 0.0):
        loss, grad = _kd_rows(z, u, r.index, r.valid, float(self.temperature), need_grad, ce_weight=ce_weight)
        return RowOut(loss, grad)

    def chunk_rows(self, z, u, idx, need_grad, ce_weight: float = 0.0, ws=None):
        lam = float(self.temperature)
        return _inplace.forward_kl(z, u, idx, need_grad, lam, lam * lam, lam, ce_weight=ce_weight, ws=ws)


kd_loss = KD.function
KDLoss = KD.module
