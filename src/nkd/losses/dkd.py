r"""Decoupled knowledge distillation (DKD), Zhao et al., CVPR 2022.

At temperature λ, with ``S = softmax(z/λ)``, ``T = softmax(u/λ)`` and target ``t``:

.. math::

    b^S = (S_t,\ 1 - S_t),\quad b^T = (T_t,\ 1 - T_t),\qquad
    \mathrm{TCKD} = \lambda^2\,\mathrm{KL}(b^T \| b^S)

    \mathrm{NCKD} = \lambda^2\,\mathrm{KL}(\hat T \| \hat S),\quad
    \hat S_i = \frac{e^{z_i/\lambda}}{\sum_{j\ne t} e^{z_j/\lambda}}\ (i\ne t)

    \mathrm{DKD} = \alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}

The objective is ``CE + min(epoch/warmup, 1)·DKD`` (the warm-up lives in the training method).
All probabilities are computed in log space (``1 - S_t = e^{\mathrm{LSE}_{j≠t} - \mathrm{LSE}}``),
so logits of any range and a teacher with probability 1 on the target stay finite. Soft labels
use ``t = argmax``. The teacher is treated as constant.
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
    """``α·TCKD + β·NCKD`` (module docstring), without CE and without the warm-up factor.

    Args:
        student_logits, teacher_logits: ``[..., C]`` of equal shape, ``C >= 2``.
        target: int64 labels ``[...]`` or soft labels ``[..., C]`` (argmax used).
        alpha, beta: weights (≥ 0); temperature: λ > 0.
        reduction: ``"mean"`` over non-ignored rows, ``"sum"`` or ``"none"``.
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
    """Module form of :func:`dkd_loss`; ``forward(student_logits, teacher_logits, target)``."""

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
        return dkd_loss(student_logits, teacher_logits, target, alpha=self.alpha, beta=self.beta,
                        temperature=self.temperature, reduction=self.reduction, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"
