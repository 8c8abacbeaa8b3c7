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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (
    check_logits,
    check_positive,
    check_range,
    check_reduction,
    compute_dtype,
    kl_terms,
    log_softmax_without,
    no_autocast,
    parse_rows,
    reduce_rows,
    zipf_labels,
)

__all__ = [
    "label_smoothing_loss",
    "zipf_ls_loss",
    "tfkd_loss",
    "LabelSmoothingLoss",
    "ZipfLSLoss",
    "TfKDLoss",
]


def _label_rows(rows) -> Tensor:
    """Rows of the label distribution ``y`` ``[M, C]`` (one-hot for hard labels)."""
    if rows.soft is not None:
        return rows.soft
    y = torch.zeros_like(rows.logits, dtype=compute_dtype(rows.logits.dtype))
    return y.scatter_(1, rows.index[:, None], 1.0)


def label_smoothing_loss(
    logits: Tensor, target: Tensor, *, epsilon: float = 0.1, reduction: str = "mean", ignore_index: int = -100
) -> Tensor:
    """Label-smoothed cross-entropy ``−Σ_i q_i·log softmax(z)_i`` with ``q = (1−ε)·y + ε/C``.

    ``y`` is the one-hot (hard label) or soft label row; the convention is that of
    ``torch.nn.CrossEntropyLoss(label_smoothing=ε)``. Method ``ls``: this loss replaces CE.
    Its floor is ``H(q)`` (0.78 for C = 100, ε = 0.1), not 0.

    Args:
        logits: ``[..., C]`` floating logits, ``C >= 2``.
        target: int64 labels ``[...]`` (values in ``[0, C)`` or ``ignore_index``) or soft labels
            ``[..., C]``.
        epsilon: ε in ``[0, 1)``. Default 0.1 = the published setting (Szegedy et al., 2016).
        reduction: ``"mean"`` (default; over non-ignored rows), ``"sum"`` or ``"none"``
            (per-row values, shape ``[...]``).
        ignore_index: hard-label value whose rows are left out (default -100).

    Returns:
        The loss, float32 (float64 for float64 input).
    """
    check_logits("logits", logits)
    check_range("epsilon", epsilon, 0.0, 1.0)
    check_reduction(reduction)
    rows = parse_rows(logits, target, ignore_index)
    with no_autocast(logits):
        log_p = F.log_softmax(rows.logits.to(compute_dtype(logits.dtype)), -1)
        q = _label_rows(rows).mul(1 - epsilon).add_(epsilon / rows.num_classes)
        per_row = -(q * log_p).sum(-1)
        per_row = torch.where(rows.valid, per_row, torch.zeros_like(per_row))
        return reduce_rows(per_row, rows.valid, reduction, rows.lead_shape)


