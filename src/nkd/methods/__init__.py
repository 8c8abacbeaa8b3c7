"""Training methods: a registry of method classes (see :mod:`nkd.methods.base` for the contract).

Teacher methods: ``ce kd dkd nkd`` (:mod:`nkd.methods.teacher`); self-KD: ``ls zipf_ls tfkd uskd``
(:mod:`nkd.methods.selfkd`); logit baselines: ``dist kd_zscore dkd_zscore`` (:mod:`nkd.methods.logit`);
feature baselines: ``fitnet at rkd reviewkd`` (:mod:`nkd.methods.feature`).
"""

from . import teacher  # noqa: F401, I001 - importing registers the methods; their order is the report's row order
from . import logit  # noqa: F401, I001
from . import selfkd  # noqa: F401, I001
from . import feature  # noqa: F401, I001
from .base import (
    METHODS,
    Method,
    Params,
    Sample,
    Setup,
    Teacher,
    Trainable,
    build_method,
    ce,
    method_params,
    register,
    validate_method,
)

__all__ = ["METHODS", "Method", "Params", "Sample", "Setup", "Teacher", "Trainable", "build_method", "ce", "method_params", "register",
           "validate_method"]
