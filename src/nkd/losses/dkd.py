r"""Decoupled knowledge distillation (DKD), Zhao et al., CVPR 2022.

At temperature λ, with ``S = softmax(z/λ)``, ``T = softmax(u/λ)`` and target ``t``:

.. math::

    b^S = (S_t,\ 1 - S_t),\quad b^T = (T_t,\ 1 - T_t),\qquad
    \mathrm{TCKD} = \lambda^2\,\mathrm{KL}(b^T \| b^S)

    \mathrm{NCKD} = \lambda^2\,\mathrm{KL}(\hat T \| \hat S),\quad
    \hat S_i = \frac{e^{z_i/\lambda}}{\sum_{j\ne t} e^{z_j/\lambda}}\ (i\ne t)

    \mathrm{DKD} = \alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}

The objective is ``CE + min((e+1)/warmup, 1)·DKD`` with ``e`` the 0-based epoch (mdistiller's
``min(epoch/warmup, 1)`` with 1-based epochs; the warm-up lives in the training method).
All probabilities are computed in log space (``1 - S_t = e^{\mathrm{LSE}_{j≠t} - \mathrm{LSE}}``),
so logits of any range and a teacher with probability 1 on the target stay finite. Soft labels
use ``t = argmax``. The teacher is treated as constant.

Defaults ``alpha=1, beta=8, temperature=4`` are mdistiller's CIFAR-100 default (CRD pairs);
β is 6 for vgg13→vgg8, vgg13→mobilenetv2, wrn_40_2→wrn_16_2, wrn_40_2→wrn_40_1 and 2 for
resnet56→resnet20, resnet110→resnet32; ImageNet: λ=1, β=0.5 (ResNet34→ResNet18) or β=2
(ResNet50→MobileNetV1), warm-up 1 epoch. Both terms are KL divergences (floor 0). Sources and
published numbers: docs/methods.md, section DKD.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import (
    check_nonnegative,
    check_pair,
    check_positive,
    check_reduction,
    compute_dtype,
    kl_terms,
    log_softmax_without,
    no_autocast,
    parse_rows,
    reduce_rows,
)

__all__ = ["dkd_loss", "DKDLoss"]


def _binary_and_nontarget(x: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """``log b = [log p_t, log(1-p_t)]`` ``[M, 2]`` and the non-target log-softmax (−inf on t)."""
    lse = torch.logsumexp(x, -1, keepdim=True)
    log_n, lse_nt = log_softmax_without(x, col)
    return torch.cat([x.gather(1, col) - lse, lse_nt - lse], 1), log_n


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Decoupled KD ``α·TCKD + β·NCKD`` per row, then ``reduction`` (no CE, no warm-up factor).

    With ``S = softmax(z/λ)``, ``T = softmax(u/λ)`` (teacher detached) and target ``t``::

        TCKD = λ² · KL((T_t, 1 − T_t) ‖ (S_t, 1 − S_t))          (binary: target vs rest)
        NCKD = λ² · KL(T̂ ‖ Ŝ),  Ŝ_i = exp(z_i/λ) / Σ_{j≠t} exp(z_j/λ)  (i ≠ t; T̂ likewise)
        DKD  = α · TCKD + β · NCKD

    Training objective (method ``dkd``): ``ce_weight·CE + min((e+1)/warmup_epochs, 1)·DKD``
    (``e`` the 0-based epoch; defaults ce_weight=1, warmup_epochs=20).

    Args:
        student_logits: ``[..., C]`` floating logits, ``C >= 2``.
        teacher_logits: same shape as ``student_logits``; detached (treated as a constant).
        target: int64 labels ``[...]`` (values in ``[0, C)`` or ``ignore_index``) or soft labels
            ``[..., C]`` (``t = argmax`` of the row).
        alpha: α ≥ 0, TCKD weight (default 1.0; 1 in every published setting).
        beta: β ≥ 0, NCKD weight. Default 8.0 = the CIFAR-100 default of mdistiller (6 or 2 for
            some CRD pairs); ImageNet: 0.5 (ResNet34→ResNet18) or 2.0 (ResNet50→MobileNetV1).
        temperature: λ, a finite number > 0. Default 4.0 = CIFAR-100; ImageNet: 1.
        reduction: ``"mean"`` (default; over non-ignored rows, 0 if none), ``"sum"`` or
            ``"none"`` (per-row values, shape ``[...]``).
        ignore_index: hard-label value whose rows are left out of the loss and the mean (default -100).

    Returns:
        The loss, float32 (float64 for float64 input); floor 0.
    """
    check_pair(student_logits, teacher_logits)
    check_nonnegative("alpha", alpha)
    check_nonnegative("beta", beta)
    check_positive("temperature", temperature)
    check_reduction(reduction)
    rows = parse_rows(student_logits, target, ignore_index, name="student_logits")
    dtype = compute_dtype(student_logits.dtype)
    col = rows.index[:, None]
    with no_autocast(student_logits):
        z = rows.logits.to(dtype) / temperature
        u = teacher_logits.detach().reshape(z.shape).to(dtype) / temperature
        log_bs, log_ns = _binary_and_nontarget(z, col)
        log_bt, log_nt = _binary_and_nontarget(u, col)
        tckd = kl_terms(log_bt, log_bs).sum(-1)
        nckd = kl_terms(log_nt, log_ns).sum(-1)  # target column: p = 0 -> term 0
        per_row = (alpha * tckd + beta * nckd) * temperature**2
        per_row = torch.where(rows.valid, per_row, torch.zeros_like(per_row))
        return reduce_rows(per_row, rows.valid, reduction, rows.lead_shape)


class DKDLoss(nn.Module):
    """Module form of :func:`dkd_loss`: ``α·TCKD + β·NCKD`` at temperature λ (no warm-up factor).

    Args:
        alpha: α ≥ 0 (default 1.0).
        beta: β ≥ 0 (default 8.0 = CIFAR-100 default; ImageNet: 0.5 or 2.0).
        temperature: λ > 0 (default 4.0 = CIFAR-100; ImageNet: 1).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out (default -100).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        check_nonnegative("alpha", alpha)
        check_nonnegative("beta", beta)
        check_positive("temperature", temperature)
        check_reduction(reduction)
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """DKD of the student to the (frozen) teacher, without CE and without the warm-up ramp.

        Args:
            student_logits: ``[..., C]`` floating logits.
            teacher_logits: ``[..., C]``, same shape; detached.
            target: int64 labels ``[...]`` or soft labels ``[..., C]``.

        Returns:
            A scalar (``"mean"``/``"sum"``) or per-row values ``[...]`` (``"none"``).
        """
        return dkd_loss(student_logits, teacher_logits, target, alpha=self.alpha, beta=self.beta,
                        temperature=self.temperature, reduction=self.reduction, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"
