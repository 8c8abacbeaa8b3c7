r"""Universal Self-Knowledge Distillation (USKD), Yang et al., ICCV 2023.

Inputs per sample: final logits ``z``, weak logits ``w = W f + b`` from a linear weak head on a
pooled intermediate feature ``f``, and the label with targets ``t_1..t_K`` of weights
``v_1 ≥ v_2`` (hard labels: ``K = 1, v_1 = 1``; soft labels: the two largest entries, ``K = 2``
unless the second-largest is not above the row minimum).  With ``s = softmax(z)``:

.. math::

    p_k = \mathrm{sg}\big(s_{t_k}^2 + v_k - \overline{s_{t_k}^2}\big)
    \quad(\overline{\cdot}: \text{mean over the rows of the batch that have a } k\text{-th target})

    L_t = -\sum_k p_k \log s_{t_k}

    q = 0.9\,y + 0.1/C, \qquad L_{weak} = -\mu \sum_i q_i \log \mathrm{softmax}(w)_i

    r_i = \frac{\tilde w_i}{1 - \sum_k \tilde w_{t_k} + 10^{-6}}
        + \frac{\hat s_i}{1 - \sum_k \hat s_{t_k} + 10^{-6}},\qquad \tilde w = \mathrm{softmax}(w)

with ``ŝ = softmax(z)`` for ``rank="paper"`` and ``ŝ = log_softmax(z)`` for ``rank="official"``.
All ``C`` classes are sorted by ``r`` (descending, ties broken by the lower class index); the
class at 0-based position ``j`` gets ``1/(j+1)``; the target columns are dropped and the rest
renormalized to ``ẑ`` (detached).

.. math::

    L_{non} = -\sum_{i\notin T} \hat z_i \log \mathrm{softmax}_{j\notin T}(z)_i,
    \qquad \mathrm{USKD} = \alpha L_t + \beta L_{non} + L_{weak}

The training objective adds ``CE(z, y)``. The batch mean couples the rows of a batch: rows with
``ignore_index`` are excluded from it.

Gradients are computed analytically in one fused pass:
``∂/∂z = α(Σ_k p_k s − Σ_k p_k e_{t_k}) + β(ŝ' − ẑ)`` (``ŝ'`` the non-target softmax, zero on
targets) and ``∂/∂w = μ(softmax(w) − q)``.

Under DDP the batch mean is taken per process (over the local batch), as in the official code.
A soft-label row whose second-largest entry is not above its minimum (one-hot, or label
smoothing without mixing) has no second target; the official code then picks an arbitrary tied
column, ours uses ``K = 1`` so the loss is well defined.

Defaults ``alpha=1, beta=0.1, mu=0.005`` are the published ImageNet setting (every model); the
CIFAR-100 setting (ResNet18) is ``alpha=0.1, beta=0.1, mu=0.1``. ``rank="paper"`` is the paper's
formula and first release (March 2023); ``rank="official"`` the current official code (since
July 2023). Sources, weak-head placement and published numbers: docs/methods.md, section USKD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._common import zipf_labels
from .dense import dense_loss
from .spec import Input, LossSpec, RowOut, common_checks, hp, nonnegative, one_of, register_loss

__all__ = ["uskd_loss", "USKDLoss", "RANK_MODES", "uskd_targets", "target_sq", "USKD"]

RANK_MODES = ("paper", "official")
_EPS = 1e-6


def uskd_targets(index: Tensor, soft: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """USKD targets ``[M, 2]``, their weights ``v`` ``[M, 2]`` and the has-second-target mask ``[M]``.

    Args:
        index: ``[M]`` int64 class per row (the hard label, or ``argmax`` of the soft row with the
            first index on ties).
        soft: ``[M, C]`` soft label rows, or ``None`` for hard labels.

    Hard labels: ``t_1 = index``, ``v_1 = 1``, no second target. Soft labels: ``t_1 = index``,
    ``v_1 = soft[t_1]``; ``t_2`` = argmax of the rest with ``v_2 = soft[t_2]`` if ``v_2 > min(row)``,
    otherwise no second target. For rows with a single target, column 2 repeats ``t_1`` with
    weight 0 so gathers and scatters stay valid.
    """
    if soft is None:
        idx = torch.stack([index, index], dim=1)
        v = torch.zeros(idx.shape, dtype=torch.float32, device=index.device)
        v[:, 0] = 1.0
        return idx, v, torch.zeros_like(index, dtype=torch.bool)
    t1 = index  # argmax, first index on ties
    v1 = soft.gather(1, t1[:, None]).squeeze(1)
    rest = soft.scatter(1, t1[:, None], float("-inf"))
    t2 = rest.argmax(-1)
    v2 = rest.gather(1, t2[:, None]).squeeze(1)
    has2 = v2 > soft.min(-1).values
    t2 = torch.where(has2, t2, t1)
    v2 = torch.where(has2, v2, torch.zeros_like(v2))
    return torch.stack([t1, t2], 1), torch.stack([v1, v2], 1), has2


def target_sq(z: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``log softmax(z)`` ``[M, C]``, ``log s_t`` and ``s_t²`` ``[M, k]`` at the target columns
    ``idx`` ``[M, k]`` — what the batch mean of the target term is taken over."""
    log_s = torch.log_softmax(z, -1)
    logs_t = log_s.gather(1, idx)
    return log_s, logs_t, (2 * logs_t).exp()


