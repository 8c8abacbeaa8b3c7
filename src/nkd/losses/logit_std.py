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

from dataclasses import dataclass

from torch import Tensor

from ._common import check_logits, check_positive
from .dkd import DKD, dkd_rows
from .kd import KD, _kd_rows
from .spec import RowOut, hp, positive, register_loss

__all__ = ["standardize_logits", "kd_zscore_loss", "dkd_zscore_loss", "KDZScoreLoss", "DKDZScoreLoss", "ZSCORE_EPS",
           "KDZScore", "DKDZScore"]

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


_EPS_DOC = "ε > 0 added to the standard deviation (the authors' 1e-7)"
_TAU_DOC = "base temperature τ > 0 (the authors' default 2; 3 for some CIFAR pairs)"


@register_loss("kd_zscore", function="kd_zscore_loss", module="KDZScoreLoss")
@dataclass
class KDZScore(KD):
    """KD on z-scored logits, per row: ``τ²·KL(softmax(ũ/τ) ‖ softmax(z̃/τ))`` with
    ``x̃ = (x − mean(x)) / (ε + std(x))`` for the student and the teacher (unbiased std).
    Training objective (method ``kd_zscore``): ``ce_weight·CE + kd_weight·KD_z``. Floor 0."""

    title = "KD on z-scored logits"
    temperature: float = hp(2.0, positive, _TAU_DOC)
    eps: float = hp(ZSCORE_EPS, positive, _EPS_DOC)

    def rows(self, z, u, r, need_grad):
        zs, us = standardize_logits(z, self.eps), standardize_logits(u, self.eps)
        return RowOut(_kd_rows(zs, us, r.index, r.valid, float(self.temperature), False)[0])


@register_loss("dkd_zscore", function="dkd_zscore_loss", module="DKDZScoreLoss")
@dataclass
class DKDZScore(DKD):
    """DKD on z-scored logits: ``α·TCKD(z̃, ũ) + β·NCKD(z̃, ũ)`` at base temperature τ (both scaled
    by τ²), with ``x̃ = (x − mean(x)) / (ε + std(x))``. The authors' runs fold their ``--kd-weight``
    w into α and β (``α·w``, ``β·w``): method ``dkd_zscore`` does (its ``kd_weight``)."""

    title = "DKD on z-scored logits (no CE, no warm-up)"
    temperature: float = hp(2.0, positive, _TAU_DOC)
    eps: float = hp(ZSCORE_EPS, positive, _EPS_DOC)

    def rows(self, z, u, r, need_grad):
        zs, us = standardize_logits(z, self.eps), standardize_logits(u, self.eps)
        return RowOut(dkd_rows(zs, us, r.index, r.valid, self.alpha, self.beta, self.temperature))


kd_zscore_loss = KDZScore.function
dkd_zscore_loss = DKDZScore.function
KDZScoreLoss = KDZScore.module
DKDZScoreLoss = DKDZScore.module
