"""What every training method shares: the registry, parameter dataclasses, the trainable part
(student + the method's own modules) and the frozen teacher.

A method is a small class (see :mod:`nkd.methods.teacher` and :mod:`nkd.methods.selfkd`):

* ``Params``: a dataclass of its hyper-parameters — for a method built on a loss, a subclass of
  the loss's spec (:mod:`nkd.losses.spec`) that adds the method's weights, so each parameter's
  default and check is written once (a bad value is a config error before anything runs);
* ``teacher_outputs``: what it needs from the frozen teacher — ``()`` (self-KD), ``("logits",)``;
  a feature method's instance holds ``("logits", *feature references)`` (:mod:`nkd.models.hooks`),
  resolved by :meth:`Method.teacher_refs` from its params and the teacher model;
* ``modules(student)``: extra trainable modules it owns (USKD's weak head), trained and
  checkpointed with the student and wrapped by DDP with it;
* ``forward(student, parts, x)``: the student's outputs it needs (default ``{"logits": ...}``);
* ``losses(out, teacher, target, epoch)``: ``{name: tensor}``. Keys starting with ``loss_`` are
  the terms of the objective (summed and back-propagated); any other key is a detached metric
  that is only logged (e.g. the parts of a loss, a weak head's accuracy).

A method that is "``ce_weight·CE + weight·loss``" is a :class:`LossMethod`: it names its loss key
and its weight, and the loss, its parts and their log names come from the spec. Adding a method =
one class in one file + one ``@register("name")`` line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses.dense import dense_loss
from ..losses.spec import Checked, hp, nonnegative
from ..registry import Registry
from ..typed import build_dataclass

METHODS = Registry("method")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a method may need when it is built: one input's shape ``[C, H, W]``, the (bare,
    uncompiled) teacher model, from which feature methods size their adapters, and the training
    set's labels by dataset index (CRD's negatives)."""

    input_shape: tuple[int, ...] = ()
    teacher: nn.Module | None = None
    train_labels: Tensor | None = None


class Sample(NamedTuple):
    """What a method with ``needs_index`` gets with each batch: its samples' dataset indices ``[B]``
    and the seed of the step's own random draws, a function of (seed, epoch, step, rank) only — so
    a student draws the same numbers alone or in a lockstep group."""

    index: Tensor
    seed: int


def register(name: str) -> Callable[[type], type]:
    """Class decorator: add a :class:`Method` subclass to :data:`METHODS` under ``name``."""

    def deco(cls: type) -> type:
        cls.name = name
        return METHODS.add(name, cls)

    return deco


def ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy with hard ``[N]`` or soft ``[N, C]`` targets, computed in float32."""
    return F.cross_entropy(logits.float(), target.float() if target.is_floating_point() else target)


@dataclasses.dataclass
class Params(Checked):
    """Parameters of a method without any (``ce``); methods built on a loss subclass its spec
    (also a :class:`~nkd.losses.spec.Checked`)."""


def ce_weight(default: float) -> Any:
    """The ``ce_weight`` field of a method: weight ≥ 0 of the cross-entropy with the label."""
    return hp(default, nonnegative, "w_ce ≥ 0, weight of the cross-entropy with the label")


def kd_weight(default: float, doc: str = "w_kd ≥ 0, weight of the distillation term") -> Any:
    """The ``kd_weight`` field of a method: weight ≥ 0 of its distillation term."""
    return hp(default, nonnegative, doc)


def int_at_least(low: int):
    """A check: an int (not a bool) ``>= low``."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    return check


nonnegative_int, positive_int = int_at_least(0), int_at_least(1)


def boolean(name: str, value: Any) -> None:
    """A check: ``true`` or ``false``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def warmup_epochs(default: int = 20) -> Any:
    """The ``warmup_epochs`` field of a ramped method: the linear warm-up's length ``W``."""
    return hp(default, nonnegative_int, "W, epochs of the linear warm-up ``min((e+1)/W, 1)`` of the distillation term")


class Method:
    """Base class; see the module docstring for the contract."""

    name: ClassVar[str] = "base"
    Params: ClassVar[type] = Params
    teacher_outputs: ClassVar[tuple[str, ...]] = ()
    objective: ClassVar[str] = ""  # the training objective, for the docs' method table
    needs_index: ClassVar[bool] = False  # losses(..., sample=Sample) gets the batch's dataset indices

    def __init__(self, params: Params, num_classes: int, setup: Setup | None = None):
        self.p = params
        self.num_classes = num_classes
        self.setup = setup or Setup()

    @classmethod
    def needs_teacher(cls) -> bool:
        return bool(cls.teacher_outputs)

    @classmethod
    def teacher_refs(cls, params: Params, teacher: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, ...]:
        """What this method reads from the teacher with ``params``: ``"logits"`` and feature
        references; the trainer runs the shared teacher once for the union over a lockstep group."""
        return cls.teacher_outputs

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


