"""Any module's output — or input — by its module path (``layer3.1.conv2``), through forward hooks
that are installed for a ``with`` block and removed on exit, on any ``nn.Module`` (the CRD zoo,
timm and torchvision models alike), without editing the model.

>>> with FeatureTaps(model, ["layer2", "layer3.0.conv1"], kind="output") as taps:
...     logits = model(x)
>>> taps["layer2"].shape

A path may end in ``:input`` or ``:output`` to choose, for that path alone, what is taken (a
module's input is what a functional op after it cannot give: e.g. the pre-activation fed to a
``nn.ReLU``); the value is stored under the reference as written.

For nkd's timm and torchvision adapters, paths may be given as in the bare model (``layer3.1.conv2``
for ``model.layer3.1.conv2``). A path that does not exist is a ``KeyError`` naming it, with the closest existing path. A tapped
module that runs more than once in a forward keeps its last call's value (``taps.calls`` counts).
Hooks are removed on exit even when the forward raises, so a model never keeps a stray hook.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..registry import did_you_mean

__all__ = ["FeatureReader", "FeatureTaps", "module_at", "parse_ref"]

KINDS = ("output", "input")


def parse_ref(ref: str, default: str = "output") -> tuple[str, str]:
    """``"layer3.1.conv2:input"`` → ``("layer3.1.conv2", "input")``; no suffix → ``default``."""
    if not isinstance(ref, str):
        raise TypeError(f"a module path must be a str such as 'layer3.1.conv2', got {type(ref).__name__}")
    path, sep, kind = ref.rpartition(":")
    if sep and kind in KINDS:
        return path, kind
    if sep:
        raise ValueError(f"module reference {ref!r}: the suffix after ':' must be one of {KINDS}, got {kind!r}")
    return ref, default


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The submodule of ``model`` at the dotted ``path`` (``""`` is the model itself); ``KeyError``
    naming the path and the closest existing one when there is none."""
    if not isinstance(path, str):
        raise TypeError(f"a module path must be a str such as 'layer3.1.conv2', got {type(path).__name__}")
    names = dict(model.named_modules())
    wrapped = getattr(model, "model", None)  # nkd's timm/torchvision adapters wrap the bare model as `.model`
    if path not in names and isinstance(wrapped, nn.Module) and f"model.{path}" in names:
        return names[f"model.{path}"]
    if path not in names:
        raise KeyError(f"{type(model).__name__} has no module {path!r}{did_you_mean(path, [n for n in names if n])}")
    return names[path]


def _first_tensor(x: Any) -> Any:
    """A hook's value: the tensor itself, or the first tensor of a tuple (a module's positional inputs)."""
    if isinstance(x, tuple) and len(x) == 1:
        return x[0]
    return x


