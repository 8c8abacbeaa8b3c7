r"""Token-level USKD (Yang et al., ICCV 2023) fused with the LM head: the teacher-free method at
vocabulary scale, chunked over tokens so that neither the ``[N, V]`` logits nor the ``[N, V]``
weak logits are ever held whole.

Per token (a row) with target ``t``, student logits ``z = h Wᵀ + b`` and weak logits
``w = h_w W_wᵀ + b_w`` — a linear head on an intermediate layer's hidden state ``h_w`` — the
loss is :func:`~nkd.losses.uskd_loss` on the materialized logits (hard labels, so one target:
``K = 1``, ``v = 1``) plus ``ce_weight·CE(z, t)``; with ``s = softmax(z)``, ``w̃ = softmax(w)``:

.. math::

    p = \mathrm{sg}\big(s_t^2 + 1 - \overline{s_t^2}\big),\qquad L_t = -p\log s_t
    \qquad(\overline{\cdot}:\ \text{mean over the call's tokens that are not ignore\_index})

    L_{weak} = -\mu \sum_i \big(0.9\,e_t + 0.1/V\big)_i \log \tilde w_i

    r_i = \frac{\tilde w_i}{1 - \tilde w_t + 10^{-6}} + \frac{\hat s_i}{1 - \hat s_t + 10^{-6}},
    \qquad \hat z_i \propto \frac{1}{\mathrm{rank}_r(i) + 1}\ (i \ne t),\quad \hat z_t = 0

    L_{non} = -\sum_{i\ne t}\hat z_i \log \mathrm{softmax}_{j\ne t}(z)_i,\qquad
    \mathrm{loss} = \alpha L_t + \beta L_{non} + L_{weak} + w_{ce}\,\mathrm{CE}(z, t)

``ŝ = s`` (``rank="paper"``) or ``log s`` (``rank="official"``). ``rank_r(i)`` is the exact
0-based position of token ``i`` when all ``V`` tokens are sorted by ``r`` descending, ties to the
lower token id; ``ẑ`` renormalizes ``1/(rank+1)`` over the ``V − 1`` non-targets. Gradients:
``∂/∂z = α(p s − p e_t) + β(ŝ' − ẑ) + w_ce(s − e_t)`` (``ŝ'`` the non-target softmax) and
``∂/∂w = μ(w̃ − 0.9 e_t − 0.1/V)``, folded chunk by chunk into ``∂h, ∂W, ∂b, ∂h_w, ∂W_w, ∂b_w``.

The batch mean ``mean(s_t²)`` couples the tokens, so the call makes two passes over the chunks:
the first forms only the student's logits to accumulate ``Σ s_t²`` over the valid tokens; the
second, with the mean known (a constant: ``p`` is stop-gradient), computes every row's loss and
gradients exactly as the dense form. Ignored tokens are in no chunk and out of the mean. Under
DDP the mean is per process (over the local tokens of the call), as the image USKD. Cost, the
rank computation and the measured figures: docs/lm.md, "Teacher-free: token-level USKD".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._common import compute_dtype
from .chunked import (
    _check_head,
    _check_lead,
    _device_check,
    _FusedLinearLossFn,
    _Head,
    _mm_dtype,
    _parse_target,
    _put,
    _take,
    check_settings,
    default_chunk_size,
    row_chunks,
)
from .uskd import USKD, _uskd_rows, target_sq, uskd_targets

__all__ = ["fused_linear_uskd_loss", "FusedLinearUSKDLoss"]


@dataclass
class _USKDPlan:
    """The second pass: every chunk's USKD rows with the batch mean ``mean_sq`` already known."""

    spec: USKD
    ce_weight: float
    index: Tensor  # [N] target per row (0 where ignored)
    chunks: list
    count: int
    mean_sq: Tensor  # [2]: mean of s_t² over the valid rows; 0 (no second target)
    cdtype: torch.dtype
    mm_dtypes: tuple[torch.dtype, torch.dtype]  # student head, weak head
    reduction: str

    def run(self, tensors: tuple[Tensor | None, ...], scale: float | Tensor, want: tuple[bool, ...]):
        """Per-row losses ``[N]`` and the six gradients (student ``h, W, b``, weak ``h_w, W_w, b_w``)."""
        student = _Head(*tensors[:3], self.mm_dtypes[0], want[:3])
        weak = _Head(*tensors[3:], self.mm_dtypes[1], want[3:])
        sp = self.spec
        per_row = torch.zeros(tensors[0].shape[0], dtype=self.cdtype, device=tensors[0].device)
        for sel in self.chunks:
            h, z = student.logits(sel, self.cdtype)
            hw, w = weak.logits(sel, self.cdtype)
            t = _take(self.index, sel)
            idx, v, has2 = uskd_targets(t, None)
            valid = torch.ones(t.shape, dtype=torch.bool, device=t.device)  # ignored rows are never in a chunk
            loss, gz, gw, _ = _uskd_rows(z, w, idx, v, has2, valid, None, float(sp.alpha), float(sp.beta), float(sp.mu),
                                         sp.rank, any(want), mean_sq=self.mean_sq, ce_weight=self.ce_weight)
            del z, w
            _put(per_row, sel, loss)
            if gz is not None:
                student.fold(sel, h, gz, scale)
                weak.fold(sel, hw, gw, scale)
            del gz, gw
        return per_row, student.grads() + weak.grads()


