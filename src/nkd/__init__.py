"""nkd: Normalized Knowledge Distillation (NKD) and Universal Self-Knowledge Distillation (USKD)."""

__version__ = "0.1.0"
