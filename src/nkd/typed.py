"""Typed dataclasses from YAML-like mappings, with every problem listed by its dotted path.

Used by the experiment config (:mod:`nkd.config`) and by each method's parameter dataclass
(:mod:`nkd.methods`), so neither imports the other's builder.

* :func:`load_yaml` reads YAML with every float spelling Python's ``float()`` accepts
  (``1e-3``, ``5E-2``, ``1.0e8``, ``.5``, ``1_000.5``) — PyYAML's YAML 1.1 rules read ``1e-3``
  as a *string*.
* :func:`build_dataclass` instantiates a dataclass from a mapping and records, instead of
  raising, each unknown key (with a did-you-mean), wrong type, non-finite float, and each
  problem a dataclass's own ``__post_init__`` reports (raise :class:`Problems`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

import yaml

from .registry import did_you_mean


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


class ConfigError(ValueError):
    """Every problem found in a config, one per line, each with its dotted path."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


class Problems(ValueError):
    """Raised by a dataclass's ``__post_init__`` with one message per bad field, each starting
    with the field name (``"epsilon must lie in [0, 1), got 1.0"``)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def collect(*checks: tuple[typing.Callable[..., None], Any]) -> None:
    """Run ``check(name, value, ...)`` for each ``(check, name, value, ...)``; raise :class:`Problems`
    listing every ``ValueError`` message (not just the first; one per name)."""
    found, failed = [], set()
    for check, name, *args in checks:
        if name in failed:
            continue
        try:
            check(name, *args)
        except ValueError as e:
            found.append(str(e))
            failed.add(name)
    if found:
        raise Problems(found)


# ----------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also resolves Python float spellings (exponent without a dot or sign)."""


_FLOAT = re.compile(
    r"""^[-+]?(?:
        \d(?:_?\d)*\.(?:\d(?:_?\d)*)?(?:[eE][-+]?\d(?:_?\d)*)?   # 1.  1.5  1.5e3
      | \.\d(?:_?\d)*(?:[eE][-+]?\d(?:_?\d)*)?                  # .5  .5e-3
      | \d(?:_?\d)*[eE][-+]?\d(?:_?\d)*                         # 1e-3  5E2
    )$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:inf|infinity|nan)$", re.I), list("-+iInN")
)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node)
    try:
        return float(text.replace("_", ""))
    except ValueError:  # YAML's own spellings: .inf, -.Inf, .NaN
        return yaml.SafeLoader.construct_yaml_float(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names one key twice (YAML forbids it; PyYAML keeps the last silently)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are meant to be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: PyYAML reports it itself
            continue
        if first is not None:
            where = f"lines {first} and {line}" if first != line else f"twice on line {line}"
            raise DuplicateKeyError(f"duplicate key {key!r} ({where}): each key may appear once in a mapping")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor("tag:yaml.org,2002:map", lambda loader, node: _dict(loader, node))


def _dict(loader: yaml.SafeLoader, node: yaml.MappingNode):
    data: dict = {}
    yield data
    data.update(_construct_mapping(loader, node, deep=True))


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with Python's float spellings (see module docstring)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ----------------------------------------------------------------------------- dataclasses
def type_ok(value: Any, tp: Any) -> bool:
    """Whether ``value`` (as read from YAML) fits the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def dataclass_in(tp: Any) -> type | None:
    """The dataclass inside an annotation (``X`` or ``X | None``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, list) and any(_non_finite(v) for v in value)


def _field_problem(path: str, message: str, names: set[str]) -> str:
    """``"epsilon must …"`` → ``"<path>epsilon: must …"`` when the message starts with a field name."""
    head, _, rest = message.partition(" ")
    return f"{path}{head}: {rest}" if head in names and rest else f"{path.rstrip('.') or 'config'}: {message}"


def build_dataclass(cls: type, data: Any, path: str, problems: list[str]):
    """Instantiate ``cls`` from a mapping, recording every unknown key, type error, non-finite
    float and ``__post_init__`` problem in ``problems`` (defaults stand in for broken fields)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            problems.append(f"{path}{key}: unknown key{did_you_mean(str(key), list(names))}; allowed: "
                            f"{', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp = data[f.name], hints[f.name]
        sub = dataclass_in(tp)
        if sub is not None and (value is not None or not type_ok(None, tp)):
            kwargs[f.name] = build_dataclass(sub, value, f"{path}{f.name}.", problems)
        elif not type_ok(value, tp):
            problems.append(f"{path}{f.name}: expected {describe(tp)}, got {value!r}")
        elif _non_finite(value):
            problems.append(f"{path}{f.name}: must be finite, got {value!r}")
        else:
            kwargs[f.name] = float(value) if tp is float and isinstance(value, int) else value
    try:
        return cls(**kwargs)
    except Problems as e:
        problems.extend(_field_problem(path, p, names) for p in e.problems)
    except ValueError as e:
        problems.append(_field_problem(path, str(e), names))
    return _unchecked(cls, kwargs)


def _unchecked(cls: type, kwargs: dict) -> Any:
    """An instance with ``kwargs`` set but ``__post_init__`` skipped (its problems are recorded)."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            value = kwargs[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()  # type: ignore[misc]
        object.__setattr__(obj, f.name, value)
    return obj
