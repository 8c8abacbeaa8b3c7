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

from dataclasses import dataclass

import torch
from torch import Tensor

from .spec import LossSpec, RowOut, hp, nonnegative, positive, register_loss

__all__ = ["dist_loss", "DISTLoss", "DIST_REDUCTIONS", "DIST_EPS", "DIST"]

DIST_REDUCTIONS = ("mean", "sum")
DIST_EPS = 1e-8  # the authors' ε in the cosine denominator


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """``⟨a_c, b_c⟩ / (‖a_c‖·‖b_c‖ + ε)`` along ``dim``, where ``a_c``, ``b_c`` are already centred."""
    num = (a * b).sum(dim)
    den = torch.linalg.vector_norm(a, dim=dim) * torch.linalg.vector_norm(b, dim=dim) + DIST_EPS
    return num / den


@register_loss("dist", function="dist_loss", module="DISTLoss")
@dataclass
class DIST(LossSpec):
    r"""DIST over the batch, with ``Y^s = softmax(z/τ)``, ``Y^t = softmax(u/τ)`` and ρ the Pearson
    correlation (cosine of mean-centred vectors, ``+1e-8`` in the denominator)::

        L_inter = 1 − (1/M) Σ_r ρ(Y^s_{r,:}, Y^t_{r,:})      (each row over its classes)
        L_intra = 1 − (1/C) Σ_j ρ(Y^s_{:,j}, Y^t_{:,j})      (each class over the M rows)
        DIST    = τ² (β · L_inter + γ · L_intra)

    over the ``M`` non-ignored rows. ``L_intra`` correlates each class over the rows, so the loss
    couples the batch: there is no per-row value (``reduction="none"`` raises; ``"sum"`` is
    ``M × mean``), and under DDP it is computed over each process's local batch. Leading dims are
    flattened into the rows ``L_intra`` correlates over. Training objective (method ``dist``):
    ``ce_weight·CE + kd_weight·DIST`` (authors: 1 and 2).
    """

    title = "DIST ``τ²(β·L_inter + γ·L_intra)`` (no CE)"
    target = "optional"
    target_doc = ("int64 labels ``[...]`` (only used to leave out ``ignore_index`` rows) or soft labels ``[..., C]`` "
                  "(every row kept); DIST itself does not use the label")
    reductions = DIST_REDUCTIONS
    reductions_why = ("DIST's intra-class term correlates each class over the rows of the batch, so there is no "
                      "per-row loss; use reduction='mean' or 'sum'")
    row_wise = False
    beta: float = hp(1.0, nonnegative, "β ≥ 0, weight of the inter-class term (authors: 1, with an outer weight 2)")
    gamma: float = hp(1.0, nonnegative, "γ ≥ 0, weight of the intra-class term (authors: 1, with an outer weight 2)")
    temperature: float = hp(1.0, positive, "τ > 0 (authors: 1 on ImageNet, 4 on CIFAR-100)")

    def rows(self, z, u, r, need_grad):
        """Each valid row's share ``τ²(β(1 − ρ_r) + γ·L_intra)``: their sum is ``M·DIST``, their mean DIST."""
        tau = float(self.temperature)
        ys, yt = torch.softmax(z / tau, dim=-1), torch.softmax(u / tau, dim=-1)
        valid = r.valid
        keep = valid[:, None]  # [M, 1]: rows that take part
        ys, yt = torch.where(keep, ys, 0.0), torch.where(keep, yt, 0.0)
        denom = valid.sum().to(z.dtype).clamp(min=1.0)
        # inter-class: each row over its classes (centred by the row mean, 1/C for a softmax)
        rho_rows = _pearson(ys - ys.mean(-1, keepdim=True), yt - yt.mean(-1, keepdim=True), dim=1)
        # intra-class: each class over the valid rows (ignored rows contribute exactly 0)
        cs = torch.where(keep, ys - ys.sum(0, keepdim=True) / denom, 0.0)
        ct = torch.where(keep, yt - yt.sum(0, keepdim=True) / denom, 0.0)
        intra = 1.0 - _pearson(cs, ct, dim=0).mean()
        share = tau**2 * (self.beta * (1.0 - rho_rows) + self.gamma * intra)
        return RowOut(torch.where(valid, share, torch.zeros_like(share)))


dist_loss = DIST.function
DISTLoss = DIST.module
