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

from ..losses import RANK_MODES, label_smoothing_loss, tfkd_loss, uskd_loss, zipf_ls_loss
from ..losses._common import check_range
from .base import Method, Params, ce, default_of, register


@dataclasses.dataclass
class LSParams(Params):
    epsilon: float = default_of(label_smoothing_loss, "epsilon")

    def checks(self):
        return [(check_range, "epsilon", self.epsilon, 0.0, 1.0)]


@register("ls")
class LSMethod(Method):
    Params = LSParams

    def losses(self, out, teacher, target, epoch):
        return {"loss_ls": label_smoothing_loss(out["logits"], target, epsilon=self.p.epsilon)}


@dataclasses.dataclass
class ZipfLSParams(Params):
    weight: float = 1.0
    ce_weight: float = 1.0


@register("zipf_ls")
class ZipfLSMethod(Method):
    Params = ZipfLSParams

    def losses(self, out, teacher, target, epoch):
        z = out["logits"]
        return {"loss_ce": self.p.ce_weight * ce(z, target), "loss_zipf": self.p.weight * zipf_ls_loss(z, target)}


@dataclasses.dataclass
class TfKDParams(Params):
    alpha: float = 0.1
    temperature: float = default_of(tfkd_loss, "temperature")
    correct_prob: float = default_of(tfkd_loss, "correct_prob")
    weight: float = 1.0

    def checks(self):
        return [*super().checks(), (check_range, "alpha", self.alpha, 0.0, 1.0, False, False),
                (check_range, "correct_prob", self.correct_prob, 0.0, 1.0, True)]


@register("tfkd")
class TfKDMethod(Method):
    Params = TfKDParams

    def losses(self, out, teacher, target, epoch):
        z, p = out["logits"], self.p
        return {"loss_ce": (1 - p.alpha) * ce(z, target),
                "loss_tfkd": p.alpha * p.weight * tfkd_loss(z, target, correct_prob=p.correct_prob,
                                                            temperature=p.temperature)}


@dataclasses.dataclass
class USKDParams(Params):
    alpha: float = default_of(uskd_loss, "alpha")
    beta: float = default_of(uskd_loss, "beta")
    mu: float = default_of(uskd_loss, "mu")
    rank: str = default_of(uskd_loss, "rank")
    ce_weight: float = 1.0

    def checks(self):
        def rank_ok(name, value):
            if value not in RANK_MODES:
                raise ValueError(f"{name} must be one of {RANK_MODES}, got {value!r}")

        return [*super().checks(), (rank_ok, "rank", self.rank)]


@register("uskd")
class USKDMethod(Method):
    Params = USKDParams

    def modules(self, student: nn.Module) -> dict[str, nn.Module]:
        return {"head": nn.Linear(student.weak_channels, self.num_classes)}

    def forward(self, student, parts, x):
        logits, feats = student(x, return_features=True)
        return {"logits": logits, "weak_logits": parts.head(feats["weak"])}

    def losses(self, out, teacher, target, epoch):
        """``loss_ce``, ``loss_uskd``; logged only: its parts ``uskd_target`` (α·L_t),
        ``uskd_non_target`` (β·L_non), ``uskd_weak`` (L_weak) and the weak head's top-1 ``weak_top1``."""
        z, w, p = out["logits"], out["weak_logits"], self.p
        loss, parts = uskd_loss(z, w, target, alpha=p.alpha, beta=p.beta, mu=p.mu, rank=p.rank, return_parts=True)
        label = target.argmax(-1) if target.is_floating_point() else target
        return {"loss_ce": p.ce_weight * ce(z, target), "loss_uskd": loss,
                **{f"uskd_{k}": v for k, v in parts.items()},
                "weak_top1": 100 * (w.detach().argmax(-1) == label).float().mean()}