def _uskd_rows(z, w, idx, v, has2, valid, soft, alpha, beta, mu, rank, need_grad, mean_sq=None, ce_weight=0.0):
    """Per-row USKD loss ``[M]`` and gradients w.r.t. ``z`` and ``w``; ``mean_sq`` ``[2]``: the
    batch means of ``s_{t_k}²`` when these rows are a chunk of a larger batch (``None``: the
    mean over these rows); ``ce_weight`` (hard labels, for the fused form): adds
    ``w·CE(z, t_1) = −w·log s_{t_1}`` and its gradient ``w(s − e_{t_1})`` in the same passes
    (not in ``parts``)."""
    m, c = z.shape
    v = v.to(z.dtype)
    kmask = torch.stack([valid, valid & has2], 1)  # which (row, k) carry a target
    kmask_f = kmask.to(z.dtype)

    # ---- target term with the batch-coupled soft target p
    log_s, logs_t, sq = target_sq(z, idx)  # [M, C], [M, 2], [M, 2]
    if mean_sq is None:
        count = kmask_f.sum(0).clamp(min=1)
        mean_sq = (sq * kmask_f).sum(0) / count  # [2]
    p = (sq + v - mean_sq) * kmask_f
    loss_t = -(p * logs_t).sum(1)

    # ---- weak supervision: q = 0.9 y + 0.1 / C
    log_w = torch.log_softmax(w, -1)
    sum_logw = log_w.sum(-1)
    if soft is None:
        y_logw = log_w.gather(1, idx[:, :1]).squeeze(1)
    else:
        y_logw = (soft * log_w).sum(-1)
    loss_weak = -mu * (0.9 * y_logw + (0.1 / c) * sum_logw)

    # ---- rank score and Zipf non-target labels
    s = log_s.exp()  # softmax(z)
    wt = log_w.exp_()  # softmax(w)
    w_tsum = (wt.gather(1, idx) * kmask_f).sum(1, keepdim=True)
    s_hat = s if rank == "paper" else log_s
    s_tsum = (s_hat.gather(1, idx) * kmask_f).sum(1, keepdim=True)
    score = wt / (1 - w_tsum + _EPS) + s_hat / (1 - s_tsum + _EPS)
    zhat = zipf_labels(score, idx)  # column 2 repeats t_1 where K = 1
    del score

    # ---- non-target term over the non-target classes
    log_nt = torch.log_softmax(z.scatter(1, idx, float("-inf")), -1)  # −inf on the targets
    log_nt.scatter_(1, idx, 0.0)
    loss_non = -(zhat * log_nt).sum(-1)

    zero = torch.zeros_like(loss_t)
    parts = {"target": torch.where(valid, alpha * loss_t, zero), "non_target": torch.where(valid, beta * loss_non, zero),
             "weak": torch.where(valid, loss_weak, zero)}
    loss = parts["target"] + parts["non_target"] + parts["weak"]
    if ce_weight:
        loss = loss - ce_weight * torch.where(valid, logs_t[:, 0], zero)
    if not need_grad:
        return loss, None, None, parts
    vf = valid[:, None].to(z.dtype)
    # d/dz: alpha (P s - sum_k p_k e_tk) + beta (s' - zhat)
    grad_z = s.mul_(alpha * p.sum(1, keepdim=True) + ce_weight)
    grad_z.scatter_add_(1, idx, -alpha * p)
    if ce_weight:
        grad_z.scatter_add_(1, idx[:, :1], torch.full((m, 1), -ce_weight, dtype=z.dtype, device=z.device))
    s_nt = log_nt.exp_()
    s_nt.scatter_(1, idx, 0.0)
    grad_z.add_(s_nt.sub_(zhat), alpha=beta).mul_(vf)
    # d/dw: mu (softmax(w) - q)
    if soft is None:
        grad_w = wt.sub_(0.1 / c)
        grad_w.scatter_add_(1, idx[:, :1], torch.full((m, 1), -0.9, dtype=z.dtype, device=z.device))
    else:
        grad_w = wt.sub_(0.1 / c).sub_(soft, alpha=0.9)
    grad_w.mul_(mu * vf)
    return loss, grad_z, grad_w, parts