def zipf_ls_loss(
    logits: Tensor,
    target: Tensor,
    *,
    rank_logits: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Zipf's label smoothing term ``KL(ẑ ‖ softmax_{j≠t}(z))`` per row (CE not included).

    The ``C − 1`` non-target classes are ranked by the detached score ``rank_logits`` (default:
    the logits themselves), descending, ties to the lower class index; rank ``r = 1..C−1`` gets
    ``1/r``, normalized to ``ẑ``. ``softmax_{j≠t}`` is the softmax over the non-target classes.
    Method ``zipf_ls``: ``ce_weight·CE + weight·ZipfLS`` (the official CIFAR-100 runs use weight
    0.1 with dense ranking).

    Args:
        logits: ``[..., C]`` floating logits, ``C >= 2``.
        target: int64 labels ``[...]`` or soft labels ``[..., C]`` (``t = argmax``).
        rank_logits: optional ``[..., C]`` scores that define the ranking (e.g. the per-location
            argmax votes of the paper's dense variant); default ``None`` = rank by ``logits``.
            Always detached.
        reduction: ``"mean"`` (default; over non-ignored rows), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out (default -100).

    Returns:
        The KL term, float32 (float64 for float64 input); floor 0.
    """
    check_logits("logits", logits)
    check_reduction(reduction)
    if rank_logits is not None and rank_logits.shape != logits.shape:
        raise ValueError(f"rank_logits must have the shape of logits {tuple(logits.shape)}, got {tuple(rank_logits.shape)}")
    rows = parse_rows(logits, target, ignore_index)
    dtype = compute_dtype(logits.dtype)
    col = rows.index[:, None]
    with no_autocast(logits):
        z = rows.logits.to(dtype)
        score = (z if rank_logits is None else rank_logits.reshape(z.shape)).detach().to(dtype)
        # the target takes the last slot so the non-targets get ranks 1..C-1
        zhat = zipf_labels(score.scatter(1, col, float("-inf")), col)
        log_nt, _ = log_softmax_without(z, col)
        per_row = kl_terms(zhat.log(), log_nt).sum(-1)
        per_row = torch.where(rows.valid, per_row, torch.zeros_like(per_row))
        return reduce_rows(per_row, rows.valid, reduction, rows.lead_shape)


def tfkd_loss(
    logits: Tensor,
    target: Tensor,
    *,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """Tf-KD_reg: ``KL(softmax(p^d/τ) ‖ softmax(z))`` summed over classes per row.

    The virtual teacher is ``p^d = a·y + (1−a)·(1−y)/(C−1)`` with ``a = correct_prob`` and ``y``
    the one-hot (or soft) label; it is a constant. The student is not softened (no ``τ²``).
    Method ``tfkd``: ``(1−alpha)·CE + alpha·weight·TfKD``. The reference code averages the KL
    over all ``N·C`` entries and multiplies by ``multiplier``: ``weight = multiplier / C``.

    Args:
        logits: ``[..., C]`` floating logits, ``C >= 2``.
        target: int64 labels ``[...]`` or soft labels ``[..., C]``.
        correct_prob: ``a`` in ``(0, 1)``, the virtual teacher's target probability. Default 0.99
            (fixed in the reference code).
        temperature: τ > 0 applied to ``p^d``. Default 20.0 = the CIFAR-100 ResNet18 setting
            (other reference settings: 40 for MobileNetV2, 10 for ShuffleNetV2).
        reduction: ``"mean"`` (default; over non-ignored rows), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out (default -100).

    Returns:
        The KL term, float32 (float64 for float64 input); floor 0.
    """
    check_logits("logits", logits)
    check_range("correct_prob", correct_prob, 0.0, 1.0, lo_open=True)
    check_positive("temperature", temperature)
    check_reduction(reduction)
    rows = parse_rows(logits, target, ignore_index)
    c = rows.num_classes
    with no_autocast(logits):
        log_s = F.log_softmax(rows.logits.to(compute_dtype(logits.dtype)), -1)
        y = _label_rows(rows)
        virtual = correct_prob * y + (1 - correct_prob) / (c - 1) * (1 - y)
        log_t = F.log_softmax(virtual / temperature, -1)
        per_row = kl_terms(log_t, log_s).sum(-1)
        per_row = torch.where(rows.valid, per_row, torch.zeros_like(per_row))
        return reduce_rows(per_row, rows.valid, reduction, rows.lead_shape)


class LabelSmoothingLoss(nn.Module):
    """Module form of :func:`label_smoothing_loss`: CE with ``q = (1−ε)·y + ε/C``.

    Args:
        epsilon: ε in ``[0, 1)`` (default 0.1, the published setting).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out (default -100).
    """

    def __init__(self, epsilon: float = 0.1, reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        self.kwargs = dict(epsilon=epsilon, reduction=reduction, ignore_index=ignore_index)
        label_smoothing_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), **self.kwargs)  # validate

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Label-smoothed CE of ``logits`` ``[..., C]`` against ``target`` (int64 ``[...]`` or
        soft ``[..., C]``); a scalar, or ``[...]`` for ``reduction="none"``."""
        return label_smoothing_loss(logits, target, **self.kwargs)


class ZipfLSLoss(nn.Module):
    """Module form of :func:`zipf_ls_loss`: ``KL(ẑ ‖ softmax_{j≠t}(z))`` with Zipf weights ``1/r``.

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out (default -100).
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        check_reduction(reduction)
        self.kwargs = dict(reduction=reduction, ignore_index=ignore_index)

    def forward(self, logits: Tensor, target: Tensor, rank_logits: Tensor | None = None) -> Tensor:
        """Zipf LS term of ``logits`` ``[..., C]`` for ``target`` (int64 ``[...]`` or soft
        ``[..., C]``); ``rank_logits`` ``[..., C]`` optionally replaces the logits as the ranking
        score. Returns a scalar, or ``[...]`` for ``reduction="none"``."""
        return zipf_ls_loss(logits, target, rank_logits=rank_logits, **self.kwargs)


class TfKDLoss(nn.Module):
    """Module form of :func:`tfkd_loss`: ``KL(softmax(p^d/τ) ‖ softmax(z))`` with a virtual teacher.

    Args:
        correct_prob: virtual teacher's target probability in ``(0, 1)`` (default 0.99).
        temperature: τ > 0 (default 20.0 = CIFAR-100 ResNet18 setting).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out (default -100).
    """

    def __init__(self, correct_prob: float = 0.99, temperature: float = 20.0, reduction: str = "mean",
                 ignore_index: int = -100):
        super().__init__()
        self.kwargs = dict(correct_prob=correct_prob, temperature=temperature, reduction=reduction,
                           ignore_index=ignore_index)
        tfkd_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), **self.kwargs)  # validate

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Tf-KD_reg term of ``logits`` ``[..., C]`` for ``target`` (int64 ``[...]`` or soft
        ``[..., C]``); a scalar, or ``[...]`` for ``reduction="none"``."""
        return tfkd_loss(logits, target, **self.kwargs)
