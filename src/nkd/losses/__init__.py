"""Distillation losses: NKD, USKD, KD, DKD and the self-KD baselines.

Every loss takes logits ``[..., C]``, hard labels ``[...]`` (int64) or soft labels ``[..., C]``,
computes in float32 even under autocast, validates its input, and supports
``reduction in {"mean", "sum", "none"}``. ``LOSSES`` maps a name to its functional form.
"""

from __future__ import annotations

from collections.abc import Callable

from ._common import value_checks
from .dkd import DKDLoss, dkd_loss
from .fused import FusedLinearKDLoss, FusedLinearNKDLoss, fused_linear_kd_loss, fused_linear_nkd_loss
from .kd import KDLoss, kd_loss
from .nkd import NKDLoss, nkd_loss
from .selfkd import (
    LabelSmoothingLoss,
    TfKDLoss,
    ZipfLSLoss,
    label_smoothing_loss,
    tfkd_loss,
    zipf_ls_loss,
)
from .uskd import RANK_MODES, USKDLoss, uskd_loss

LOSSES: dict[str, Callable] = {
    "nkd": nkd_loss,
    "uskd": uskd_loss,
    "kd": kd_loss,
    "dkd": dkd_loss,
    "ls": label_smoothing_loss,
    "zipf_ls": zipf_ls_loss,
    "tfkd": tfkd_loss,
}

__all__ = [
    "LOSSES",
    "value_checks",
    "RANK_MODES",
    "nkd_loss",
    "uskd_loss",
    "kd_loss",
    "dkd_loss",
    "label_smoothing_loss",
    "zipf_ls_loss",
    "tfkd_loss",
    "NKDLoss",
    "USKDLoss",
    "KDLoss",
    "DKDLoss",
    "LabelSmoothingLoss",
    "ZipfLSLoss",
    "TfKDLoss",
    "fused_linear_nkd_loss",
    "fused_linear_kd_loss",
    "FusedLinearNKDLoss",
    "FusedLinearKDLoss",
]
