"""Modern logit baselines with a frozen teacher (formulas and sources: ``docs/baselines.md``).
Objectives (``e`` the 0-based epoch):

* ``dist``: ``w_ce·CE + w_kd·DIST`` — the authors' weights are ``w_ce = 1``, ``w_kd = 2`` with
  ``β = γ = 1`` inside DIST. Under DDP the intra-class term is computed per process over the
  local batch (not gathered), as in the authors' trainer.
* ``kd_zscore``: ``w_ce·CE + w_kd·KD_z`` (KD on z-scored logits at base temperature τ).
* ``dkd_zscore``: ``w_ce·CE + min((e+1)/W, 1)·w_kd·DKD_z(α, β, τ)`` — the authors' code multiplies
  DKD's α and β by its ``--kd-weight``, which is ``w_kd`` here.
"""

from __future__ import annotations

from ..losses.dist import DIST
from ..losses.logit_std import DKDZScore, KDZScore
from .base import ce_weight, kd_weight, loss_method, warmup_epochs
from .teacher import RampedMethod

DISTMethod = loss_method("dist", DIST, key="dist", objective="ce_weight·CE + kd_weight·DIST", ce_weight=ce_weight(1.0),
                         kd_weight=kd_weight(2.0, "w_kd ≥ 0; 2 = the authors' kd_loss_weight in every published DIST config"))
KDZScoreMethod = loss_method("kd_zscore", KDZScore, key="kd", objective="ce_weight·CE + kd_weight·KD_z",
                             ce_weight=ce_weight(0.1), kd_weight=kd_weight(9.0))
DKDZScoreMethod = loss_method("dkd_zscore", DKDZScore, key="dkd", base=RampedMethod,
                              objective="ce_weight·CE + min((e+1)/warmup_epochs, 1)·kd_weight·DKD_z",
                              kd_weight=kd_weight(9.0, "w_kd ≥ 0; multiplies α and β, as the authors' --kd-weight"),
                              ce_weight=ce_weight(1.0), warmup_epochs=warmup_epochs())
