r"""Self-KD baselines compared with USKD: label smoothing, Zipf's label smoothing, Tf-KD_reg.

* Label smoothing (Szegedy et al., 2016), ``ε = 0.1``: cross-entropy with
  ``q = (1-ε)·y + ε/C`` (the convention of ``torch.nn.CrossEntropyLoss(label_smoothing=ε)``).
  It replaces CE in the objective.
* Zipf's label smoothing (Liang et al., ECCV 2022), instance-wise form: rank the non-target
  classes by the model's own detached logits (``rank_logits``, default ``logits``), give rank
  ``r = 1..C-1`` the weight ``1/r``, normalize to ``ẑ`` and add
  ``KL(ẑ ‖ softmax_{j≠t}(z))`` to CE. (The paper's dense variant ranks by per-location
  argmax votes of the last feature map; pass those scores as ``rank_logits``.)
* Tf-KD_reg (Yuan et al., CVPR 2020): a virtual teacher ``p^d = a·y + (1-a)(1-y)/(C-1)``
  (``a`` = ``correct_prob``), softened as ``softmax(p^d/τ)``; the term is
  ``KL(softmax(p^d/τ) ‖ softmax(z))`` summed over classes. The reference code averages KL over
  all ``N·C`` elements and multiplies by ``multiplier``; that equals this per-row sum times
  ``multiplier / C`` — set the method weight accordingly.

Published settings: LS ε = 0.1; Zipf's LS weight 0.1 on CIFAR-100 (official code, dense ranking);
Tf-KD_reg on CIFAR-100 ResNet18: ``alpha=0.1, temperature=20, multiplier=100`` (weight 1 at C = 100).
Sources: docs/methods.md, sections Label smoothing, Zipf's label smoothing, Tf-KD_reg.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import Rows, compute_dtype, kl_terms, log_softmax_without, zipf_labels
from .spec import Input, LossSpec, RowOut, hp, in_range, positive, register_loss

__all__ = [
    "label_smoothing_loss",
    "zipf_ls_loss",
    "tfkd_loss",
    "LabelSmoothingLoss",
    "ZipfLSLoss",
    "TfKDLoss",
    "LabelSmoothing",
    "ZipfLS",
    "TfKD",
]

_LOGITS = (Input("logits", "``[..., C]`` floating logits, ``C >= 2``"),)
_TARGET = "int64 labels ``[...]`` (values in ``[0, C)`` or ``ignore_index``) or soft labels ``[..., C]``"


def _label_rows(rows: Rows) -> Tensor:
    """Rows of the label distribution ``y`` ``[M, C]`` (one-hot for hard labels)."""
    if rows.soft is not None:
        return rows.soft
    y = torch.zeros_like(rows.logits, dtype=compute_dtype(rows.logits.dtype))
    return y.scatter_(1, rows.index[:, None], 1.0)


def _valid_only(per_row: Tensor, r: Rows) -> Tensor:
    return torch.where(r.valid, per_row, torch.zeros_like(per_row))


@register_loss("ls", function="label_smoothing_loss", module="LabelSmoothingLoss")
@dataclass
class LabelSmoothing(LossSpec):
    """Label-smoothed cross-entropy ``−Σ_i q_i·log softmax(z)_i`` with ``q = (1−ε)·y + ε/C``.

    ``y`` is the one-hot (hard label) or soft label row; the convention is that of
    ``torch.nn.CrossEntropyLoss(label_smoothing=ε)``. Method ``ls``: this loss replaces CE.
    Its floor is ``H(q)`` (0.78 for C = 100, ε = 0.1), not 0.
    """

    title = "Label-smoothed cross-entropy"
    inputs = _LOGITS
    target_doc = _TARGET
    epsilon: float = hp(0.1, in_range(0.0, 1.0), "ε in ``[0, 1)``; 0.1 = the published setting (Szegedy et al., 2016)")

    def rows(self, z, u, r, need_grad):
        log_p = F.log_softmax(z, -1)
        q = _label_rows(r).mul(1 - self.epsilon).add_(self.epsilon / z.shape[-1])
        return RowOut(_valid_only(-(q * log_p).sum(-1), r))


@register_loss("zipf_ls", function="zipf_ls_loss", module="ZipfLSLoss")
@dataclass
class ZipfLS(LossSpec):
    """Zipf's label smoothing term ``KL(ẑ ‖ softmax_{j≠t}(z))`` per row (CE not included).

    The ``C − 1`` non-target classes are ranked by the detached score ``rank_logits`` (default:
    the logits themselves), descending, ties to the lower class index; rank ``r = 1..C−1`` gets
    ``1/r``, normalized to ``ẑ``. ``softmax_{j≠t}`` is the softmax over the non-target classes.
    Method ``zipf_ls``: ``ce_weight·CE + weight·ZipfLS`` (the official CIFAR-100 runs use weight
    0.1 with dense ranking). Floor 0.
    """

    title = "Zipf's label smoothing term"
    inputs = _LOGITS
    target_doc = _TARGET + " (``t = argmax``)"
    extra = (Input("rank_logits", "optional ``[..., C]`` scores that define the ranking (e.g. the per-location argmax "
                                  "votes of the paper's dense variant); ``None`` = rank by ``logits``; always detached",
                   True),)

    def rows(self, z, u, r, need_grad, rank_logits: Tensor | None = None):
        col = r.index[:, None]
        score = (z if rank_logits is None else rank_logits).detach()
        zhat = zipf_labels(score.scatter(1, col, float("-inf")), col)
        log_nt, _ = log_softmax_without(z, col)
        return RowOut(_valid_only(kl_terms(zhat.log(), log_nt).sum(-1), r))


@register_loss("tfkd", function="tfkd_loss", module="TfKDLoss")
@dataclass
class TfKD(LossSpec):
    """Tf-KD_reg: ``KL(softmax(p^d/τ) ‖ softmax(z))`` summed over classes per row.

    The virtual teacher is ``p^d = a·y + (1−a)·(1−y)/(C−1)`` with ``a = correct_prob`` and ``y``
    the one-hot (or soft) label; it is a constant. The student is not softened (no ``τ²``).
    Method ``tfkd``: ``(1−alpha)·CE + alpha·weight·TfKD``. The reference code averages the KL
    over all ``N·C`` entries and multiplies by ``multiplier``: ``weight = multiplier / C``. Floor 0.
    """

    title = "Tf-KD_reg term"
    inputs = _LOGITS
    target_doc = _TARGET
    correct_prob: float = hp(0.99, in_range(0.0, 1.0, lo_open=True),
                             "``a`` in ``(0, 1)``, the virtual teacher's target probability (0.99, fixed in the "
                             "reference code)")
    temperature: float = hp(20.0, positive, "τ > 0 applied to ``p^d``; 20 = the CIFAR-100 ResNet18 setting (40 for "
                                            "MobileNetV2, 10 for ShuffleNetV2)")

    def rows(self, z, u, r, need_grad):
        c, a = z.shape[-1], self.correct_prob
        log_s = F.log_softmax(z, -1)
        y = _label_rows(r)
        virtual = a * y + (1 - a) / (c - 1) * (1 - y)
        log_t = F.log_softmax(virtual / self.temperature, -1)
        return RowOut(_valid_only(kl_terms(log_t, log_s).sum(-1), r))


label_smoothing_loss = LabelSmoothing.function
zipf_ls_loss = ZipfLS.function
tfkd_loss = TfKD.function
LabelSmoothingLoss = LabelSmoothing.module
ZipfLSLoss = ZipfLS.module
TfKDLoss = TfKD.module
