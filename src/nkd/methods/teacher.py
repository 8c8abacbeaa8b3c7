"""Methods with a frozen teacher. Objectives (``e`` the 0-based epoch):

* ``ce``: ``CE`` (no teacher; the baseline and the teacher recipe);
* ``kd``: ``w_ce·CE + w_kd·KD`` (CRD CIFAR setting ``T=4, w_ce=0.1, w_kd=0.9``);
* ``dkd``: ``w_ce·CE + min((e+1)/W, 1)·DKD`` (linear warm-up over ``W`` epochs);
* ``nkd``: ``w_ce·CE + NKD``.

The formulas of the loss terms are in :mod:`nkd.losses` and ``docs/methods.md``.
"""

from __future__ import annotations

import dataclasses

from ..losses import dkd_loss, kd_loss, nkd_loss
from .base import Method, Params, ce, default_of, register


@register("ce")
class CEMethod(Method):
    def losses(self, out, teacher, target, epoch):
        return {"loss_ce": ce(out["logits"], target)}


@dataclasses.dataclass
class KDParams(Params):
    temperature: float = default_of(kd_loss, "temperature")
    ce_weight: float = 0.1
    kd_weight: float = 0.9


@register("kd")
class KDMethod(Method):
    Params = KDParams
    teacher_outputs = ("logits",)

    def losses(self, out, teacher, target, epoch):
        z, p = out["logits"], self.p
        return {"loss_ce": p.ce_weight * ce(z, target),
                "loss_kd": p.kd_weight * kd_loss(z, teacher["logits"], temperature=p.temperature)}


@dataclasses.dataclass
class DKDParams(Params):
    alpha: float = default_of(dkd_loss, "alpha")
    beta: float = default_of(dkd_loss, "beta")
    temperature: float = default_of(dkd_loss, "temperature")
    ce_weight: float = 1.0
    warmup_epochs: int = 20


class RampedMethod(Method):
    """A method whose distillation term ramps up linearly over ``warmup_epochs`` (DKD and its
    variants): ``min((e+1)/W, 1)``; a ramp longer than the run is a config problem."""

    teacher_outputs = ("logits",)

    @classmethod
    def config_problems(cls, params, cfg):
        if params.warmup_epochs > cfg.schedule.epochs:
            return [f"method.params.warmup_epochs: the DKD ramp ({params.warmup_epochs} epochs) is longer than the run "
                    f"(schedule.epochs={cfg.schedule.epochs}): the DKD term would never reach full weight"]
        return []

    def ramp(self, epoch: int) -> float:
        return min((epoch + 1) / max(self.p.warmup_epochs, 1), 1.0)


@register("dkd")
class DKDMethod(RampedMethod):
    Params = DKDParams

    def losses(self, out, teacher, target, epoch):
        z, p = out["logits"], self.p
        ramp = self.ramp(epoch)
        return {"loss_ce": p.ce_weight * ce(z, target),
                "loss_dkd": ramp * dkd_loss(z, teacher["logits"], target, alpha=p.alpha, beta=p.beta,
                                            temperature=p.temperature)}


@dataclasses.dataclass
class NKDParams(Params):
    temperature: float = default_of(nkd_loss, "temperature")
    gamma: float = default_of(nkd_loss, "gamma")
    ce_weight: float = 1.0


@register("nkd")
class NKDMethod(Method):
    Params = NKDParams
    teacher_outputs = ("logits",)

    def losses(self, out, teacher, target, epoch):
        """``loss_ce``, ``loss_nkd``; logged only: its parts ``nkd_target`` (L_t) and ``nkd_non_target``
        (L_non, whose minimum is γλ²·H(T̂), not 0)."""
        z, p = out["logits"], self.p
        loss, parts = nkd_loss(z, teacher["logits"], target, temperature=p.temperature, gamma=p.gamma, return_parts=True)
        return {"loss_ce": p.ce_weight * ce(z, target), "loss_nkd": loss, **{f"nkd_{k}": v for k, v in parts.items()}}
