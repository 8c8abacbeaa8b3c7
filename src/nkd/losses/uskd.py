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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import (
    check_logits,
    check_nonnegative,
    check_reduction,
    compute_dtype,
    log_softmax_without,
    no_autocast,
    parse_rows,
    reduce_rows,
    row_loss_with_grad,
    zipf_labels,
)

__all__ = ["uskd_loss", "USKDLoss", "RANK_MODES", "uskd_targets"]

RANK_MODES = ("paper", "official")
_EPS = 1e-6


def _check_params(alpha: float, beta: float, mu: float, rank: str, reduction: str) -> None:
    for name, val in (("alpha", alpha), ("beta", beta), ("mu", mu)):
        check_nonnegative(name, val)
    if rank not in RANK_MODES:
        raise ValueError(f"rank must be one of {RANK_MODES}, got {rank!r}")
    check_reduction(reduction)


def uskd_targets(index: Tensor, soft: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Targets ``[M, 2]``, weights ``v`` ``[M, 2]`` and the has-second-target mask ``[M]``.

    For rows with a single target, column 2 repeats ``t_1`` with weight 0 so gathers and
    scatters stay valid.
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


def _uskd_rows(z, w, idx, v, has2, valid, soft, alpha, beta, mu, rank, need_grad):
    """Per-row USKD loss ``[M]`` and gradients w.r.t. ``z`` and ``w``."""
    m, c = z.shape
    v = v.to(z.dtype)
    kmask = torch.stack([valid, valid & has2], 1)  # which (row, k) carry a target
    kmask_f = kmask.to(z.dtype)

    # ---- target term with the batch-coupled soft target p
    lse_z = torch.logsumexp(z, -1, keepdim=True)
    logs_t = z.gather(1, idx) - lse_z  # [M, 2]
    sq = (2 * logs_t).exp()  # s_t^2
    count = kmask_f.sum(0).clamp(min=1)
    mean_sq = (sq * kmask_f).sum(0) / count  # [2]
    p = (sq + v - mean_sq) * kmask_f
    loss_t = -(p * logs_t).sum(1)

    # ---- weak supervision: q = 0.9 y + 0.1 / C
    lse_w = torch.logsumexp(w, -1, keepdim=True)
    sum_logw = w.sum(-1) - c * lse_w.squeeze(1)
    if soft is None:
        y_logw = w.gather(1, idx[:, :1]).squeeze(1) - lse_w.squeeze(1)
    else:
        y_logw = torch.bmm(soft.unsqueeze(1), (w - lse_w).unsqueeze(2)).reshape(-1)
    loss_weak = -mu * (0.9 * y_logw + (0.1 / c) * sum_logw)

    # ---- rank score and Zipf non-target labels
    s = torch.sub(z, lse_z).exp_()  # softmax(z)
    wt = torch.sub(w, lse_w).exp_()  # softmax(w)
    w_tsum = (wt.gather(1, idx) * kmask_f).sum(1, keepdim=True)
    s_hat = s if rank == "paper" else z - lse_z
    s_tsum = (s_hat.gather(1, idx) * kmask_f).sum(1, keepdim=True)
    score = wt / (1 - w_tsum + _EPS) + s_hat / (1 - s_tsum + _EPS)
    zhat = zipf_labels(score, idx)  # column 2 repeats t_1 where K = 1
    del score

    # ---- non-target term over the non-target classes
    log_nt, _ = log_softmax_without(z, idx)
    log_nt.scatter_(1, idx, 0.0)
    loss_non = -torch.bmm(zhat.unsqueeze(1), log_nt.unsqueeze(2)).reshape(-1)

    loss = alpha * loss_t + beta * loss_non + loss_weak
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not need_grad:
        return loss, None, None
    vf = valid[:, None].to(z.dtype)
    # d/dz: alpha (P s - sum_k p_k e_tk) + beta (s' - zhat)
    grad_z = s.mul_(alpha * p.sum(1, keepdim=True))
    grad_z.scatter_add_(1, idx, -alpha * p)
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
    return loss, grad_z, grad_w


def uskd_loss(
    logits: Tensor,
    weak_logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    rank: str = "paper",
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """USKD loss ``α·L_t + β·L_non + L_weak`` (module docstring has the formulas).

    Args:
        logits: final student logits ``[..., C]``; ``C >= 2`` (``C >= 3`` for soft labels).
        weak_logits: weak-head logits, same shape as ``logits``.
        target: int64 labels ``[...]`` (``ignore_index`` allowed) or soft labels ``[..., C]``.
        alpha, beta, mu: term weights (≥ 0).
        rank: ``"paper"`` (softmax in the rank score, the paper and its first release) or
            ``"official"`` (log-softmax, the current official code).
        reduction: ``"mean"`` over non-ignored rows, ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out of the loss and the batch mean.

    Returns:
        The loss (without the cross-entropy term) in float32 (float64 for float64 input).
    """
    check_logits("logits", logits)
    check_logits("weak_logits", weak_logits)
    if weak_logits.shape != logits.shape:
        raise ValueError(
            f"weak_logits must have the same shape as logits: got {tuple(weak_logits.shape)} vs {tuple(logits.shape)}"
        )
    _check_params(alpha, beta, mu, rank, reduction)
    rows = parse_rows(logits, target, ignore_index, name="logits")
    if rows.soft is not None and rows.num_classes < 3:
        raise ValueError(
            f"USKD with soft labels needs at least 3 classes (two targets plus a non-target), got C={rows.num_classes}"
        )
    dtype = compute_dtype(logits.dtype)
    with no_autocast(logits):
        z = rows.logits.to(dtype)
        w = weak_logits.reshape(z.shape).to(dtype)
        idx, v, has2 = uskd_targets(rows.index, rows.soft)
        need_grad = torch.is_grad_enabled() and (z.requires_grad or w.requires_grad)
        with torch.no_grad():
            loss, gz, gw = _uskd_rows(
                z.detach(), w.detach(), idx, v, has2, rows.valid, rows.soft,
                float(alpha), float(beta), float(mu), rank, need_grad,
            )
        if need_grad and not z.requires_grad:
            z, gz, w, gw = w, gw, None, None
        elif need_grad and not w.requires_grad:
            w, gw = None, None
        per_row = row_loss_with_grad(loss, z, gz, w, gw)
        return reduce_rows(per_row, rows.valid, reduction, rows.lead_shape)


class USKDLoss(nn.Module):
    """USKD with its weak head: ``forward(features, logits, target)``.

    Owns ``self.head = nn.Linear(in_features, num_classes)`` applied to the pooled intermediate
    feature ``features`` ``[..., in_features]`` (SPEC: the stage before the last, or the ViT class
    token after block L/2). Gradients of ``L_weak`` reach the head and, through ``features``,
    the backbone.
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
        _check_params(alpha, beta, mu, rank, reduction)
        self.head = nn.Linear(in_features, num_classes)
        self.alpha, self.beta, self.mu = float(alpha), float(beta), float(mu)
        self.rank, self.reduction, self.ignore_index = rank, reduction, ignore_index

    def forward(self, features: Tensor, logits: Tensor, target: Tensor) -> Tensor:
        if features.shape[-1] != self.head.in_features:
            raise ValueError(
                f"features must have {self.head.in_features} channels in the last dimension, got shape {tuple(features.shape)}"
            )
        weak = self.head(features)
        return uskd_loss(
            logits, weak, target, alpha=self.alpha, beta=self.beta, mu=self.mu,
            rank=self.rank, reduction=self.reduction, ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, mu={self.mu}, rank={self.rank!r}"
