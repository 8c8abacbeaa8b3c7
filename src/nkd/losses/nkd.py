r"""Normalized Knowledge Distillation (NKD), Yang et al., ICCV 2023.

Per sample with target ``t``, student logits ``z`` and teacher logits ``u``:

.. math::

    S = \mathrm{softmax}(z),\quad T = \mathrm{softmax}(u)\quad(\text{temperature } 1)

    L_t = -\,\mathrm{sg}(T_t)\,\log S_t

    \hat S_i = \frac{e^{z_i/\lambda}}{\sum_{j\ne t} e^{z_j/\lambda}},\quad
    \hat T_i = \frac{e^{u_i/\lambda}}{\sum_{j\ne t} e^{u_j/\lambda}}\quad (i \ne t)

    L_{non} = -\,\gamma\,\lambda^2 \sum_{i\ne t} \hat T_i \log \hat S_i,
    \qquad \mathrm{NKD} = L_t + L_{non}

The training objective adds ordinary cross-entropy with the label at weight 1. Soft labels
(mixup/cutmix) use ``t = argmax`` of the row (first index on ties); the second mixed class
stays a non-target.

The teacher's logits are treated as constants (no gradient reaches them), as in every
distillation setting where the teacher is frozen.

Implementation: one fused pass computes the per-row loss and its analytic gradient

.. math::

    \partial L/\partial z = T_t\,(S - e_t) + \gamma\lambda\,(\hat S - \hat T),
    \qquad (\hat S_t = \hat T_t = 0)

so the backward pass is a single scale, with three ``[N, C]`` buffers instead of the autograd
graph of the naive formulation.

Scale: ``L_non`` is a cross-entropy over ``C − 1`` classes, so its minimum over the student is
``γλ²·H(T̂)`` (the teacher's non-target entropy), at most ``γλ²·ln(C − 1)`` — not 0. With C = 10,
λ = 3, γ = 3.5 (γλ² = 31.5) that bound is 69.2; λ = 3 flattens ``T̂`` towards uniform, so
logged values in the high 60s are a student near its optimum, not a divergence.

Defaults ``temperature=1, gamma=1.5`` are the published ImageNet setting (ResNet34→ResNet18,
ResNet50→MobileNetV1); DeiT pairs use ``gamma=1.0``; the official CIFAR-100 setting is
``temperature=3, gamma=3.5``. Sources, history (the 2023 mask bug of a released version) and
published numbers: docs/methods.md, section NKD.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import (
    check_nonnegative,
    check_pair,
    check_positive,
    check_reduction,
    compute_dtype,
    no_autocast,
    parse_rows,
    reduce_rows,
    row_loss_with_grad,
)

__all__ = ["nkd_loss", "NKDLoss"]


def _nkd_rows(
    z: Tensor, u: Tensor, idx: Tensor, valid: Tensor | None, lam: float, gamma: float, need_grad: bool,
    ce_weight: float = 0.0, parts: dict[str, Tensor] | None = None,
):
    """Per-row NKD loss ``[M]`` and (optionally) its gradient w.r.t. ``z`` ``[M, C]``.

    Rows where ``valid`` is False are 0 (loss and gradient); ``valid=None`` means every row counts.
    A ``parts`` dict receives the per-row ``"target"`` (``L_t``) and ``"non_target"`` (``L_non``)
    terms; ``target + non_target`` is bitwise the returned loss.

    ``ce_weight`` w adds ``w·CE = −w·log S_t`` in the same pass: the target term becomes
    ``−(T_t + w)·log S_t`` with gradient ``(T_t + w)(S − e_t)`` (``T_t`` is a constant).
    """
    col = idx[:, None]
    lse_z = torch.logsumexp(z, dim=-1, keepdim=True)
    logs_t = z.gather(1, col) - lse_z  # log S_t, stable for any logit range
    lse_u = torch.logsumexp(u, dim=-1, keepdim=True)
    t_t = (u.gather(1, col) - lse_u).exp_()  # T_t (detached by construction)
    if ce_weight:
        t_t = t_t + ce_weight  # weight of -log S_t: T_t + w
    loss_t = -(t_t * logs_t)

    # Non-target student log-probs at temperature lam: target column -> -inf.
    zs = z / lam
    zs.scatter_(1, col, float("-inf"))
    lse_zs = torch.logsumexp(zs, dim=-1, keepdim=True)
    # Non-target teacher distribution T_hat (exactly 0 on the target column).
    th = u / lam
    th.scatter_(1, col, float("-inf"))
    th = torch.softmax(th, dim=-1)
    # sum_i T_hat_i log S_hat_i = sum_i T_hat_i zs_i - lse_zs (sum T_hat = 1); zero the -inf first.
    zs.scatter_(1, col, 0.0)
    cross = torch.bmm(th.unsqueeze(1), zs.unsqueeze(2)).reshape(-1, 1) - lse_zs
    non = gamma * lam * lam * cross
    loss = (loss_t - non).squeeze(1)
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    if parts is not None:
        for key, val in (("target", loss_t.squeeze(1)), ("non_target", non.neg().squeeze(1))):
            parts[key] = val if valid is None else torch.where(valid, val, torch.zeros_like(val))
    if not need_grad:
        return loss, None
    # grad = T_t (S - e_t) + gamma*lam (S_hat - T_hat)
    grad = torch.sub(z, lse_z).exp_().mul_(t_t)
    grad.scatter_add_(1, col, -t_t)
    s_hat = zs.sub_(lse_zs).exp_()
    s_hat.scatter_(1, col, 0.0)
    grad.add_(s_hat.sub_(th), alpha=gamma * lam)
    if valid is not None:
        grad.mul_(valid[:, None])
    return loss, grad


def nkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    reduction: str = "mean",
    ignore_index: int = -100,
    return_parts: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """Normalized KD loss ``L_t + L_non`` per row, then ``reduction`` (the CE term is not included).

    Per row with target ``t``, student logits ``z`` and teacher logits ``u``::

        S = softmax(z),  T = softmax(u)                          (temperature 1)
        L_t   = − T_t · log S_t                                  (T_t: a constant, no gradient)
        Ŝ_i = exp(z_i/λ) / Σ_{j≠t} exp(z_j/λ),  T̂_i likewise from u,  for i ≠ t
        L_non = − γ · λ² · Σ_{i≠t} T̂_i · log Ŝ_i                 (cross-entropy over C − 1 classes)
        NKD   = L_t + L_non;    ∂NKD/∂z = T_t (S − e_t) + γλ (Ŝ − T̂)

    Training objective (method ``nkd``): ``ce_weight · CE(z, y) + NKD`` with ``ce_weight = 1``.
    The minimum of ``L_non`` over the student is ``γλ²·H(T̂)`` ≤ ``γλ²·ln(C − 1)``, not 0 (C = 10,
    λ = 3, γ = 3.5: up to 69.2), so large logged values are expected when ``γλ²`` is large.

    Args:
        student_logits: ``[..., C]`` floating logits, ``C >= 2``.
        teacher_logits: same shape as ``student_logits``; treated as constants (detached).
        target: int64 labels ``[...]`` with values in ``[0, C)`` or ``ignore_index``, or soft
            labels ``[..., C]`` (rows ≥ 0 summing to 1; ``t = argmax`` of the row, first index on
            ties, the second mixed class stays a non-target).
        temperature: λ, a finite number > 0, applied to the non-target term only. Default 1.0 =
            the published ImageNet setting (also the DeiT pairs); the official CIFAR-100 setting
            (ResNet34→ResNet18) is ``temperature=3``.
        gamma: γ, a finite number ≥ 0, weight of the non-target term. Default 1.5 = the published
            ImageNet setting for ResNet34→ResNet18 and ResNet50→MobileNetV1; DeiT pairs use
            ``gamma=1.0``; the official CIFAR-100 setting is ``gamma=3.5``.
        reduction: ``"mean"`` (default; over non-ignored rows, 0 if none), ``"sum"`` or
            ``"none"`` (per-row values, shape ``[...]``, 0 on ignored rows).
        ignore_index: hard-label value whose rows are left out of the loss and of the mean
            (default -100).
        return_parts: also return the detached, reduced parts ``{"target": L_t,
            "non_target": L_non}`` (they sum to the loss), for logging.

    Returns:
        The loss, float32 (float64 for float64 input): a scalar, or ``[...]`` for
        ``reduction="none"``; with ``return_parts``, ``(loss, parts)``. Sources and published
        numbers: docs/methods.md, section NKD.
    """
    check_pair(student_logits, teacher_logits)
    check_positive("temperature", temperature)
    check_nonnegative("gamma", gamma)
    check_reduction(reduction)
    rows = parse_rows(student_logits, target, ignore_index, name="student_logits")
    dtype = compute_dtype(student_logits.dtype)
    with no_autocast(student_logits):
        z = rows.logits.to(dtype)
        u = teacher_logits.detach().reshape(z.shape).to(dtype)
        need_grad = torch.is_grad_enabled() and z.requires_grad
        with torch.no_grad():
            parts: dict[str, Tensor] | None = {} if return_parts else None
            loss, grad = _nkd_rows(z.detach(), u, rows.index, rows.valid, float(temperature), float(gamma), need_grad,
                                   parts=parts)
        per_row = row_loss_with_grad(loss, z, grad)
        out = reduce_rows(per_row, rows.valid, reduction, rows.lead_shape)
        if parts is None:
            return out
        return out, {k: reduce_rows(v, rows.valid, reduction, rows.lead_shape) for k, v in parts.items()}


class NKDLoss(nn.Module):
    """Module form of :func:`nkd_loss`: ``NKD = L_t + L_non`` with fixed hyper-parameters.

    ``L_t = −T_t·log S_t`` (teacher probability detached) and
    ``L_non = −γλ²·Σ_{i≠t} T̂_i·log Ŝ_i`` over the non-target classes renormalized at
    temperature λ (formulas in :func:`nkd_loss`). No parameters are learned.

    Args:
        temperature: λ > 0 (default 1.0 = ImageNet; official CIFAR-100: 3).
        gamma: γ ≥ 0 (default 1.5 = ImageNet ResNet pairs; DeiT pairs: 1.0; official
            CIFAR-100: 3.5).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        ignore_index: hard-label value whose rows are left out (default -100).
    """

    def __init__(self, temperature: float = 1.0, gamma: float = 1.5, reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        check_positive("temperature", temperature)
        check_nonnegative("gamma", gamma)
        check_reduction(reduction)
        self.temperature, self.gamma = float(temperature), float(gamma)
        self.reduction, self.ignore_index = reduction, ignore_index

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """NKD of the student to the (frozen) teacher, without the CE term.

        Args:
            student_logits: ``[..., C]`` floating logits.
            teacher_logits: ``[..., C]``, same shape; detached.
            target: int64 labels ``[...]`` or soft labels ``[..., C]``.

        Returns:
            A scalar (``"mean"``/``"sum"``) or per-row values ``[...]`` (``"none"``).
        """
        return nkd_loss(
            student_logits,
            teacher_logits,
            target,
            temperature=self.temperature,
            gamma=self.gamma,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}, reduction={self.reduction!r}"
