"""``python -m nkd.methods`` prints the method table of docs/methods.md (derived from the registries)."""

from .base import methods_table

print(methods_table(), end="")
