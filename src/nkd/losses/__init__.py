"""Distillation losses: NKD, USKD, KD, DKD, the self-KD baselines and the logit baselines DIST and
logit-standardized (z-score) KD/DKD.

Every loss takes logits ``[..., C]``, hard labels ``[...]`` (int64) or soft labels ``[..., C]``,
computes in float32 even under autocast, validates its input, and supports
``reduction in {"mean", "sum", "none"}`` — except DIST, whose intra-class term couples the rows of a
batch (``"mean"``/``"sum"`` only). Each loss is one spec (:mod:`nkd.losses.spec`); ``LOSS_SPECS``
maps its name to the spec and ``LOSSES`` to the function derived from it.
"""

from __future__ import annotations

from ._common import value_checks
from .dist import DISTLoss, dist_loss
from .dkd import DKDLoss, dkd_loss
from .fused import (
    FusedLinearDKDLoss,
    FusedLinearJSDLoss,
    FusedLinearKDLoss,
    FusedLinearNKDLoss,
    fused_linear_dkd_loss,
    fused_linear_jsd_loss,
    fused_linear_kd_loss,
    fused_linear_nkd_loss,
)
from .fused_uskd import FusedLinearUSKDLoss, fused_linear_uskd_loss
from .jsd import JSDLoss, jsd_loss
from .kd import KDLoss, kd_loss
from .logit_std import DKDZScoreLoss, KDZScoreLoss, dkd_zscore_loss, kd_zscore_loss, standardize_logits
from .nkd import NKDLoss, nkd_loss
from .selfkd import (
    LabelSmoothingLoss,
    TfKDLoss,
    ZipfLSLoss,
    label_smoothing_loss,
    tfkd_loss,
    zipf_ls_loss,
)
from .spec import LOSS_SPECS, LOSSES, LossSpec, register_loss
from .uskd import RANK_MODES, USKDLoss, uskd_loss

__all__ = [
    "LOSSES",
    "LOSS_SPECS",
    "LossSpec",
    "register_loss",
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
    "dist_loss",
    "kd_zscore_loss",
    "dkd_zscore_loss",
    "standardize_logits",
    "DISTLoss",
    "KDZScoreLoss",
    "DKDZScoreLoss",
    "fused_linear_nkd_loss",
    "fused_linear_kd_loss",
    "FusedLinearNKDLoss",
    "FusedLinearKDLoss",
    "fused_linear_dkd_loss",
    "FusedLinearDKDLoss",
    "jsd_loss",
    "JSDLoss",
    "fused_linear_jsd_loss",
    "FusedLinearJSDLoss",
    "fused_linear_uskd_loss",
    "FusedLinearUSKDLoss",
]
