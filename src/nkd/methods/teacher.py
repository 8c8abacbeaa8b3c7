"""Methods with a frozen teacher. Objectives (``e`` the 0-based epoch):

* ``ce``: ``CE`` (no teacher; the baseline and the teacher recipe);
* ``kd``: ``w_ce·CE + w_kd·KD`` (CRD CIFAR setting ``T=4, w_ce=0.1, w_kd=0.9``);
* ``dkd``: ``w_ce·CE + min((e+1)/W, 1)·DKD`` (linear warm-up over ``W`` epochs);
* ``nkd``: ``w_ce·CE + NKD``.

The formulas of the loss terms are in :mod:`nkd.losses` and ``docs/methods.md``.
"""

from __future__ import annotations

import dataclasses

from ..losses.dkd import DKD
from ..losses.kd import KD
from ..losses.nkd import NKD
from .base import LossMethod, Method, ce, ce_weight, kd_weight, register, warmup_epochs


@register("ce")
class CEMethod(Method):
    objective = "CE(z, y)"

    def losses(self, out, teacher, target, epoch):
        return {"loss_ce": ce(out["logits"], target)}


@dataclasses.dataclass
class KDParams(KD):
    ce_weight: float = ce_weight(0.1)
    kd_weight: float = kd_weight(0.9)


@register("kd")
class KDMethod(LossMethod):
    objective = "ce_weight·CE + kd_weight·KD"
    Params = KDParams
    key = "kd"


class RampedMethod(LossMethod):
    """A method whose distillation term ramps up linearly over ``warmup_epochs`` (DKD and its
    variants): ``min((e+1)/W, 1)`` (times ``kd_weight`` where the params have one); a ramp longer
    than the run is a config problem."""

    key = "dkd"

    @classmethod
    def config_problems(cls, params, cfg):
        if params.warmup_epochs > cfg.schedule.epochs:
            return [f"method.params.warmup_epochs: the DKD ramp ({params.warmup_epochs} epochs) is longer than the run "
                    f"(schedule.epochs={cfg.schedule.epochs}): the DKD term would never reach full weight"]
        return []

    def ramp(self, epoch: int) -> float:
        return min((epoch + 1) / max(self.p.warmup_epochs, 1), 1.0)

    def weight(self, epoch: int) -> float:
        w = getattr(self.p, "kd_weight", None)
        return self.ramp(epoch) if w is None else self.ramp(epoch) * w


@dataclasses.dataclass
class DKDParams(DKD):
    ce_weight: float = ce_weight(1.0)
    warmup_epochs: int = warmup_epochs()


@register("dkd")
class DKDMethod(RampedMethod):
    objective = "ce_weight·CE + min((e+1)/warmup_epochs, 1)·DKD"
    Params = DKDParams


@dataclasses.dataclass
class NKDParams(NKD):
    ce_weight: float = ce_weight(1.0)


@register("nkd")
class NKDMethod(LossMethod):
    """``loss_ce``, ``loss_nkd``; logged only: its parts ``nkd_target`` (L_t) and ``nkd_non_target``
    (L_non, whose minimum is γλ²·H(T̂), not 0)."""

    objective = "ce_weight·CE + NKD"

    Params = NKDParams
    key = "nkd"
