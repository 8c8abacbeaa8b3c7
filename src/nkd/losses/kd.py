r"""Classic knowledge distillation (Hinton et al., 2015).

.. math::

    \mathrm{KD} = \lambda^2 \sum_i T^\lambda_i \,(\log T^\lambda_i - \log S^\lambda_i),
    \qquad S^\lambda = \mathrm{softmax}(z/\lambda),\; T^\lambda = \mathrm{softmax}(u/\lambda)

per sample (KL summed over classes), then reduced over samples. The objective is
``w_ce·CE + w_kd·KD`` (CRD/mdistiller CIFAR: λ=4, w_ce=0.1, w_kd=0.9). The teacher's logits are
treated as constants. Computed in log space (``log_target``), so a teacher with probability 1
on one class gives finite values.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_pair, check_positive, check_reduction, compute_dtype, kl_terms, no_autocast, reduce_rows

__all__ = ["kd_loss", "KDLoss"]


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 4.0,
    reduction: str = "mean",
) -> Tensor:
    """``λ²·KL(softmax(u/λ) ‖ softmax(z/λ))`` per row over the last axis, then ``reduction``.

    Args:
        student_logits, teacher_logits: ``[..., C]`` of equal shape; the teacher is detached.
        temperature: λ > 0.
        reduction: ``"mean"`` over rows, ``"sum"`` or ``"none"`` (shape ``[...]``).
    """
    check_pair(student_logits, teacher_logits)
    check_positive("temperature", temperature)
    check_reduction(reduction)
    dtype = compute_dtype(student_logits.dtype)
    with no_autocast(student_logits):
        log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_t = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
        per_row = kl_terms(log_t, log_s).sum(-1) * temperature**2
        return reduce_rows(per_row.reshape(-1), None, reduction, per_row.shape)


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`; ``forward(student_logits, teacher_logits)``."""

    def __init__(self, temperature: float = 4.0, reduction: str = "mean"):
        super().__init__()
        check_positive("temperature", temperature)
        check_reduction(reduction)
        self.temperature, self.reduction = float(temperature), reduction

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return kd_loss(student_logits, teacher_logits, temperature=self.temperature, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"