def _batch_mean_sq(head: _Head, index: Tensor, chunks: list, count: int, dtype: torch.dtype) -> Tensor:
    """The first pass: ``[mean of s_t² over the valid rows, 0]`` from the student's logits alone."""
    total = torch.zeros((), dtype=dtype, device=index.device)
    for sel in chunks:
        _, z = head.logits(sel, dtype)
        total += target_sq(z, _take(index, sel)[:, None])[2].sum()
    return torch.stack([total / max(count, 1), torch.zeros_like(total)])


def fused_linear_uskd_loss(hidden: Tensor, weight: Tensor, weak_hidden: Tensor, weak_weight: Tensor, target: Tensor, *,
                           bias: Tensor | None = None, weak_bias: Tensor | None = None, alpha: float = 1.0,
                           beta: float = 0.1, mu: float = 0.005, rank: str = "paper", ce_weight: float = 0.0,
                           ignore_index: int = -100, reduction: str = "mean", chunk_size: int | None = None) -> Tensor:
    r"""Token-level USKD ``α·L_t + β·L_non + L_weak`` (+ ``ce_weight``·CE) on the student logits
    ``z = hidden @ weight.T + bias`` and the weak logits ``w = weak_hidden @ weak_weight.T + weak_bias``,
    chunked: equals ``uskd_loss(z, w, target) + ce_weight·CE(z, target)`` on the materialized logits
    — value and gradients w.r.t. all six tensors — without holding either ``[N, V]``.

    Per token, with ``s = softmax(z)``, ``w̃ = softmax(w)``, ``ŝ = s`` (``"paper"``) or ``log s`` (``"official"``)::

        p      = sg(s_t² + 1 − mean over the call's valid tokens of s_t²);   L_t = −p·log s_t
        L_weak = −μ·Σ_i (0.9·e_t + 0.1/V)_i · log w̃_i
        r_i    = w̃_i/(1 − w̃_t + 1e-6) + ŝ_i/(1 − ŝ_t + 1e-6)
        ẑ_i    ∝ 1/(rank_r(i) + 1) for i ≠ t (exact rank among all V tokens by r, descending,
                 ties to the lower id), ẑ_t = 0, renormalized;   L_non = −Σ_{i≠t} ẑ_i·log softmax_{j≠t}(z)_i

    Two passes over the chunks: the first accumulates ``Σ s_t²`` (the batch mean couples the
    tokens), the second computes the rows and folds their analytic gradients into the six inputs.

    Args:
        hidden: student's last hidden states ``[..., H]`` (after the final norm).
        weight: student LM head ``[V, H]``.
        weak_hidden: an intermediate layer's hidden state ``[..., H_w]`` (same leading dims as
            ``hidden``), the input of the weak head; gradients reach it.
        weak_weight: the weak head ``[V, H_w]`` (a trained linear head; may be ``weight`` itself
            when ``H_w = H``: the gradients add up).
        target: int64 next-token ids ``[...]``, values in ``[0, V)`` or ``ignore_index``; ignored
            tokens are left out of the loss and of the batch mean.
        bias: optional student head bias ``[V]``.  weak_bias: optional weak head bias ``[V]``.
        alpha: α ≥ 0, weight of ``L_t`` (default 1.0, USKD's ImageNet setting).
        beta: β ≥ 0, weight of ``L_non`` (default 0.1).
        mu: μ ≥ 0, weight of ``L_weak`` (default 0.005; CIFAR-100: 0.1).
        rank: ``"paper"`` (default: softmax in the rank score) or ``"official"`` (log-softmax).
        ce_weight: w ≥ 0, weight of the student's cross-entropy computed in the same pass (default 0;
            USKD's training objective is ``CE + USKD``, i.e. 1.0).
        ignore_index: an int, the label value whose tokens are left out (default -100).
        reduction: ``"mean"`` over non-ignored tokens, ``"sum"``, or ``"none"`` (``[...]``, ignored
            tokens 0; its backward recomputes the chunks).
        chunk_size: tokens per chunk; ``None`` → :func:`~nkd.losses.fused.default_chunk_size`.

    Returns:
        The loss in float32 (float64 for float64 input); 0 when no token is valid.
    """
    spec = USKD(alpha, beta, mu, rank)
    check_settings(spec, ce_weight, ignore_index, reduction, chunk_size, row_wise=False)
    if target is None:
        raise ValueError("target is required for USKD (the next-token ids [...], ignore_index allowed)")
    _check_head("hidden", hidden, "weight", weight, "bias", bias)
    _check_head("weak_hidden", weak_hidden, "weak_weight", weak_weight, "weak_bias", weak_bias)
    lead, vocab = hidden.shape[:-1], weight.shape[0]
    if weak_weight.shape[0] != vocab:
        raise ValueError(f"weak_weight must have the student's vocabulary size: weak_weight has V={weak_weight.shape[0]}, "
                         f"weight has V={vocab}")
    _check_lead("weak_hidden", weak_hidden, lead, "weak_hidden [..., H_w]")
    device = hidden.device
    _device_check(device, weight=weight, bias=bias, weak_hidden=weak_hidden, weak_weight=weak_weight, weak_bias=weak_bias,
                  target=target)
    t = _parse_target(target, lead, vocab, ignore_index)
    n = math.prod(lead)
    index, count, chunks = row_chunks(t, n, ignore_index, chunk_size or default_chunk_size(vocab), device)
    heads = (hidden.reshape(n, hidden.shape[-1]), weight, bias, weak_hidden.reshape(n, weak_hidden.shape[-1]), weak_weight,
             weak_bias)
    mm = (_mm_dtype(device, *(x for x in heads[:3] if x is not None)), _mm_dtype(device, *(x for x in heads[3:] if x is not None)))
    cdtype = compute_dtype(torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype),
                                               torch.promote_types(weak_hidden.dtype, weak_weight.dtype)))
    grad_on = torch.is_grad_enabled()
    want = tuple(grad_on and x is not None and x.requires_grad for x in heads)
    with torch.autocast(device_type=device.type, enabled=False):
        with torch.no_grad():
            head = _Head(*(None if x is None else x.detach() for x in heads[:3]), mm[0], (False, False, False))
            mean_sq = _batch_mean_sq(head, index, chunks, count, cdtype)
        plan = _USKDPlan(spec, float(ce_weight), index, chunks, count, mean_sq, cdtype, mm, reduction)
        out = _FusedLinearLossFn.apply(plan, want, *heads)
    return out.reshape(lead) if reduction == "none" else out