class LossMethod(Method):
    """``ce_weight·CE + weight(epoch)·L`` for the loss ``L`` whose spec ``Params`` subclasses.

    Logs ``loss_ce`` (when the params have ``ce_weight``), ``loss_<key>`` and the spec's parts as
    ``<key>_<part>``. A spec whose second input is the teacher's logits gets ``teacher_outputs =
    ("logits",)`` and is called with them.
    """

    key: ClassVar[str] = ""
    weight_field: ClassVar[str] = "kd_weight"  # the params field that weighs the loss (absent: weight 1)
    objective = "ce_weight·CE + kd_weight·L"

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        p = cls.__dict__.get("Params")
        if p is not None and len(getattr(p, "inputs", ())) == 2 and getattr(p, "detach_second", False):
            cls.teacher_outputs = ("logits",)

    def weight(self, epoch: int) -> float | None:
        """The distillation term's weight at ``epoch``; ``None`` = 1 (no multiplication)."""
        return getattr(self.p, self.weight_field, None)

    def losses(self, out, teacher, target, epoch):
        z, p = out["logits"], self.p
        tensors = (z, teacher["logits"]) if self.teacher_outputs else (z,)
        loss, parts = dense_loss(p, *tensors, target=target, return_parts=True)
        w = self.weight(epoch)
        terms = {} if getattr(p, "ce_weight", None) is None else {"loss_ce": p.ce_weight * ce(z, target)}
        terms[f"loss_{self.key}"] = loss if w is None else w * loss
        return {**terms, **{f"{self.key}_{k}": v for k, v in parts.items()}}


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
    ``forward(x, outputs)`` returns ``{"logits": ...}`` plus each feature reference in ``outputs``
    (:class:`~nkd.models.hooks.FeatureReader`: ``@stage<i>``, ``@pooled``, module paths)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._readers: dict[tuple[str, ...], Any] = {}
        for q in model.parameters():
            q.requires_grad_(False)
        model.eval()

    def train(self, mode: bool = True) -> Teacher:
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, x: Tensor, outputs: tuple[str, ...] = ("logits",)) -> dict[str, Tensor]:
        refs = tuple(o for o in outputs if o != "logits")
        if not refs:
            return {"logits": self.model(x)}
        if refs not in self._readers:
            from ..models.hooks import FeatureReader

            self._readers[refs] = FeatureReader(self.model, refs, detach=True)
        logits, feats = self._readers[refs](x)
        return {"logits": logits, **feats}


def loss_method(name: str, spec: type, *, key: str, objective: str, base: type | None = None, **weights: Any) -> type:
    """Register the method ``name`` built on ``spec`` in one line: its params are ``spec`` plus the
    ``weights`` fields (``ce_weight=ce_weight(0.1)``, ``kd_weight=…``, ``warmup_epochs=…``), its class
    a ``base`` (default :class:`LossMethod`) logging ``loss_<key>``; returns the method class."""
    fields = [(n, type(f.default), f) for n, f in weights.items()]
    params = dataclasses.make_dataclass(f"{spec.__name__}Params", fields, bases=(spec,))
    params.__module__ = spec.__module__
    cls = type(f"{spec.__name__}Method", (base or LossMethod,), {"Params": params, "key": key, "objective": objective,
                                                                 "__module__": spec.__module__})
    return register(name)(cls)


def derive_methods() -> None:
    """Register a :class:`LossMethod` for every loss spec registered with ``method=`` defaults that
    has no method yet: its params are the spec plus ``ce_weight`` and ``kd_weight``, its objective
    ``ce_weight·CE + kd_weight·loss``, logged as ``loss_ce`` and ``loss_<name>`` (+ parts)."""
    from ..losses.spec import LOSS_SPECS

    for name, spec in LOSS_SPECS.items():
        defaults = getattr(spec, "method_defaults", None)
        if defaults is None or name in METHODS:
            continue
        loss_method(name, spec, key=name, objective=f"ce_weight·CE + kd_weight·{name}",
                    ce_weight=ce_weight(defaults.get("ce_weight", 1.0)), kd_weight=kd_weight(defaults.get("kd_weight", 1.0)))


def method_params(name: str, params: dict[str, Any] | None, problems: list[str]) -> Params | None:
    """The params dataclass of method ``name`` built from ``params``; problems are recorded."""
    derive_methods()
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


def build_method(name: str, params: dict[str, Any], num_classes: int, student: nn.Module,
                 setup: Setup | None = None) -> tuple[Method, Trainable]:
    """The method object and the :class:`Trainable` (student + the method's modules); feature
    methods need ``setup`` (the input shape and the teacher model)."""
    problems: list[str] = []
    p = method_params(name, params, problems)
    if problems:
        from ..typed import ConfigError

        raise ConfigError(problems)
    method = METHODS[name](p, num_classes, setup)
    return method, Trainable(student, method)


def methods_table() -> str:
    """The Markdown table of every registered method (docs/methods.md, "Using a method"): name,
    objective, loss function/module and parameters with defaults — derived from the registries."""
    derive_methods()
    rows = ["| `method.name` | training objective (what the trainer minimizes) | loss functions / modules | "
            "`method.params` (default) |", "|---|---|---|---|"]
    for name, cls in METHODS.items():
        spec = next((c for c in cls.Params.__mro__ if "function" in c.__dict__), None)
        fns = (spec.function, spec.module) if spec is not None else getattr(cls, "loss_functions", ())
        forms = ", ".join(f"`{f.__name__}`" for f in fns if f) or "—"
        params = ", ".join(f"`{f.name}` ({f.default!r})" for f in dataclasses.fields(cls.Params)) or "none"
        rows.append(f"| `{name}` | `{cls.objective}` | {forms} | {params} |")
    return "\n".join(rows) + "\n"
