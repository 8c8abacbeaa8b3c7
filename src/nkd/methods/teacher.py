"""Methods with a frozen teacher. Objectives (``e`` the 0-based epoch):

* ``ce``: ``CE`` (no teacher; the baseline and the teacher recipe);
* ``kd``: ``w_ce·CE + w_kd·KD`` (CRD CIFAR setting ``T=4, w_ce=0.1, w_kd=0.9``);
* ``dkd``: ``w_ce·CE + min((e+1)/W, 1)·DKD`` (linear warm-up over ``W`` epochs);
* ``nkd``: ``w_ce·CE + NKD``.

The formulas of the loss terms are in :mod:`nkd.losses` and ``docs/methods.md``.
"""

from __future__ import annotations

from ..losses.dkd import DKD
from ..losses.kd import KD
from ..losses.nkd import NKD
from .base import LossMethod, Method, ce, ce_weight, kd_weight, loss_method, register, warmup_epochs


@register("ce")
class CEMethod(Method):
    objective = "CE(z, y)"

    def losses(self, out, teacher, target, epoch):
        return {"loss_ce": ce(out["logits"], target)}


class WarmupRamp:
    """Mixin of a method whose distillation term ramps up linearly over ``warmup_epochs`` (DKD,
    ReviewKD): ``min((e+1)/W, 1)``; a ramp longer than the run is a config problem."""

    ramp_of = "DKD"  # what the config problem calls the ramped term

    @classmethod
    def config_problems(cls, params, cfg):
        if params.warmup_epochs > cfg.schedule.epochs:
            return [f"method.params.warmup_epochs: the {cls.ramp_of} ramp ({params.warmup_epochs} epochs) is longer than "
                    f"the run (schedule.epochs={cfg.schedule.epochs}): the {cls.ramp_of} term would never reach full weight"]
        return super().config_problems(params, cfg)

    def ramp(self, epoch: int) -> float:
        return min((epoch + 1) / max(self.p.warmup_epochs, 1), 1.0)


class RampedMethod(WarmupRamp, LossMethod):
    """DKD and its variants: the loss times ``min((e+1)/W, 1)`` (times ``kd_weight`` where the params have one)."""

    key = "dkd"

    def weight(self, epoch: int) -> float:
        w = getattr(self.p, "kd_weight", None)
        return self.ramp(epoch) if w is None else self.ramp(epoch) * w


KDMethod = loss_method("kd", KD, key="kd", objective="ce_weight·CE + kd_weight·KD",
                       ce_weight=ce_weight(0.1), kd_weight=kd_weight(0.9))
DKDMethod = loss_method("dkd", DKD, key="dkd", base=RampedMethod, objective="ce_weight·CE + min((e+1)/warmup_epochs, 1)·DKD",
                        ce_weight=ce_weight(1.0), warmup_epochs=warmup_epochs())
# logged only: NKD's parts nkd_target (L_t) and nkd_non_target (L_non, whose minimum is γλ²·H(T̂), not 0)
NKDMethod = loss_method("nkd", NKD, key="nkd", objective="ce_weight·CE + NKD", ce_weight=ce_weight(1.0))