class FusedLinearUSKDLoss(nn.Module):
    """Token-level USKD with its own weak head, fused with the LM head and chunked (formulas in
    :func:`fused_linear_uskd_loss`): ``α·L_t + β·L_non + L_weak + ce_weight·CE``.

    Owns ``self.head = nn.Linear(in_features, vocab_size, bias=weak_bias)``, the weak head, applied
    to an intermediate layer's hidden state ``weak_hidden`` ``[..., in_features]`` (the demo:
    the middle decoder layer's output, through the model's final norm). Gradients reach the head
    and, through ``weak_hidden``, the model. Put ``self.parameters()`` in the optimizer.

    Args:
        in_features: H_w, the width of ``weak_hidden`` (an int ≥ 1).
        vocab_size: V, the LM head's rows (an int ≥ 2).
        alpha: α ≥ 0, weight of ``L_t`` (default 1.0).
        beta: β ≥ 0, weight of ``L_non`` (default 0.1).
        mu: μ ≥ 0, weight of ``L_weak`` (default 0.005).
        rank: ``"paper"`` (default) or ``"official"``, the rank score's form.
        ce_weight: w ≥ 0, weight of the student's cross-entropy (default 0; ``CE + USKD`` is 1.0).
        ignore_index: an int, the label value whose tokens are left out (default -100).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        chunk_size: tokens per chunk, or ``None`` (:func:`~nkd.losses.fused.default_chunk_size`).
        weak_bias: whether the weak head has a bias (default ``False``, as LM heads).
    """

    def __init__(self, in_features: int, vocab_size: int, alpha: float = 1.0, beta: float = 0.1, mu: float = 0.005,
                 rank: str = "paper", ce_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 chunk_size: int | None = None, weak_bias: bool = False):
        super().__init__()
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 2:
            raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
        check_settings(USKD(alpha, beta, mu, rank), ce_weight, ignore_index, reduction, chunk_size, row_wise=False)
        self.head = nn.Linear(in_features, vocab_size, bias=weak_bias)
        self.settings = dict(alpha=alpha, beta=beta, mu=mu, rank=rank, ce_weight=ce_weight, ignore_index=ignore_index,
                             reduction=reduction, chunk_size=chunk_size)

    def forward(self, hidden: Tensor, weight: Tensor, weak_hidden: Tensor, target: Tensor, bias: Tensor | None = None) -> Tensor:
        """The loss of the student (``hidden`` ``[..., H]``, LM head ``weight`` ``[V, H]``, optional
        ``bias`` ``[V]``) with this module's weak head on ``weak_hidden`` ``[..., in_features]``,
        for the next-token ids ``target`` ``[...]``."""
        return fused_linear_uskd_loss(hidden, weight, weak_hidden, self.head.weight, target, bias=bias,
                                      weak_bias=self.head.bias, **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items() if k not in ("ignore_index", "chunk_size"))
