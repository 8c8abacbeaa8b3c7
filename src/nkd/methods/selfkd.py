"""Self-KD methods (no teacher). Objectives:

* ``ls``: label-smoothed CE with ``ε``;
* ``zipf_ls``: ``w_ce·CE + w·ZipfLS``;
* ``tfkd``: ``(1−α)·CE + α·w·TfKD`` (Tf-KD_reg; ``0 ≤ α ≤ 1``);
* ``uskd``: ``w_ce·CE + USKD`` — the method owns USKD's weak head, a linear layer on the
  student's pooled intermediate feature (``student.weak_channels`` inputs).

Under DDP, USKD's batch-mean term is taken over each process's local batch, as in the official code.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..losses.dense import dense_loss
from ..losses.selfkd import LabelSmoothing, TfKD, ZipfLS
from ..losses.spec import hp, in_range, nonnegative
from ..losses.uskd import USKD
from .base import LossMethod, ce, ce_weight, loss_method, register

LSMethod = loss_method("ls", LabelSmoothing, key="ls", objective="LS_ε(z, y) (replaces CE)")  # no CE term
ZipfLSMethod = loss_method("zipf_ls", ZipfLS, key="zipf", objective="ce_weight·CE + weight·ZipfLS",
                           weight=hp(1.0, nonnegative, "weight ≥ 0 of the Zipf term (official CIFAR-100 runs: 0.1)"),
                           ce_weight=ce_weight(1.0))
ZipfLSMethod.weight_field = "weight"


@dataclasses.dataclass
class TfKDParams(TfKD):
    alpha: float = hp(0.1, in_range(0.0, 1.0, False, False), "α in ``[0, 1]``: ``(1−α)·CE + α·weight·TfKD``")
    weight: float = hp(1.0, nonnegative, "weight ≥ 0 of the Tf-KD term (the reference multiplier / C)")


@register("tfkd")
class TfKDMethod(LossMethod):
    objective = "(1 − alpha)·CE + alpha·weight·TfKD"
    Params = TfKDParams
    key = "tfkd"

    def weight(self, epoch):
        return self.p.alpha * self.p.weight  # (1 − α)·CE + α·weight·TfKD

    def losses(self, out, teacher, target, epoch):
        return {"loss_ce": (1 - self.p.alpha) * ce(out["logits"], target), **super().losses(out, teacher, target, epoch)}


@dataclasses.dataclass
class USKDParams(USKD):
    ce_weight: float = ce_weight(1.0)


@register("uskd")
class USKDMethod(LossMethod):
    """``loss_ce``, ``loss_uskd``; logged only: its parts ``uskd_target`` (α·L_t), ``uskd_non_target``
    (β·L_non), ``uskd_weak`` (L_weak) and the weak head's top-1 ``weak_top1``. The method owns the
    weak head, a linear layer on the student's pooled intermediate feature."""

    objective = "ce_weight·CE + USKD"

    Params = USKDParams
    key = "uskd"

    def modules(self, student: nn.Module) -> dict[str, nn.Module]:
        return {"head": nn.Linear(student.weak_channels, self.num_classes)}

    def forward(self, student, parts, x):
        logits, feats = student(x, return_features=True)
        return {"logits": logits, "weak_logits": parts.head(feats["weak"])}

    def losses(self, out, teacher, target, epoch):
        z, w, p = out["logits"], out["weak_logits"], self.p
        loss, parts = dense_loss(p, z, w, target=target, return_parts=True)
        label = target.argmax(-1) if target.is_floating_point() else target
        return {"loss_ce": p.ce_weight * ce(z, target), "loss_uskd": loss,
                **{f"uskd_{k}": v for k, v in parts.items()},
                "weak_top1": 100 * (w.detach().argmax(-1) == label).float().mean()}
