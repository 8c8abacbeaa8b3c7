"""What every training method shares: the registry, parameter dataclasses, the trainable part
(student + the method's own modules) and the frozen teacher.

A method is a small class (see :mod:`nkd.methods.teacher` and :mod:`nkd.methods.selfkd`):

* ``Params``: a dataclass of its hyper-parameters that checks itself (``checks()``) with the
  same validators as the loss functions, so a bad value is a config error before anything runs;
  defaults come from the loss functions' own signatures (one set of defaults);
* ``teacher_outputs``: what it needs from the frozen teacher — ``()`` (self-KD), ``("logits",)``,
  or ``("logits", "features")`` for feature methods;
* ``modules(student)``: extra trainable modules it owns (USKD's weak head), trained and
  checkpointed with the student and wrapped by DDP with it;
* ``forward(student, parts, x)``: the student's outputs it needs (default ``{"logits": ...}``);
* ``losses(out, teacher, target, epoch)``: ``{name: tensor}``. Keys starting with ``loss_`` are
  the terms of the objective (summed and back-propagated); any other key is a detached metric
  that is only logged (e.g. the parts of a loss, a weak head's accuracy).

Adding a method = one class in one file + one ``@register("name")`` line.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses._common import check_nonnegative, check_positive
from ..registry import Registry
from ..typed import build_dataclass, collect

METHODS = Registry("method")
TEACHER_OUTPUTS = ("logits", "features")


def register(name: str) -> Callable[[type], type]:
    """Class decorator: add a :class:`Method` subclass to :data:`METHODS` under ``name``."""

    def deco(cls: type) -> type:
        cls.name = name
        return METHODS.add(name, cls)

    return deco


def default_of(fn: Callable, name: str) -> Any:
    """The default of argument ``name`` of ``fn`` — a method's parameter defaults are its loss's."""
    return inspect.signature(fn).parameters[name].default


def ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy with hard ``[N]`` or soft ``[N, C]`` targets, computed in float32."""
    return F.cross_entropy(logits.float(), target.float() if target.is_floating_point() else target)


@dataclasses.dataclass
class Params:
    """Base of the methods' parameter dataclasses: ``__post_init__`` runs every check of
    :meth:`checks` and reports all failures at once (:class:`nkd.typed.Problems`)."""

    positive: ClassVar[tuple[str, ...]] = ("temperature",)  # float fields that must be > 0

    def __post_init__(self) -> None:
        collect(*self.checks())

    def checks(self) -> Iterable[tuple]:
        """``(check, name, value, ...)`` tuples; by default every float field is finite and ≥ 0
        (> 0 for the names in ``positive``), the validators the loss functions use."""
        return [(check_positive if f.name in self.positive else check_nonnegative, f.name, getattr(self, f.name))
                for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), (int, float))
                and not isinstance(getattr(self, f.name), bool)]


class Method:
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str] = "base"
    Params: ClassVar[type] = Params
    teacher_outputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Params, num_classes: int):
        self.p = params
        self.num_classes = num_classes

    @classmethod
    def needs_teacher(cls) -> bool:
        return bool(cls.teacher_outputs)

    @classmethod
    def config_problems(cls, params: Params, cfg: Any) -> list[str]:
        """Problems that involve the rest of the config (e.g. a warm-up longer than the run)."""
        return []

    def modules(self, student: nn.Module) -> dict[str, nn.Module]:
        """Extra trainable modules, registered on :class:`Trainable` under these names."""
        return {}

    def forward(self, student: nn.Module, parts: nn.Module, x: Tensor) -> dict[str, Tensor]:
        """The student's outputs this method needs; ``parts`` holds :meth:`modules` as attributes."""
        return {"logits": student(x)}

    def losses(self, out: dict[str, Tensor], teacher: dict[str, Tensor] | None, target: Tensor,
               epoch: int) -> dict[str, Tensor]:
        raise NotImplementedError


class Trainable(nn.Module):
    """The student plus its method's modules: the one module that is optimized, checkpointed
    (keys ``student.*`` and e.g. ``head.*``) and wrapped by DDP. ``forward(x)`` returns the
    method's output dict."""

    def __init__(self, student: nn.Module, method: Method):
        super().__init__()
        self.student = student
        for name, module in method.modules(student).items():
            self.add_module(name, module)
        self.method = method  # a plain object, not a module: nothing of it is registered twice

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.method.forward(self.student, self, x)


class Teacher(nn.Module):
    """A frozen teacher: no gradients, eval mode whatever ``train()`` is called with.
    ``forward(x, outputs)`` returns ``{"logits": ...}`` (+ ``"features"`` when asked)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        for q in model.parameters():
            q.requires_grad_(False)
        model.eval()

    def train(self, mode: bool = True) -> Teacher:
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, x: Tensor, outputs: tuple[str, ...] = ("logits",)) -> dict[str, Tensor]:
        if "features" in outputs:
            logits, feats = self.model(x, return_features=True)
            return {"logits": logits, "features": feats}
        return {"logits": self.model(x)}


def method_params(name: str, params: dict[str, Any] | None, problems: list[str]) -> Params | None:
    """The params dataclass of method ``name`` built from ``params``; problems are recorded."""
    if name not in METHODS:
        problems.append(f"method.name: {METHODS.unknown(name)}")
        return None
    return build_dataclass(METHODS[name].Params, params, "method.params.", problems)


def validate_method(cfg: Any, problems: list[str]) -> Params | None:
    """Check ``cfg.method`` (name, parameters, teacher presence, cross-checks) and return the
    resolved parameters (defaults filled in), or None when the name is unknown."""
    p = method_params(cfg.method.name, cfg.method.params, problems)
    if p is None:
        return None
    cls = METHODS[cfg.method.name]
    if cls.needs_teacher() and cfg.teacher is None:
        problems.append(f"teacher: method {cfg.method.name!r} needs a teacher (teacher.name, teacher.checkpoint)")
    problems.extend(cls.config_problems(p, cfg))
    return p


def build_method(name: str, params: dict[str, Any], num_classes: int, student: nn.Module) -> tuple[Method, Trainable]:
    """The method object and the :class:`Trainable` (student + the method's modules)."""
    problems: list[str] = []
    p = method_params(name, params, problems)
    if problems:
        from ..typed import ConfigError

        raise ConfigError(problems)
    method = METHODS[name](p, num_classes)
    return method, Trainable(student, method)