class FeatureTaps:
    """Forward hooks on ``paths`` of ``model`` for the duration of a ``with`` block.

    Args:
        model: any ``nn.Module``.
        paths: module paths (``model.named_modules()`` names), each tapped once, optionally with a
            ``:input`` / ``:output`` suffix (see the module docstring).
        kind: what a path without a suffix takes: ``"output"`` (default) or ``"input"`` (the module's
            positional input; a single input is returned as the tensor itself).
        detach: store detached values (for a frozen teacher); default ``False`` keeps the graph.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], kind: Literal["output", "input"] = "output",
                 detach: bool = False):
        if kind not in KINDS:
            raise ValueError(f"kind must be 'output' or 'input', got {kind!r}")
        self.paths = list(dict.fromkeys(paths))
        if not self.paths:
            raise ValueError("paths must name at least one module")
        self.refs = {ref: parse_ref(ref, kind) for ref in self.paths}
        self.modules = {ref: module_at(model, path) for ref, (path, _) in self.refs.items()}  # all checked first
        self.kind, self.detach = kind, detach
        self.values: dict[str, Any] = {}
        self.calls: dict[str, int] = {}
        self._handles: list[Any] = []

    def _store(self, path: str, value: Any) -> None:
        value = _first_tensor(value)
        if self.detach and isinstance(value, Tensor):
            value = value.detach()
        self.values[path] = value
        self.calls[path] = self.calls.get(path, 0) + 1

    def __enter__(self) -> FeatureTaps:
        if self._handles:
            raise RuntimeError("FeatureTaps is already installed")
        self.values.clear()
        self.calls.clear()
        for path, module in self.modules.items():
            if self.refs[path][1] == "output":
                hook = module.register_forward_hook(lambda _m, _i, out, p=path: self._store(p, out))
            else:
                hook = module.register_forward_pre_hook(lambda _m, inp, p=path: self._store(p, inp))
            self._handles.append(hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __getitem__(self, path: str) -> Any:
        if path not in self.values:
            where = "was not tapped" if path not in self.modules else "did not run in the last forward"
            raise KeyError(f"module {path!r} {where}")
        return self.values[path]


_BUILTIN = re.compile(r"@(?:stage(-?\d+)|pooled|weak)")


class FeatureReader:
    """``reader(x) → (logits, {ref: tensor})`` for *feature references*, the names a method or a
    config uses for what it distils:

    * ``@stage<i>`` (``i`` may be negative), ``@pooled``, ``@weak`` — the model's own features
      (``model(x, return_features=True)``: stage outputs, stem first; the pooled pre-logit vector;
      USKD's weak feature), for every nkd model;
    * anything else — a module path with an optional ``:input`` / ``:output`` suffix, read through
      :class:`FeatureTaps` hooks that live only for the forward.
    """

    def __init__(self, model: nn.Module, refs: Sequence[str], detach: bool = False):
        self.model = model
        self.refs = list(dict.fromkeys(refs))
        if not self.refs:
            raise ValueError("refs must name at least one feature")
        self.builtin = {}
        for r in self.refs:
            if not isinstance(r, str):
                raise TypeError(f"a feature reference must be a str such as '@stage2' or 'layer3.1.conv2', got {r!r}")
            if r.startswith("@"):
                m = _BUILTIN.fullmatch(r)
                if m is None:
                    raise ValueError(f"unknown built-in feature {r!r}: expected '@stage<i>', '@pooled' or '@weak'")
                self.builtin[r] = int(m.group(1)) if m.group(1) is not None else r[1:]
        paths = [r for r in self.refs if r not in self.builtin]
        self.taps = FeatureTaps(model, paths, detach=detach) if paths else None

    def _value(self, ref: str, feats: dict[str, Any]) -> Tensor:
        key = self.builtin[ref]
        if isinstance(key, str):
            return feats[key]
        stages = feats["stages"]
        if not -len(stages) <= key < len(stages):
            raise IndexError(f"feature {ref!r}: {type(self.model).__name__} has {len(stages)} stages "
                             f"(@stage0 … @stage{len(stages) - 1})")
        return stages[key]

    def __call__(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.taps if self.taps is not None else contextlib.nullcontext():
            if self.builtin:
                logits, feats = self.model(x, return_features=True)
            else:
                logits, feats = self.model(x), {}
        return logits, {r: self._value(r, feats) if r in self.builtin else self.taps[r] for r in self.refs}

    def shapes(self, input_shape: Sequence[int]) -> dict[str, torch.Size]:
        """Each feature's shape for a probe batch (:func:`probe`)."""
        return {r: v.shape for r, v in probe(self.model, input_shape, lambda x: self(x)[1]).items()}


def probe(model: nn.Module, input_shape: Sequence[int], fn: Any) -> Any:
    """``fn(x)`` for a zero batch of 2 inputs of ``input_shape`` ``[C, H, W]`` on the model's device,
    in eval mode and without gradients — no BatchNorm statistic or random number changes; the
    model's mode is restored."""
    was = model.training
    p = next(iter(model.parameters()), None)
    x = torch.zeros(2, *input_shape, device=p.device if p is not None else "cpu")
    try:
        model.eval()
        with torch.no_grad():
            return fn(x)
    finally:
        model.train(was)


def stage_count(model: nn.Module, input_shape: Sequence[int]) -> int:
    """How many ``@stage<i>`` features ``model`` has (one :func:`probe` forward)."""
    return len(probe(model, input_shape, lambda x: model(x, return_features=True)[1]["stages"]))
