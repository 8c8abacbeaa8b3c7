"""Training methods: a registry of ``name → (Method class, params dataclass)``.

A method turns a batch into ``{loss name: tensor}``. The trainable part (student, plus the USKD
weak head) lives in :class:`Trainable` — the only module DDP wraps; the teacher is frozen, kept
in eval mode whatever ``train()`` is called with, and never wrapped.

Objectives (SPEC): ``ce``: CE. ``kd``: ``w_ce·CE + w_kd·KD``. ``dkd``: ``w_ce·CE + min((e+1)/W, 1)·DKD``
(``e`` the 0-based epoch). ``nkd``: ``w_ce·CE + NKD``. ``uskd``: ``w_ce·CE + USKD``. ``ls``:
label-smoothed CE. ``zipf_ls``: ``CE + w·ZipfLS``. ``tfkd``: ``(1−α)·CE + α·w·TfKD``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import dkd_loss, kd_loss, label_smoothing_loss, nkd_loss, tfkd_loss, uskd_loss, zipf_ls_loss

METHODS: dict[str, tuple[type, type]] = {}


def register(name: str, params: type):
    def deco(cls):
        METHODS[name] = (cls, params)
        cls.method_name = name
        return cls

    return deco


def ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy with hard ``[N]`` or soft ``[N, C]`` targets, computed in float32."""
    return F.cross_entropy(logits.float(), target.float() if target.is_floating_point() else target)


class Trainable(nn.Module):
    """Student (+ optional USKD weak head ``head``): ``forward(x) → (logits, weak_logits | None)``."""

    def __init__(self, student: nn.Module, weak_head: nn.Linear | None = None):
        super().__init__()
        self.student = student
        self.head = weak_head

    def forward(self, x: Tensor):
        if self.head is None:
            return self.student(x), None
        logits, feats = self.student(x, return_features=True)
        return logits, self.head(feats["weak"])


class Method(nn.Module):
    """Base: holds the (frozen) teacher; ``losses(logits, weak, images, target, epoch)``."""

    needs_teacher = False
    needs_weak_head = False
    method_name = "base"

    def __init__(self, params, teacher: nn.Module | None = None, num_classes: int = 100):
        super().__init__()
        self.p = params
        self.num_classes = num_classes
        self.teacher = teacher
        if teacher is not None:
            for q in teacher.parameters():
                q.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen whatever train() says
        return self

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        return self.teacher(images)

    def losses(self, logits: Tensor, weak: Tensor | None, images: Tensor, target: Tensor, epoch: int) -> dict[str, Tensor]:
        raise NotImplementedError


@dataclass
class CEParams:
    pass


@register("ce", CEParams)
class CEMethod(Method):
    def losses(self, logits, weak, images, target, epoch):
        return {"loss_ce": ce(logits, target)}


@dataclass
class KDParams:
    temperature: float = 4.0
    ce_weight: float = 0.1
    kd_weight: float = 0.9


@register("kd", KDParams)
class KDMethod(Method):
    needs_teacher = True

    def losses(self, logits, weak, images, target, epoch):
        t = self.teacher_logits(images)
        return {"loss_ce": self.p.ce_weight * ce(logits, target),
                "loss_kd": self.p.kd_weight * kd_loss(logits, t, temperature=self.p.temperature)}


@dataclass
class DKDParams:
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    ce_weight: float = 1.0
    warmup_epochs: int = 20


@register("dkd", DKDParams)
class DKDMethod(Method):
    needs_teacher = True

    def losses(self, logits, weak, images, target, epoch):
        t = self.teacher_logits(images)
        ramp = min((epoch + 1) / max(self.p.warmup_epochs, 1), 1.0)
        return {"loss_ce": self.p.ce_weight * ce(logits, target),
                "loss_dkd": ramp * dkd_loss(logits, t, target, alpha=self.p.alpha, beta=self.p.beta,
                                            temperature=self.p.temperature)}


@dataclass
class NKDParams:
    temperature: float = 1.0
    gamma: float = 1.5
    ce_weight: float = 1.0