@register_loss("uskd", function="uskd_loss")
@dataclass
class USKD(LossSpec):
    """With ``s = softmax(z)`` for the final logits ``z``, weak logits ``w``, targets ``t_k`` with
    weights ``v_k`` (``k ≤ K``, K = 1 for hard labels, up to 2 for soft labels)::

        p_k   = sg(s_{t_k}² + v_k − mean_batch(s_{t_k}²))     (0 where a row has no k-th target)
        L_t   = − Σ_k p_k · log s_{t_k}
        q     = 0.9·y + 0.1/C;   L_weak = − μ · Σ_i q_i · log softmax(w)_i
        r_i   = w̃_i / (1 − Σ_k w̃_{t_k} + 1e-6) + ŝ_i / (1 − Σ_k ŝ_{t_k} + 1e-6),   w̃ = softmax(w)
        ẑ     = sg(Zipf label: class at rank j (0-based, by r, descending) gets 1/(j+1);
                   target columns dropped; renormalized over the non-targets)
        L_non = − Σ_{i∉targets} ẑ_i · log softmax_{j∉targets}(z)_i
        USKD  = α·L_t + β·L_non + L_weak

    ``ŝ = softmax(z)`` for ``rank="paper"``, ``log_softmax(z)`` for ``rank="official"``. The batch
    mean couples the rows passed in one call (under DDP: per process; ``ignore_index`` rows are
    out of it). Training objective (method ``uskd``): ``ce_weight·CE(z, y) + USKD`` with
    ``ce_weight = 1``. Parts: ``target`` = α·L_t, ``non_target`` = β·L_non, ``weak`` = L_weak.
    """

    title = "USKD ``α·L_t + β·L_non + L_weak`` (CE not included)"
    inputs = (Input("logits", "final student logits ``z`` ``[..., C]``; ``C >= 2`` (``C >= 3`` for soft labels)"),
              Input("weak_logits", "weak-head logits ``w``, same shape as ``logits``; gradients reach them"))
    target_doc = ("int64 labels ``[...]`` (values in ``[0, C)`` or ``ignore_index``) or soft labels ``[..., C]`` "
                  "(the two largest entries are the targets)")
    detach_second = False
    row_wise = False
    dense_analytic = True
    parts = ("target", "non_target", "weak")
    alpha: float = hp(1.0, nonnegative, "α ≥ 0, weight of ``L_t``; 1.0 = ImageNet, CIFAR-100: 0.1")
    beta: float = hp(0.1, nonnegative, "β ≥ 0, weight of ``L_non``; 0.1 on ImageNet and CIFAR-100")
    mu: float = hp(0.005, nonnegative, "μ ≥ 0, weight of ``L_weak``; 0.005 = ImageNet, CIFAR-100: 0.1")
    rank: str = hp("paper", one_of(*RANK_MODES), '``"paper"`` (softmax in the rank score — the paper and its first '
                                                 'release) or ``"official"`` (log-softmax — the current official code)')

    def check_rows(self, rows):
        if rows.soft is not None and rows.num_classes < 3:
            raise ValueError(
                f"USKD with soft labels needs at least 3 classes (two targets plus a non-target), got C={rows.num_classes}"
            )

    def rows(self, z, w, r, need_grad):
        idx, v, has2 = uskd_targets(r.index, r.soft)
        loss, gz, gw, parts = _uskd_rows(z, w, idx, v, has2, r.valid, r.soft, float(self.alpha), float(self.beta),
                                         float(self.mu), self.rank, need_grad)
        return RowOut(loss, (gz, gw), parts)


