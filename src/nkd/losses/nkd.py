r"""Normalized Knowledge Distillation (NKD), Yang et al., ICCV 2023.

The objective — ``NKD = L_t + L_non`` with the target term at temperature 1 and the normalized
non-target cross-entropy at temperature λ — is stated once, in the docstring of :class:`NKD` (which
``nkd_loss`` and ``NKDLoss`` show) and in docs/methods.md, section NKD.

The teacher's logits are treated as constants (no gradient reaches them), as in every
distillation setting where the teacher is frozen.

Implementation: one fused pass computes the per-row loss and its analytic gradient

.. math::

    \partial L/\partial z = T_t\,(S - e_t) + \gamma\lambda\,(\hat S - \hat T),
    \qquad (\hat S_t = \hat T_t = 0)

so the backward pass is a single scale, with three ``[N, C]`` buffers instead of the autograd
graph of the naive formulation.

Scale (why logged values are large when ``γλ²`` is), the defaults against the published settings,
sources, history (the 2023 mask bug of a released version) and published numbers: docs/methods.md,
section NKD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _inplace
from .spec import LossSpec, RowOut, hp, nonnegative, positive, register_loss

__all__ = ["nkd_loss", "NKDLoss", "NKD"]


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


@register_loss("nkd", function="nkd_loss", module="NKDLoss")
@dataclass
class NKD(LossSpec):
    """Per row with target ``t``, student logits ``z`` and teacher logits ``u``::

        S = softmax(z),  T = softmax(u)                          (temperature 1)
        L_t   = − T_t · log S_t                                  (T_t: a constant, no gradient)
        Ŝ_i = exp(z_i/λ) / Σ_{j≠t} exp(z_j/λ),  T̂_i likewise from u,  for i ≠ t
        L_non = − γ · λ² · Σ_{i≠t} T̂_i · log Ŝ_i                 (cross-entropy over C − 1 classes)
        NKD   = L_t + L_non;    ∂NKD/∂z = T_t (S − e_t) + γλ (Ŝ − T̂)

    Training objective (method ``nkd``): ``ce_weight · CE(z, y) + NKD`` with ``ce_weight = 1``.
    The minimum of ``L_non`` over the student is ``γλ²·H(T̂)`` ≤ ``γλ²·ln(C − 1)``, not 0 (C = 10,
    λ = 3, γ = 3.5: up to 69.2), so large logged values are expected when ``γλ²`` is large. Soft
    labels use ``t = argmax`` (the second mixed class stays a non-target). Parts: ``target`` = L_t,
    ``non_target`` = L_non. Sources and published numbers: docs/methods.md, section NKD.
    """

    title = "Normalized KD ``L_t + L_non`` (the CE term not included)"
    temperature: float = hp(1.0, positive, "λ > 0, applied to the non-target term only; 1.0 = the published ImageNet "
                                           "setting (also DeiT), the official CIFAR-100 setting is 3")
    gamma: float = hp(1.5, nonnegative, "γ ≥ 0, weight of the non-target term; 1.5 = ImageNet ResNet pairs, 1.0 = "
                                        "DeiT pairs, 3.5 = the official CIFAR-100 setting")
    dense_analytic = True
    fuses_ce = True
    parts = ("target", "non_target")

    def min_topk(self, rest):
        return 2 if rest == "zero" else 1  # "zero": K∖{t} must not be empty

    def rows(self, z, u, r, need_grad, ce_weight: float = 0.0):
        parts: dict[str, Tensor] = {}
        loss, grad = _nkd_rows(z, u, r.index, r.valid, float(self.temperature), float(self.gamma), need_grad,
                               ce_weight=ce_weight, parts=parts)
        return RowOut(loss, grad, parts)

    def chunk_rows(self, z, u, idx, need_grad, ce_weight: float = 0.0, ws=None):
        return _inplace.nkd(z, u, idx, need_grad, float(self.temperature), float(self.gamma), ce_weight=ce_weight, ws=ws)


nkd_loss = NKD.function
NKDLoss = NKD.module
