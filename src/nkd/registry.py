"""One registry style for methods, models and losses: a name → object mapping with a decorator.

>>> FRUITS = Registry("fruit")
>>> @FRUITS.register("apple")
... def apple(): ...
>>> FRUITS.lookup("aple")
Traceback (most recent call last):
KeyError: "unknown fruit 'aple' (did you mean 'apple'?); choose one of: apple"
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(str(word), sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(dict):
    """A ``dict`` of named entries of one ``kind`` (used in error messages).

    ``@REG.register("name")`` adds the decorated object (and returns it unchanged);
    ``REG.add(name, obj)`` adds one directly; ``REG.lookup(name)`` returns it or raises ``KeyError`` naming the
    kind, the closest known name and every known name. A name may be registered once.
    """

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, obj: Any) -> Any:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def unknown(self, name: str) -> str:
        """The message for an unknown ``name``."""
        return f"unknown {self.kind} {name!r}{did_you_mean(name, list(self))}; choose one of: {', '.join(sorted(self))}"

    def lookup(self, name: str) -> Any:
        if name not in self:
            raise KeyError(self.unknown(name))
        return self[name]