uskd_loss = USKD.function


class USKDLoss(nn.Module):
    """USKD with its own weak head: ``USKD = α·L_t + β·L_non + L_weak`` (formulas in :func:`uskd_loss`).

    Owns ``self.head = nn.Linear(in_features, num_classes)``, the weak head, applied to the pooled
    intermediate feature ``features`` ``[..., in_features]``: for CNNs the global-average-pooled
    output of the stage before the last, for ViTs the class token after block L/2 (what an nkd
    model returns as ``features["weak"]``). The head's weak logits feed ``L_weak`` and the rank
    score of the Zipf non-target labels. Gradients of ``L_weak`` reach the head and, through
    ``features``, the backbone. Put ``self.parameters()`` in the optimizer with the model's.

    Args:
        in_features: width of ``features``, an int ≥ 1 — ``model.weak_channels`` of an nkd model
            (e.g. 256 for ResNet18/34, 1024 for ResNet50/101, 320 for MobileNetV2, 192 for DeiT-T).
        num_classes: C, an int ≥ 2 (≥ 3 for soft labels); the head's output size, equal to the
            logits' last dimension.
        alpha: α ≥ 0, weight of the target term ``L_t``. Default 1.0 = ImageNet; CIFAR-100: 0.1.
        beta: β ≥ 0, weight of the Zipf non-target term ``L_non``. Default 0.1 (both settings).
        mu: μ ≥ 0, weight of the weak-head term ``L_weak``. Default 0.005 = ImageNet; CIFAR-100: 0.1.
        rank: ``"paper"`` (default; the paper and its first release) or ``"official"`` (the
            current official code: log-probabilities in the rank score).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out of the loss and of the batch mean
            (default -100).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        alpha: float = 1.0,
        beta: float = 0.1,
        mu: float = 0.005,
        rank: str = "paper",
        reduction: str = "mean",
        ignore_index: int = -100,
    ):
        super().__init__()
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.spec = USKD(alpha, beta, mu, rank)
        common_checks(USKD, reduction, ignore_index)
        self.head = nn.Linear(in_features, num_classes)
        self.alpha, self.beta, self.mu, self.rank = self.spec.alpha, self.spec.beta, self.spec.mu, self.spec.rank
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, features: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        """USKD of one batch, without the CE term.

        Args:
            features: ``[..., in_features]`` pooled intermediate features (``feats["weak"]``
                of ``model(x, return_features=True)``); the weak head is applied to them.
            logits: ``[..., num_classes]`` final logits of the same model.
            target: int64 labels ``[...]`` or soft labels ``[..., num_classes]``.

        Returns:
            A scalar (``"mean"``/``"sum"``) or per-row values ``[...]`` (``"none"``). The batch
            mean in ``p_k`` is over the rows of this call.
        """
        if features.shape[-1] != self.head.in_features:
            raise ValueError(
                f"features must have {self.head.in_features} channels in the last dimension, got shape {tuple(features.shape)}"
            )
        return dense_loss(self.spec, logits, self.head(features), target=target, reduction=self.reduction,
                          ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, mu={self.mu}, rank={self.rank!r}"


USKD.module = USKDLoss  # type: ignore[attr-defined]  # the module form owns the weak head, so it is written by hand