@register("nkd", NKDParams)
class NKDMethod(Method):
    needs_teacher = True

    def losses(self, logits, weak, images, target, epoch):
        t = self.teacher_logits(images)
        return {"loss_ce": self.p.ce_weight * ce(logits, target),
                "loss_nkd": nkd_loss(logits, t, target, temperature=self.p.temperature, gamma=self.p.gamma)}


@dataclass
class USKDParams:
    alpha: float = 1.0
    beta: float = 0.1
    mu: float = 0.005
    rank: str = "paper"
    ce_weight: float = 1.0


@register("uskd", USKDParams)
class USKDMethod(Method):
    """USKD. Under DDP the soft target's batch mean is taken per process, over the local batch,
    as in the official code (a different global batch split changes it slightly)."""

    needs_weak_head = True

    def losses(self, logits, weak, images, target, epoch):
        return {"loss_ce": self.p.ce_weight * ce(logits, target),
                "loss_uskd": uskd_loss(logits, weak, target, alpha=self.p.alpha, beta=self.p.beta, mu=self.p.mu,
                                       rank=self.p.rank)}


@dataclass
class LSParams:
    epsilon: float = 0.1


@register("ls", LSParams)
class LSMethod(Method):
    def losses(self, logits, weak, images, target, epoch):
        return {"loss_ls": label_smoothing_loss(logits, target, epsilon=self.p.epsilon)}


@dataclass
class ZipfLSParams:
    weight: float = 1.0
    ce_weight: float = 1.0


@register("zipf_ls", ZipfLSParams)
class ZipfLSMethod(Method):
    def losses(self, logits, weak, images, target, epoch):
        return {"loss_ce": self.p.ce_weight * ce(logits, target),
                "loss_zipf": self.p.weight * zipf_ls_loss(logits, target)}


@dataclass
class TfKDParams:
    alpha: float = 0.1
    temperature: float = 20.0
    correct_prob: float = 0.99
    weight: float = 1.0


@register("tfkd", TfKDParams)
class TfKDMethod(Method):
    def losses(self, logits, weak, images, target, epoch):
        return {"loss_ce": (1 - self.p.alpha) * ce(logits, target),
                "loss_tfkd": self.p.alpha * self.p.weight * tfkd_loss(
                    logits, target, correct_prob=self.p.correct_prob, temperature=self.p.temperature)}


def method_params(name: str, params: dict[str, Any], problems: list[str] | None = None):
    """Build the params dataclass of method ``name``; unknown keys/types become problems."""
    from ..config import build_dataclass

    own = [] if problems is None else problems
    if name not in METHODS:
        own.append(f"method.name: unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
        return None
    p = build_dataclass(METHODS[name][1], params, "method.params.", own)
    if problems is None and own:
        from ..config import ConfigError

        raise ConfigError(own)
    return p


def validate_method(cfg, problems: list[str]) -> None:
    p = method_params(cfg.method.name, cfg.method.params, problems)
    if p is None:
        return
    cls = METHODS[cfg.method.name][0]
    if cls.needs_teacher and cfg.teacher is None:
        problems.append(f"teacher: method {cfg.method.name!r} needs a teacher (teacher.name, teacher.checkpoint)")
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        if f.name in ("temperature",) and not v > 0:
            problems.append(f"method.params.{f.name}: must be > 0, got {v}")
        elif isinstance(v, float) and v < 0:
            problems.append(f"method.params.{f.name}: must be >= 0, got {v}")
    if cfg.method.name == "uskd" and p.rank not in ("paper", "official"):
        problems.append(f"method.params.rank: must be 'paper' or 'official', got {p.rank!r}")


def build_method(cfg, student: nn.Module, teacher: nn.Module | None) -> tuple[Method, Trainable]:
    cls, _ = METHODS[cfg.method.name]
    params = method_params(cfg.method.name, cfg.method.params)
    method = cls(params, teacher=teacher, num_classes=cfg.model.num_classes)
    head = nn.Linear(student.weak_channels, cfg.model.num_classes) if cls.needs_weak_head else None
    return method, Trainable(student, head)


__all__ = ["METHODS", "Method", "Trainable", "build_method", "method_params", "validate_method", "register", "ce"]
