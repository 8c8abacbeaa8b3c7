"""A loss is one typed unit: a :class:`LossSpec` dataclass.

Its fields are the hyper-parameters, each declared once with :func:`hp` — default, check and one
line of documentation. Its class attributes say what it takes (``inputs``, ``target``), which
reductions it supports, whether its maths is row-wise (then it can be chunked over the LM head),
and which parts it logs. Its :meth:`LossSpec.rows` is the maths: per-row losses ``[M]`` for the
flattened rows, and — where derived by hand — the gradient ``∂L/∂z`` of each row.

From a registered spec everything else is derived, none of it written by hand per loss:

* the function (``nkd_loss``) and the ``nn.Module`` (``NKDLoss``), run by the dense driver
  (:mod:`nkd.losses.dense`) — validation, row parsing, autocast, reduction, parts;
* the chunked fused-linear form for LM heads (:mod:`nkd.losses.chunked`), analytic where the spec
  gives ``∂L/∂z`` and through autograd chunk by chunk otherwise;
* the training method's parameter dataclass (:mod:`nkd.methods`), which subclasses the spec;
* the loss registry :data:`LOSSES`, the report's method order and the docs' method lists.

Adding a loss is one spec class and one ``@register_loss`` line — see docs/methods.md,
"Adding a loss".
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from torch import Tensor, nn

from ..registry import Registry
from ..typed import collect
from ._common import REDUCTIONS, Rows, check_nonnegative, check_positive, check_range

__all__ = ["Checked", "LossSpec", "RowOut", "hp", "positive", "nonnegative", "in_range", "one_of", "LOSSES", "LOSS_SPECS", "register_loss",
           "Input"]


# ----------------------------------------------------------------------------- hyper-parameters
positive = check_positive  # a check: a finite number > 0
nonnegative = check_nonnegative  # a check: a finite number >= 0


def in_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> Callable[[str, Any], None]:
    """A check: a finite number in ``[lo, hi)`` (openness per flag)."""

    def check(name: str, value: Any) -> None:
        check_range(name, value, lo, hi, lo_open, hi_open)

    return check


def one_of(*options: str) -> Callable[[str, Any], None]:
    """A check: one of ``options``."""

    def check(name: str, value: Any) -> None:
        if value not in options:
            raise ValueError(f"{name} must be one of {options}, got {value!r}")

    check.options = options  # type: ignore[attr-defined]
    return check


def hp(default: Any, check: Callable[[str, Any], None], doc: str) -> Any:
    """A hyper-parameter field: its ``default``, its ``check(name, value)`` (raises ValueError with
    a message starting with the name) and one line of documentation (the maths symbol, its range,
    the published settings)."""
    return dataclasses.field(default=default, metadata={"check": check, "doc": doc})


class Input(NamedTuple):
    """A tensor argument of a loss: its name, its documentation, and whether it may be omitted
    (keyword-only, default ``None``)."""

    name: str
    doc: str
    optional: bool = False


class RowOut(NamedTuple):
    """What :meth:`LossSpec.rows` returns: per-row losses ``[M]`` (0 on rows that are not valid),
    the gradients of each row w.r.t. the differentiable inputs (``None`` when not derived or not
    asked for; a tensor for ``z``, or a pair for ``(z, second input)``), and the per-row parts."""

    loss: Tensor
    grad: Tensor | tuple[Tensor | None, Tensor | None] | None = None
    parts: dict[str, Tensor] | None = None


_COMMON_DOCS = {
    "reduction": '``"mean"`` (default; over the rows that are not ignored, 0 if none), ``"sum"`` or ``"none"`` '
                 "(per-row values of shape ``[...]``, 0 on ignored rows)",
    "ignore_index": "an int: hard-label value whose rows are left out of the loss and of the mean (default -100)",
    "return_parts": "also return the detached, reduced parts (a dict; they sum to the loss), for logging",
}


@dataclass
class Checked:
    """A dataclass whose fields declared with :func:`hp` check themselves when it is built; every
    failure is reported at once (:class:`nkd.typed.Problems`). The base of loss specs and of the
    training methods' parameters."""

    def __post_init__(self) -> None:
        collect(*self.checks())

    def checks(self) -> Iterable[tuple]:
        """``(check, name, value)`` for every field declared with a check (subclasses may add cross-checks)."""
        return [(f.metadata["check"], f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if "check" in f.metadata]


@dataclass
class LossSpec(Checked):
    """Base of every loss spec; see the module docstring for the contract.

    Class attributes a spec sets:

    * ``inputs``: its tensor arguments before ``target`` (``student_logits``/``teacher_logits``,
      or ``logits``, …); the first is the student's logits ``z`` ``[..., C]``;
    * ``target``: ``"required"`` or ``"optional"`` (then it only marks ``ignore_index`` rows);
    * ``detach_second``: the second input is a constant (a teacher) rather than a trained output;
    * ``reductions``: the reductions it supports, and ``reductions_why`` if not all three;
    * ``row_wise``: each row's loss depends on that row only (so it can be chunked);
    * ``dense_analytic``: the dense form uses :meth:`rows`' analytic gradient instead of autograd;
    * ``fuses_ce``: :meth:`rows` takes ``ce_weight`` and adds the cross-entropy in its own pass
      (the chunked driver adds it otherwise);
    * ``parts``: names of the logged parts, in order; ``extra``: keyword-only tensor arguments.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = "the loss"
    inputs: ClassVar[tuple[Input, ...]] = (
        Input("student_logits", "``[..., C]`` floating logits of the student, ``C >= 2``"),
        Input("teacher_logits", "the teacher's logits, same shape as ``student_logits``; treated as constants (detached)"),
    )
    target: ClassVar[str] = "required"
    target_doc: ClassVar[str] = ("int64 labels ``[...]`` with values in ``[0, C)`` or ``ignore_index``, or soft labels "
                                 "``[..., C]`` (rows >= 0 summing to 1; ``t = argmax`` of the row)")
    detach_second: ClassVar[bool] = True
    reductions: ClassVar[tuple[str, ...]] = REDUCTIONS
    reductions_why: ClassVar[str] = ""
    row_wise: ClassVar[bool] = True
    dense_analytic: ClassVar[bool] = False
    fuses_ce: ClassVar[bool] = False
    parts: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[tuple[Input, ...]] = ()
    returns: ClassVar[str] = "the loss, float32 (float64 for float64 input)"

    @classmethod
    def hyper_parameters(cls) -> list[dataclasses.Field]:
        """The spec's own hyper-parameter fields (a method's extra fields excluded)."""
        spec = next((c for c in cls.__mro__ if "function" in c.__dict__), cls)  # the registered spec
        return [f for f in dataclasses.fields(spec) if "check" in f.metadata]

    def loss_kwargs(self) -> dict[str, Any]:
        """The spec's own hyper-parameters as keyword arguments (what the loss function takes)."""
        return {f.name: getattr(self, f.name) for f in self.hyper_parameters()}

    def min_topk(self, rest: str) -> int:
        """The smallest ``k`` a sparse top-k teacher may have for this loss (``rest`` as in
        :class:`~nkd.losses.chunked.TopKTeacher`)."""
        return 1

    def check_rows(self, rows: Rows) -> None:
        """Checks of a call that need the parsed rows (e.g. a minimum class count)."""

    def rows(self, z: Tensor, u: Tensor | None, r: Rows, need_grad: bool, **extra: Tensor | None) -> RowOut:
        """Per-row losses of the flattened rows ``z`` ``[M, C]`` (``u`` the second input, or ``None``).

        ``r`` carries the class index per row, the valid mask (``None`` in a fused chunk: every row
        counts) and soft labels. With ``need_grad`` a spec that derived ``∂L/∂z`` returns it, already
        zero on invalid rows; a spec without an analytic gradient returns ``grad=None`` and is
        differentiated by autograd.
        """
        raise NotImplementedError

    def chunk_rows(self, z: Tensor, u: Tensor, idx: Tensor, need_grad: bool, ce_weight: float = 0.0,
                   ws: Any = None) -> tuple | None:
        """The chunked driver's fast form of :meth:`rows` (+ ``ce_weight·CE``) on a chunk whose rows are
        all valid, allowed to overwrite ``z`` and ``u`` (buffers the driver owns) and to take its
        temporaries from the workspace ``ws``: ``(loss [c], grad [c, V] | None)``, or ``None`` to
        have the driver recompute the chunk and run :meth:`rows` (a spec without one returns
        ``None``; kernels: :mod:`nkd.losses._inplace`)."""
        return None


