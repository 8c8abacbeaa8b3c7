r"""Logit standardization (Sun et al., CVPR 2024): z-score the logits before KD / DKD.

Each row of logits ``x ∈ R^C`` is replaced by its z-score over the classes,

.. math::

    \tilde x = \frac{x - \bar x}{\epsilon + \sigma(x)},\qquad
    \bar x = \frac{1}{C}\sum_i x_i,\qquad
    \sigma(x) = \sqrt{\frac{1}{C-1}\sum_i (x_i - \bar x)^2},\qquad \epsilon = 10^{-7}

(``σ`` is torch's default, unbiased standard deviation), for the student **and** the teacher,
and the ordinary loss is computed on the standardized logits at a *base temperature* τ:

.. math::

    \mathrm{KD}_{z} = \tau^2\,\mathrm{KL}\bigl(\mathrm{softmax}(\tilde u/\tau)\ \|\ \mathrm{softmax}(\tilde z/\tau)\bigr)

    \mathrm{DKD}_{z} = \alpha\,\mathrm{TCKD}(\tilde z, \tilde u; \tau) + \beta\,\mathrm{NCKD}(\tilde z, \tilde u; \tau)

with TCKD/NCKD exactly as in :mod:`nkd.losses.dkd` (both scaled by τ²). This is what the authors'
code computes (``sunshangquan/logit-standardization-KD``, ``mdistiller/distillers/KD.py`` and
``DKD.py``, function ``normalize``): the per-sample temperature of the paper, ``τ·σ(x)``, is
realised as the z-score followed by division by τ. Their objectives are
``w_ce·CE + w_kd·KD_z`` and ``CE + min(epoch/warmup, 1)·w_kd·DKD_z`` (``tools/train.py`` multiplies
DKD's α and β by ``--kd-weight``).

Properties: ``KD_z`` and ``DKD_z`` are invariant to adding a constant to a row and (up to ε) to
scaling a row by a positive factor, separately for student and teacher — the student only has to
match the teacher's logit *relations*, not their range. The gradient reaching the student's
logits therefore sums to 0 over each row and is (up to ε) orthogonal to the row's centred logits.

Numerics: a row whose logits are all equal (σ = 0, e.g. a zero-initialised classifier) is mapped
to zeros and stays finite; its slope is then ``1/ε = 10⁷`` times the centring matrix (the exact
derivative of the formula, and what the authors' code gives, since torch returns a zero gradient
for the standard deviation of a constant row). Standardization and the loss run in float32 under
autocast (float64 stays float64); gradients come back in the input dtype. Teachers are constants.

Other variants the authors' code defines: MLKD (``mdistiller/distillers/MLKD.py``) and CTKD (the
``CTKD/`` folder) use the same ``normalize``; they are not implemented here.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._common import (
    check_ignore_index,
    check_logits,
    check_nonnegative,
    check_pair,
    check_positive,
    check_reduction,
    compute_dtype,
    no_autocast,
)
from .dkd import dkd_loss
from .kd import kd_loss

__all__ = ["standardize_logits", "kd_zscore_loss", "dkd_zscore_loss", "KDZScoreLoss", "DKDZScoreLoss", "ZSCORE_EPS"]

ZSCORE_EPS = 1e-7  # the authors' ε in the denominator


def standardize_logits(logits: Tensor, eps: float = ZSCORE_EPS) -> Tensor:
    r"""Z-score each row over the last dimension: ``(x − mean(x)) / (eps + std(x))``.

    ``std`` is the unbiased standard deviation (divisor ``C − 1``), as in the authors' code.
    Differentiable; a row of equal logits becomes a row of zeros.

    Args:
        logits: floating ``[..., C]``, ``C >= 2``; the output keeps its dtype and shape.
        eps: ε > 0 added to the standard deviation (default 1e-7, the authors' value).
    """
    check_logits("logits", logits)
    check_positive("eps", eps)
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (eps + std)


def _standardized_pair(student_logits: Tensor, teacher_logits: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    dtype = compute_dtype(student_logits.dtype)
    z = standardize_logits(student_logits.to(dtype), eps)
    u = standardize_logits(teacher_logits.detach().to(dtype), eps)
    return z, u


def kd_zscore_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float = 2.0,
    eps: float = ZSCORE_EPS,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    r"""KD on z-scored logits: ``τ²·KL(softmax(ũ/τ) ‖ softmax(z̃/τ))`` per row, then ``reduction``.

    Args:
        student_logits, teacher_logits: ``[..., C]`` of equal shape, ``C >= 2``; the teacher is
            detached.
        target: optional int64 labels ``[...]`` that only mark rows to leave out
            (``ignore_index``), or soft labels ``[..., C]`` (every row kept).
        temperature: base temperature τ > 0 (authors' default 2; 3 for some CIFAR pairs).
        eps: ε > 0 added to the standard deviation (authors: 1e-7).
        reduction: ``"mean"`` over non-ignored rows, ``"sum"`` or ``"none"`` (shape ``[...]``).
        ignore_index: hard-label value whose rows are left out.
    """
    check_pair(student_logits, teacher_logits)
    check_positive("temperature", temperature)
    check_positive("eps", eps)
    check_reduction(reduction)
    check_ignore_index(ignore_index)
    with no_autocast(student_logits):
        z, u = _standardized_pair(student_logits, teacher_logits, eps)
        return kd_loss(z, u, target, temperature=temperature, reduction=reduction, ignore_index=ignore_index)


def dkd_zscore_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 2.0,
    eps: float = ZSCORE_EPS,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    r"""DKD on z-scored logits: ``α·TCKD(z̃, ũ) + β·NCKD(z̃, ũ)`` at temperature τ, without CE and warm-up.

    The authors' runs fold their ``--kd-weight`` w into α and β (``α·w``, ``β·w``); pass those
    products here, or keep α, β and multiply the loss by w.

    Args:
        student_logits, teacher_logits: ``[..., C]`` of equal shape, ``C >= 2``.
        target: int64 labels ``[...]`` (``ignore_index`` allowed) or soft labels ``[..., C]``
            (``t = argmax``).
        alpha: weight α ≥ 0 of TCKD (default 1; the authors use ``1·w``).
        beta: weight β ≥ 0 of NCKD (default 8; the authors use ``β·w`` with β from their logs).
        temperature: base temperature τ > 0 (authors' default 2).
        eps: ε > 0 added to the standard deviation (authors: 1e-7).
        reduction: ``"mean"`` over non-ignored rows, ``"sum"`` or ``"none"`` (shape ``[...]``).
        ignore_index: hard-label value whose rows are left out.
    """
    check_pair(student_logits, teacher_logits)
    check_nonnegative("alpha", alpha)
    check_nonnegative("beta", beta)
    check_positive("temperature", temperature)
    check_positive("eps", eps)
    check_reduction(reduction)
    check_ignore_index(ignore_index)
    with no_autocast(student_logits):
        z, u = _standardized_pair(student_logits, teacher_logits, eps)
        return dkd_loss(z, u, target, alpha=alpha, beta=beta, temperature=temperature, reduction=reduction,
                        ignore_index=ignore_index)


class KDZScoreLoss(nn.Module):
    """Module form of :func:`kd_zscore_loss`: ``τ²·KL(softmax(ũ/τ) ‖ softmax(z̃/τ))`` per row on z-scored logits.

    Args:
        temperature: base temperature τ > 0 (default 2, the authors' default).
        eps: ε > 0 added to the standard deviation (default 1e-7).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out when a target is given (default -100).
    """

    def __init__(self, temperature: float = 2.0, eps: float = ZSCORE_EPS, reduction: str = "mean",
                 ignore_index: int = -100):
        super().__init__()
        check_positive("temperature", temperature)
        check_positive("eps", eps)
        check_reduction(reduction)
        check_ignore_index(ignore_index)
        self.temperature, self.eps = float(temperature), float(eps)
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        """KD of the z-scored student logits to the z-scored (frozen) teacher logits.

        Args:
            student_logits: ``[..., C]`` floating logits.
            teacher_logits: ``[..., C]``, same shape; detached.
            target: optional int64 labels ``[...]`` (or soft ``[..., C]``); only marks rows equal
                to ``ignore_index`` to leave out.

        Returns:
            A scalar (``"mean"``/``"sum"``) or per-row values ``[...]`` (``"none"``).
        """
        return kd_zscore_loss(student_logits, teacher_logits, target, temperature=self.temperature, eps=self.eps,
                              reduction=self.reduction, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, eps={self.eps}, reduction={self.reduction!r}"


class DKDZScoreLoss(nn.Module):
    """Module form of :func:`dkd_zscore_loss`: ``α·TCKD + β·NCKD`` at base temperature τ on z-scored logits.

    Args:
        alpha: weight α ≥ 0 of TCKD (default 1).
        beta: weight β ≥ 0 of NCKD (default 8).
        temperature: base temperature τ > 0 (default 2).
        eps: ε > 0 added to the standard deviation (default 1e-7).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out (default -100).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 2.0, eps: float = ZSCORE_EPS,
                 reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        check_nonnegative("alpha", alpha)
        check_nonnegative("beta", beta)
        check_positive("temperature", temperature)
        check_positive("eps", eps)
        check_reduction(reduction)
        check_ignore_index(ignore_index)
        self.alpha, self.beta, self.temperature, self.eps = float(alpha), float(beta), float(temperature), float(eps)
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """DKD of the z-scored student logits to the z-scored (frozen) teacher logits.

        Args:
            student_logits: ``[..., C]`` floating logits.
            teacher_logits: ``[..., C]``, same shape; detached.
            target: int64 labels ``[...]`` (``ignore_index`` allowed) or soft labels ``[..., C]``
                (``t = argmax``).

        Returns:
            A scalar (``"mean"``/``"sum"``) or per-row values ``[...]`` (``"none"``).
        """
        return dkd_zscore_loss(student_logits, teacher_logits, target, alpha=self.alpha, beta=self.beta,
                               temperature=self.temperature, eps=self.eps, reduction=self.reduction,
                               ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, eps={self.eps}"
