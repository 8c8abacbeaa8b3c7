"""Training methods: a registry of method classes (see :mod:`nkd.methods.base` for the contract).

Teacher methods: ``ce kd dkd nkd`` (:mod:`nkd.methods.teacher`); self-KD: ``ls zipf_ls tfkd uskd``
(:mod:`nkd.methods.selfkd`); logit baselines: ``dist kd_zscore dkd_zscore`` (:mod:`nkd.methods.logit`).
"""

from . import logit, selfkd, teacher  # noqa: F401 - importing registers the methods
from .base import (
    METHODS,
    Method,
    Params,
    Teacher,
    Trainable,
    build_method,
    ce,
    method_params,
    register,
    validate_method,
)

__all__ = ["METHODS", "Method", "Params", "Teacher", "Trainable", "build_method", "ce", "method_params", "register",
           "validate_method"]
