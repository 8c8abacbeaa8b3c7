r"""DIST: distillation by inter- and intra-class correlation (Huang et al., NeurIPS 2022).

Rows ``r = 1..M`` of the batch (logits ``[..., C]`` flattened to ``[M, C]``; only the rows not
marked by ``ignore_index``), temperature τ:

.. math::

    Y^s = \mathrm{softmax}(z/\tau),\qquad Y^t = \mathrm{softmax}(u/\tau)\qquad [M, C]

    \rho(a, b) = \frac{\langle a - \bar a,\ b - \bar b\rangle}
                      {\lVert a - \bar a\rVert\,\lVert b - \bar b\rVert + \epsilon},
                 \qquad \epsilon = 10^{-8}

    L_{inter} = \frac{1}{M}\sum_r \bigl(1 - \rho(Y^s_{r,:},\ Y^t_{r,:})\bigr)
        \quad\text{(each row, over the classes)}

    L_{intra} = \frac{1}{C}\sum_j \bigl(1 - \rho(Y^s_{:,j},\ Y^t_{:,j})\bigr)
        \quad\text{(each class, over the rows of the batch)}

    \mathrm{DIST} = \tau^2\,(\beta\,L_{inter} + \gamma\,L_{intra})

ρ is the Pearson correlation written as the cosine similarity of mean-centred vectors with
``ε`` added to the product of the norms — the authors' code (``hunto/image_classification_sota``,
``lib/models/losses/dist_kd.py``). Their first release (commit ``2bc4832``) had no temperature;
the version that added CIFAR-100 (``d9662f7``) divides by τ and multiplies each term by τ²,
which is the form above (τ = 1 gives the first release exactly). The teacher is treated as a
constant. The objective in their code is ``w_ce·CE + w_kd·DIST`` with ``w_ce = 1``, ``w_kd = 2``.

**The intra-class term couples the rows of the batch**: it correlates each class's column over
the rows, so the loss is not a sum of per-row values. Consequences:

* ``reduction="mean"``: the value above. ``reduction="sum"``: ``M · DIST`` (the mean times the
  number of rows, i.e. ``τ²(β Σ_r (1-ρ_r) + γ M L_intra)``), so that summing over micro-batches and
  dividing by the total row count weights each micro-batch's DIST by its rows.
  ``reduction="none"`` is refused (ValueError): there is no per-row value.
* Rows whose hard label is ``ignore_index`` (needs ``target``) are left out of **both** terms:
  out of the row mean of ``L_inter`` and out of the column statistics of ``L_intra``. No valid row
  gives 0. A single valid row gives ``L_intra = 1`` exactly (a centred column of one entry is 0,
  so ρ = 0) with zero gradient — the authors' formula with its ε.
* Under DDP each process computes ``L_intra`` over its **local** batch (no all-gather), as the
  authors' trainer does (ImageNet: 32 images per GPU); a different split of the global batch
  changes the value.
* The value depends on the batch composition: shuffling rows does not change it, but splitting
  one batch into two does.

Computed in float32 under autocast (float64 stays float64); gradients come back in the input
dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import (
    check_ignore_index,
    check_nonnegative,
    check_pair,
    check_positive,
    compute_dtype,
    no_autocast,
    parse_rows,
)

__all__ = ["dist_loss", "DISTLoss", "DIST_REDUCTIONS", "DIST_EPS"]

DIST_REDUCTIONS = ("mean", "sum")
DIST_EPS = 1e-8  # the authors' ε in the cosine denominator


def _check_dist_reduction(reduction: str) -> None:
    if reduction == "none":
        raise ValueError(
            "reduction='none' is not supported by DIST: its intra-class term correlates each class over "
            "the rows of the batch, so there is no per-row loss; use reduction='mean' or 'sum'"
        )
    if reduction not in DIST_REDUCTIONS:
        raise ValueError(f"reduction must be one of {DIST_REDUCTIONS} for DIST, got {reduction!r}")


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """``⟨a_c, b_c⟩ / (‖a_c‖·‖b_c‖ + ε)`` along ``dim``, where ``a_c``, ``b_c`` are already centred."""
    num = (a * b).sum(dim)
    den = torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim) + DIST_EPS
    return num / den


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    r"""DIST: ``τ²(β·L_inter + γ·L_intra)`` over the batch, without CE.

    .. math::

        Y^s = \mathrm{softmax}(z/\tau),\ Y^t = \mathrm{softmax}(u/\tau),\quad
        \rho(a, b) = \frac{\langle a-\bar a,\, b-\bar b\rangle}{\lVert a-\bar a\rVert\lVert b-\bar b\rVert + 10^{-8}}

        L_{inter} = 1 - \tfrac{1}{M}\textstyle\sum_r \rho(Y^s_{r,:}, Y^t_{r,:}),\quad
        L_{intra} = 1 - \tfrac{1}{C}\textstyle\sum_j \rho(Y^s_{:,j}, Y^t_{:,j})

    over the ``M`` non-ignored rows. ``L_intra`` correlates each class over the rows, so the loss
    couples the batch: there is no per-row value (``reduction="none"`` raises), and under DDP it is
    computed over each process's local batch. Training objective (method ``dist``):
    ``ce_weight·CE + kd_weight·DIST`` (authors: 1 and 2).

    Args:
        student_logits, teacher_logits: ``[..., C]`` of equal shape, ``C >= 2``; leading dims are
            flattened into the rows that ``L_intra`` correlates over. The teacher is detached.
        target: optional int64 labels ``[...]`` (only used to leave out ``ignore_index`` rows) or
            soft labels ``[..., C]`` (every row kept). DIST itself does not use the label.
        beta: β ≥ 0, weight of the inter-class term (authors: 1, with an outer weight 2).
        gamma: γ ≥ 0, weight of the intra-class term (authors: 1, with an outer weight 2).
        temperature: τ > 0 (authors: 1 on ImageNet, 4 on CIFAR-100).
        reduction: ``"mean"`` or ``"sum"`` (= number of valid rows × mean); ``"none"`` raises.
        ignore_index: hard-label value whose rows are left out of both terms.

    Returns:
        A scalar, float32 (float64 for float64 input).
    """
    check_pair(student_logits, teacher_logits)
    check_nonnegative("beta", beta)
    check_nonnegative("gamma", gamma)
    check_positive("temperature", temperature)
    _check_dist_reduction(reduction)
    check_ignore_index(ignore_index)
    c = student_logits.shape[-1]
    dtype = compute_dtype(student_logits.dtype)
    valid = None
    if target is not None:
        valid = parse_rows(student_logits, target, ignore_index, name="student_logits").valid
    with no_autocast(student_logits):
        ys = torch.softmax(student_logits.reshape(-1, c).to(dtype) / temperature, dim=-1)
        yt = torch.softmax(teacher_logits.detach().reshape(-1, c).to(dtype) / temperature, dim=-1)
        if valid is None:
            valid = torch.ones(ys.shape[0], dtype=torch.bool, device=ys.device)
        keep = valid[:, None]  # [M, 1]: rows that take part
        ys, yt = torch.where(keep, ys, 0.0), torch.where(keep, yt, 0.0)
        n = valid.sum().to(dtype)
        denom = n.clamp(min=1.0)
        # inter-class: each row over its classes (centred by the row mean, 1/C for a softmax)
        rho_rows = _pearson(ys - ys.mean(-1, keepdim=True), yt - yt.mean(-1, keepdim=True), dim=1)
        inter_sum = torch.where(valid, 1.0 - rho_rows, 0.0).sum()
        # intra-class: each class over the valid rows (ignored rows contribute exactly 0)
        cs = torch.where(keep, ys - ys.sum(0, keepdim=True) / denom, 0.0)
        ct = torch.where(keep, yt - yt.sum(0, keepdim=True) / denom, 0.0)
        intra = 1.0 - _pearson(cs, ct, dim=0).mean()
        scale = float(temperature) ** 2
        if reduction == "mean":
            loss = scale * (beta * inter_sum / denom + gamma * intra)
        else:  # "sum"
            loss = scale * (beta * inter_sum + gamma * n * intra)
        return torch.where(n > 0, loss, torch.zeros_like(loss))


class DISTLoss(nn.Module):
    """Module form of :func:`dist_loss`: ``τ²(β·L_inter + γ·L_intra)`` (inter-class Pearson
    correlation per row, intra-class per class over the batch).

    Args:
        beta: β ≥ 0, weight of the inter-class term (default 1).
        gamma: γ ≥ 0, weight of the intra-class term (default 1).
        temperature: τ > 0 (default 1 = the authors' ImageNet setting; 4 on CIFAR-100).
        reduction: ``"mean"`` (default) or ``"sum"`` (rows × mean); ``"none"`` is refused.
        ignore_index: hard-label value whose rows are left out of both terms (default -100).
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0, reduction: str = "mean",
                 ignore_index: int = -100):
        super().__init__()
        check_nonnegative("beta", beta)
        check_nonnegative("gamma", gamma)
        check_positive("temperature", temperature)
        _check_dist_reduction(reduction)
        check_ignore_index(ignore_index)
        self.beta, self.gamma, self.temperature = float(beta), float(gamma), float(temperature)
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        """DIST of the student to the (frozen) teacher.

        Args:
            student_logits: ``[..., C]`` floating logits; leading dims are the rows of the batch.
            teacher_logits: ``[..., C]``, same shape; detached.
            target: optional int64 labels ``[...]`` (or soft ``[..., C]``); only marks rows equal
                to ``ignore_index`` to leave out.

        Returns:
            A scalar.
        """
        return dist_loss(student_logits, teacher_logits, target, beta=self.beta, gamma=self.gamma,
                         temperature=self.temperature, reduction=self.reduction, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, reduction={self.reduction!r}"
