"""Modern logit baselines with a frozen teacher (formulas and sources: ``docs/baselines.md``).
Objectives (``e`` the 0-based epoch):

* ``dist``: ``w_ce·CE + w_kd·DIST`` — the authors' weights are ``w_ce = 1``, ``w_kd = 2`` with
  ``β = γ = 1`` inside DIST. Under DDP the intra-class term is computed per process over the
  local batch (not gathered), as in the authors' trainer.
* ``kd_zscore``: ``w_ce·CE + w_kd·KD_z`` (KD on z-scored logits at base temperature τ).
* ``dkd_zscore``: ``w_ce·CE + min((e+1)/W, 1)·w_kd·DKD_z(α, β, τ)`` — the authors' code multiplies
  DKD's α and β by its ``--kd-weight``, which is ``w_kd`` here.
"""

from __future__ import annotations

import dataclasses

from ..losses import dist_loss, dkd_zscore_loss, kd_zscore_loss
from .base import Method, Params, ce, default_of, register
from .teacher import RampedMethod


@dataclasses.dataclass
class DISTParams(Params):
    beta: float = default_of(dist_loss, "beta")
    gamma: float = default_of(dist_loss, "gamma")
    temperature: float = default_of(dist_loss, "temperature")
    ce_weight: float = 1.0
    kd_weight: float = 2.0  # the authors' kd_loss_weight in every published DIST config


@register("dist")
class DISTMethod(Method):
    Params = DISTParams
    teacher_outputs = ("logits",)

    def losses(self, out, teacher, target, epoch):
        z, p = out["logits"], self.p
        return {"loss_ce": p.ce_weight * ce(z, target),
                "loss_dist": p.kd_weight * dist_loss(z, teacher["logits"], beta=p.beta, gamma=p.gamma,
                                                     temperature=p.temperature)}


@dataclasses.dataclass
class KDZScoreParams(Params):
    temperature: float = default_of(kd_zscore_loss, "temperature")  # base temperature
    ce_weight: float = 0.1
    kd_weight: float = 9.0


@register("kd_zscore")
class KDZScoreMethod(Method):
    Params = KDZScoreParams
    teacher_outputs = ("logits",)

    def losses(self, out, teacher, target, epoch):
        z, p = out["logits"], self.p
        return {"loss_ce": p.ce_weight * ce(z, target),
                "loss_kd": p.kd_weight * kd_zscore_loss(z, teacher["logits"], temperature=p.temperature)}


@dataclasses.dataclass
class DKDZScoreParams(Params):
    alpha: float = default_of(dkd_zscore_loss, "alpha")
    beta: float = default_of(dkd_zscore_loss, "beta")
    temperature: float = default_of(dkd_zscore_loss, "temperature")  # base temperature
    kd_weight: float = 9.0  # multiplies α and β, as the authors' --kd-weight
    ce_weight: float = 1.0
    warmup_epochs: int = 20


@register("dkd_zscore")
class DKDZScoreMethod(RampedMethod):
    Params = DKDZScoreParams

    def losses(self, out, teacher, target, epoch):
        z, p = out["logits"], self.p
        ramp = self.ramp(epoch)
        return {"loss_ce": p.ce_weight * ce(z, target),
                "loss_dkd": ramp * p.kd_weight * dkd_zscore_loss(z, teacher["logits"], target, alpha=p.alpha,
                                                                 beta=p.beta, temperature=p.temperature)}
