"""Any module's output — or input — by its module path (``layer3.1.conv2``), through forward hooks
that are installed for a ``with`` block and removed on exit, on any ``nn.Module`` (the CRD zoo,
timm and torchvision models alike), without editing the model.

>>> with FeatureTaps(model, ["layer2", "layer3.0.conv1"], kind="output") as taps:
...     logits = model(x)
>>> taps["layer2"].shape

For nkd's timm and torchvision adapters, paths may be given as in the bare model (``layer3.1.conv2``
for ``model.layer3.1.conv2``). A path that does not exist is a ``KeyError`` naming it, with the closest existing path. A tapped
module that runs more than once in a forward keeps its last call's value (``taps.calls`` counts).
Hooks are removed on exit even when the forward raises, so a model never keeps a stray hook.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from torch import Tensor, nn

from ..registry import did_you_mean

__all__ = ["FeatureTaps", "module_at"]


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
        paths: module paths (``model.named_modules()`` names), each tapped once.
        kind: ``"output"`` (default) or ``"input"`` (the module's positional input; a single input
            is returned as the tensor itself).
        detach: store detached values (for a frozen teacher); default ``False`` keeps the graph.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], kind: Literal["output", "input"] = "output",
                 detach: bool = False):
        if kind not in ("output", "input"):
            raise ValueError(f"kind must be 'output' or 'input', got {kind!r}")
        self.paths = list(dict.fromkeys(paths))
        if not self.paths:
            raise ValueError("paths must name at least one module")
        self.modules = {p: module_at(model, p) for p in self.paths}  # every path checked before any hook
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
            if self.kind == "output":
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
