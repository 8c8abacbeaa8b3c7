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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    check_ignore_index,
    check_pair,
    check_positive,
    check_reduction,
    compute_dtype,
    kl_terms,
    no_autocast,
    parse_rows,
    reduce_rows,
)

__all__ = ["kd_loss", "KDLoss"]


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


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float = 4.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    r"""Hinton's KD: ``λ²·KL(softmax(u/λ) ‖ softmax(z/λ))`` per row, then ``reduction``.

    .. math::

        \mathrm{KD}_r = \lambda^2 \sum_i T^\lambda_i (\log T^\lambda_i - \log S^\lambda_i),\quad
        S^\lambda = \mathrm{softmax}(z/\lambda),\ T^\lambda = \mathrm{softmax}(u/\lambda)

    KD does not use the label; ``target`` is optional and only marks rows to leave out (hard
    labels equal to ``ignore_index``, e.g. padding tokens): those rows are 0 and do not count in
    the mean. Soft labels ``[..., C]`` are accepted and leave every row in. Training objective
    (method ``kd``): ``ce_weight·CE + kd_weight·KD`` (defaults 0.1 and 0.9).

    Args:
        student_logits: ``[..., C]`` floating logits, ``C >= 2``.
        teacher_logits: same shape as ``student_logits``; detached (treated as a constant).
        target: optional (default ``None``) int64 labels ``[...]`` or soft labels ``[..., C]``.
        temperature: λ, a finite number > 0. Default 4.0 = the CIFAR-100 CRD benchmark setting
            (RepDistiller/mdistiller); official cls_KD: 3 on CIFAR-100, 1 on ImageNet.
        reduction: ``"mean"`` (default; over non-ignored rows, 0 if none), ``"sum"`` or
            ``"none"`` (per-row values, shape ``[...]``).
        ignore_index: hard-label value whose rows are left out (only with ``target``; default -100).

    Returns:
        ``λ²·KL`` reduced as asked, float32 (float64 for float64 input); floor 0.
    """
    check_pair(student_logits, teacher_logits)
    check_positive("temperature", temperature)
    check_reduction(reduction)
    check_ignore_index(ignore_index)
    dtype = compute_dtype(student_logits.dtype)
    valid = None
    if target is not None:
        valid = parse_rows(student_logits, target, ignore_index, name="student_logits").valid
    with no_autocast(student_logits):
        log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
        per_row = (kl_terms(log_t, log_s).sum(-1) * temperature**2).reshape(-1)
        if valid is not None:
            per_row = torch.where(valid, per_row, torch.zeros_like(per_row))
        return reduce_rows(per_row, valid, reduction, student_logits.shape[:-1])


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`: ``λ²·KL(softmax(u/λ) ‖ softmax(z/λ))`` per row.

    Args:
        temperature: λ > 0 (default 4.0 = CIFAR-100 CRD benchmark; cls_KD: 3 on CIFAR-100,
            1 on ImageNet).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out when a target is given (default -100).
    """

    def __init__(self, temperature: float = 4.0, reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        check_positive("temperature", temperature)
        check_reduction(reduction)
        check_ignore_index(ignore_index)
        self.temperature, self.reduction, self.ignore_index = float(temperature), reduction, ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        """KD of the student to the (frozen) teacher.

        Args:
            student_logits: ``[..., C]`` floating logits.
            teacher_logits: ``[..., C]``, same shape; detached.
            target: optional int64 labels ``[...]`` (or soft ``[..., C]``); only marks rows equal
                to ``ignore_index`` to leave out.

        Returns:
            A scalar (``"mean"``/``"sum"``) or per-row values ``[...]`` (``"none"``).
        """
        return kd_loss(student_logits, teacher_logits, target, temperature=self.temperature,
                       reduction=self.reduction, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"