def common_checks(spec: type[LossSpec] | LossSpec, reduction: object, ignore_index: object) -> None:
    """The checks every loss call shares, written once: ``reduction`` among the spec's reductions,
    ``ignore_index`` an int (``True`` is refused: it would drop every class-1 row)."""
    if reduction not in spec.reductions:
        why = f": {spec.reductions_why}" if spec.reductions_why and reduction in REDUCTIONS else ""
        raise ValueError(f"reduction must be one of {spec.reductions}, got {reduction!r}{why}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


# ----------------------------------------------------------------------------- derived forms
def _field_doc(f: dataclasses.Field) -> str:
    return f"{f.name}: {f.metadata['doc']} (default {f.default!r})."


def _args_doc(spec: type[LossSpec], with_inputs: bool = True) -> list[str]:
    lines = []
    if with_inputs:
        lines += [f"{i.name}: {i.doc}." for i in spec.inputs]
        t = "optional (default ``None``) " if spec.target == "optional" else ""
        lines.append(f"target: {t}{spec.target_doc}.")
        lines += [f"{i.name}: {i.doc}." for i in spec.extra]
    lines += [_field_doc(f) for f in spec.hyper_parameters()]
    red = _COMMON_DOCS["reduction"] if spec.reductions == REDUCTIONS else \
        " or ".join(f'``"{r}"``' for r in spec.reductions) + (f"; {spec.reductions_why}" if spec.reductions_why else "")
    lines += [f"reduction: {red}.", f"ignore_index: {_COMMON_DOCS['ignore_index']}."]
    if spec.parts and with_inputs:
        lines.append(f"return_parts: {_COMMON_DOCS['return_parts']}: {', '.join(spec.parts)}.")
    return lines


def _docstring(summary: str, spec: type[LossSpec], args: list[str], returns: str) -> str:
    body = inspect.cleandoc(spec.__doc__ or "")
    arg_text = "\n".join("    " + a for a in args)
    return f"{summary}\n\n{body}\n\nArgs:\n{arg_text}\n\nReturns:\n    {returns}\n"


def _function(spec: type[LossSpec], fname: str) -> Callable[..., Any]:
    from .dense import dense_loss

    fields = spec.hyper_parameters()
    names = [f.name for f in fields]

    def loss_fn(*args: Tensor, **kwargs: Any):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        hyper = spec(**{n: a[n] for n in names})
        tensors = [a[i.name] for i in spec.inputs]
        extra = {i.name: a[i.name] for i in spec.extra}
        return dense_loss(hyper, *tensors, target=a["target"], reduction=a["reduction"], ignore_index=a["ignore_index"],
                          return_parts=a.get("return_parts", False), **extra)

    P = inspect.Parameter
    params = [P(i.name, P.POSITIONAL_OR_KEYWORD) for i in spec.inputs]
    params.append(P("target", P.POSITIONAL_OR_KEYWORD, default=None if spec.target == "optional" else P.empty))
    params += [P(i.name, P.KEYWORD_ONLY, default=None) for i in spec.extra]
    params += [P(f.name, P.KEYWORD_ONLY, default=f.default) for f in fields]
    params += [P("reduction", P.KEYWORD_ONLY, default="mean"), P("ignore_index", P.KEYWORD_ONLY, default=-100)]
    if spec.parts:
        params.append(P("return_parts", P.KEYWORD_ONLY, default=False))
    sig = inspect.Signature(params)
    loss_fn.__signature__ = sig  # type: ignore[attr-defined]
    loss_fn.__name__ = loss_fn.__qualname__ = fname
    loss_fn.__module__ = spec.__module__
    loss_fn.__doc__ = _docstring(f"{spec.title} per row, then ``reduction``.", spec, _args_doc(spec),
                                 spec.returns + ("; with ``return_parts``, ``(loss, parts)``" if spec.parts else "") + ".")
    return loss_fn


class SpecLossModule(nn.Module):
    """Base of the generated loss modules: holds a spec and the call settings; ``forward`` runs the
    dense driver."""

    spec_cls: ClassVar[type[LossSpec]]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        bound = self._init_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        del a["self"]
        self.reduction, self.ignore_index = a.pop("reduction"), a.pop("ignore_index")
        self.spec = self.spec_cls(**a)
        common_checks(self.spec_cls, self.reduction, self.ignore_index)

    def __getattr__(self, name: str) -> Any:  # hyper-parameters read as attributes (module.temperature)
        spec = self.__dict__.get("spec")
        if spec is not None and name in {f.name for f in dataclasses.fields(spec)}:
            return getattr(spec, name)
        return super().__getattr__(name)

    def forward(self, *tensors: Tensor, **kw: Any) -> Any:
        from .dense import dense_loss

        return dense_loss(self.spec, *tensors, reduction=self.reduction, ignore_index=self.ignore_index, **kw)

    def extra_repr(self) -> str:
        kv = ", ".join(f"{k}={v!r}" for k, v in self.spec.loss_kwargs().items())
        return f"{kv}, reduction={self.reduction!r}" if kv else f"reduction={self.reduction!r}"


def _module(spec: type[LossSpec], cname: str, fname: str) -> type[nn.Module]:
    P = inspect.Parameter
    fields = spec.hyper_parameters()
    init_params = [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(f.name, P.POSITIONAL_OR_KEYWORD, default=f.default)
                                                          for f in fields]
    init_params += [P("reduction", P.POSITIONAL_OR_KEYWORD, default="mean"),
                    P("ignore_index", P.POSITIONAL_OR_KEYWORD, default=-100)]
    init_sig = inspect.Signature(init_params)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        SpecLossModule.__init__(self, *args, **kwargs)

    __init__.__signature__ = init_sig  # type: ignore[attr-defined]

    fwd_inputs = list(spec.inputs)

    def forward(self, *args: Any, **kwargs: Any):
        bound = fwd_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        extra = {i.name: a[i.name] for i in spec.extra}
        return SpecLossModule.forward(self, *(a[i.name] for i in fwd_inputs), target=a["target"], **extra)

    fwd_params = [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(i.name, P.POSITIONAL_OR_KEYWORD) for i in fwd_inputs]
    fwd_params.append(P("target", P.POSITIONAL_OR_KEYWORD, default=None if spec.target == "optional" else P.empty))
    fwd_params += [P(i.name, P.POSITIONAL_OR_KEYWORD, default=None) for i in spec.extra]
    fwd_sig = inspect.Signature(fwd_params)
    forward.__signature__ = fwd_sig  # type: ignore[attr-defined]
    forward.__doc__ = _docstring(
        f"{spec.title} of one batch with this module's hyper-parameters.", spec,
        [f"{i.name}: {i.doc}." for i in fwd_inputs] + [f"target: {spec.target_doc}."] +
        [f"{i.name}: {i.doc}." for i in spec.extra],
        'a scalar (``"mean"``/``"sum"``) or per-row values ``[...]`` (``"none"``)')
    doc = _docstring(f"Module form of :func:`{fname}`: {spec.title} with fixed hyper-parameters (no parameters are "
                     "learned).", spec, _args_doc(spec, with_inputs=False), f"a module; ``forward`` returns {spec.returns}.")
    cls = type(cname, (SpecLossModule,), {"spec_cls": spec, "__init__": __init__, "forward": forward, "__doc__": doc,
                                          "_init_sig": init_sig, "__module__": spec.__module__})
    return cls


LOSS_SPECS: Registry = Registry("loss")  # name -> spec class, in registration order (the report's method order)
LOSSES: Registry = Registry("loss")  # name -> the derived function (nkd_loss, ...)


def register_loss(name: str, function: str, module: str | None = None,
                  method: dict[str, float] | None = None) -> Callable[[type[LossSpec]], type[LossSpec]]:
    """Class decorator: register a spec under ``name`` and derive its function (named ``function``)
    and, unless ``module`` is ``None``, its ``nn.Module`` class (named ``module``). The derived
    forms are the spec's attributes ``spec.function`` and ``spec.module``. With ``method`` (the
    defaults of ``ce_weight`` and ``kd_weight``, e.g. ``{"ce_weight": 1.0, "kd_weight": 1.0}``)
    the training method ``name`` = ``ce_weight·CE + kd_weight·loss`` is derived too
    (:func:`nkd.methods.base.derive_methods`)."""

    def deco(spec: type[LossSpec]) -> type[LossSpec]:
        spec.name = name
        spec.method_defaults = method  # type: ignore[attr-defined]
        spec.function = None  # type: ignore[attr-defined]  # marks the spec class for hyper_parameters()
        spec.function = _function(spec, function)  # type: ignore[attr-defined]
        spec.module = _module(spec, module, function) if module else None  # type: ignore[attr-defined]
        LOSS_SPECS.add(name, spec)
        LOSSES.add(name, spec.function)  # type: ignore[attr-defined]
        return spec

    return deco
