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

from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import kl_terms, log_softmax_without
from .spec import LossSpec, RowOut, hp, nonnegative, positive, register_loss

__all__ = ["dkd_loss", "DKDLoss", "DKD"]


def _binary_and_nontarget(x: Tensor, col: Tensor) -> tuple[Tensor, Tensor]:
    """``log b = [log p_t, log(1-p_t)]`` ``[M, 2]`` and the non-target log-softmax (−inf on t)."""
    lse = torch.logsumexp(x, -1, keepdim=True)
    log_n, lse_nt = log_softmax_without(x, col)
    return torch.cat([x.gather(1, col) - lse, lse_nt - lse], 1), log_n


def dkd_rows(z: Tensor, u: Tensor, idx: Tensor, valid: Tensor | None, alpha: float, beta: float, lam: float) -> Tensor:
    """Per-row ``λ²(α·TCKD + β·NCKD)`` ``[M]`` (0 on rows that are not valid), differentiable by autograd."""
    col = idx[:, None]
    log_bs, log_ns = _binary_and_nontarget(z / lam, col)
    log_bt, log_nt = _binary_and_nontarget(u / lam, col)
    tckd = kl_terms(log_bt, log_bs).sum(-1)
    nckd = kl_terms(log_nt, log_ns).sum(-1)  # target column: p = 0 -> term 0
    per_row = (alpha * tckd + beta * nckd) * lam**2
    return per_row if valid is None else torch.where(valid, per_row, torch.zeros_like(per_row))


@register_loss("dkd", function="dkd_loss", module="DKDLoss")
@dataclass
class DKD(LossSpec):
    """Decoupled KD per row, with ``S = softmax(z/λ)``, ``T = softmax(u/λ)`` and target ``t``::

        TCKD = λ² · KL((T_t, 1 − T_t) ‖ (S_t, 1 − S_t))          (binary: target vs rest)
        NCKD = λ² · KL(T̂ ‖ Ŝ),  Ŝ_i = exp(z_i/λ) / Σ_{j≠t} exp(z_j/λ)  (i ≠ t; T̂ likewise)
        DKD  = α · TCKD + β · NCKD

    Training objective (method ``dkd``): ``ce_weight·CE + min((e+1)/warmup_epochs, 1)·DKD``
    (``e`` the 0-based epoch; defaults ce_weight=1, warmup_epochs=20). Floor 0.
    """

    title = "Decoupled KD ``α·TCKD + β·NCKD`` (no CE, no warm-up factor)"
    alpha: float = hp(1.0, nonnegative, "α ≥ 0, TCKD weight; 1 in every published setting")
    beta: float = hp(8.0, nonnegative, "β ≥ 0, NCKD weight; 8.0 = mdistiller's CIFAR-100 default (6 or 2 for some CRD "
                                       "pairs), ImageNet: 0.5 (ResNet34→ResNet18) or 2.0 (ResNet50→MobileNetV1)")
    temperature: float = hp(4.0, positive, "λ > 0; 4.0 = CIFAR-100, ImageNet: 1")

    def rows(self, z, u, r, need_grad):
        return RowOut(dkd_rows(z, u, r.index, r.valid, self.alpha, self.beta, self.temperature))


dkd_loss = DKD.function
DKDLoss = DKD.module
