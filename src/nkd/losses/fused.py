r"""Token-level NKD and KD for language models, fused with the LM head and chunked over tokens.

For ``N`` tokens with student hidden states ``h`` ``[N, H]``, LM head ``W`` ``[V, H]`` (bias
``b``), and a teacher, the loss equals :func:`~nkd.losses.nkd_loss` / :func:`~nkd.losses.kd_loss`
on the materialized logits ``z = h Wᵀ + b`` — value and gradients w.r.t. ``h``, ``W``, ``b`` —
but the ``[N, V]`` logits are never held whole. Rows are processed ``chunk_size`` at a time;
for each chunk the per-row loss and its analytic gradient ``G = ∂L/∂z`` ``[chunk, V]`` (already
scaled by the reduction weight) are formed and immediately folded into

.. math::

    \partial L/\partial h_{chunk} = G\,W,\qquad
    \partial L/\partial W \mathrel{+}= G^\top h_{chunk},\qquad
    \partial L/\partial b \mathrel{+}= \textstyle\sum_{rows} G

inside the forward pass; backward only scales these by the incoming scalar gradient. Peak extra
memory is ``O(chunk_size × V)`` plus the gradients themselves (``[N, H]``, ``[V, H]``).

Per row (target ``t``, student logits ``z``, teacher logits ``u``, ``w = ce_weight``):

.. math::

    \mathrm{NKD} = -(T_t + w)\log S_t \;-\; \gamma\lambda^2\sum_{i\ne t}\hat T_i\log\hat S_i,
    \qquad
    \mathrm{KD} = \lambda^2\,\mathrm{KL}(T^\lambda\|S^\lambda) - w\log S_t

(the formulas of :mod:`nkd.losses.nkd` and :mod:`nkd.losses.kd`; the ``w`` term is the student's
cross-entropy with the hard label, computed in the same pass).

Teachers, exactly one of:

* ``teacher_hidden`` ``[..., H_t]`` + ``teacher_weight`` ``[V, H_t]`` (+ ``teacher_bias``): the
  teacher's logits are formed chunk by chunk too (its width ``H_t`` may differ from ``H``);
* ``teacher_logits`` ``[..., V]``: precomputed dense logits (read one chunk at a time);
* ``teacher_topk = (ids, logprobs)`` ``[..., k]``: a sparse teacher, the ``k`` token ids and
  their log-probabilities under the full teacher softmax (what offline teacher caches store).
  With ``m = Σ_{i∈K} p_i`` the stored mass, the teacher is the log-probability vector ``ũ``:

  - ``topk_rest="zero"``: mass outside ``K`` is zero, ``ũ_i = log p_i`` on ``K``, ``−∞`` elsewhere;
    as logits this is the top-k distribution renormalized, ``T_i = p_i / m`` on ``K``;
  - ``topk_rest="uniform"``: the missing mass ``r = 1 − m`` is spread evenly over the ``V − k``
    other tokens, ``ũ_i = log(r / (V − k))`` for ``i ∉ K`` (``r`` is clamped to the smallest
    positive normal number, so a top-k set holding all the mass stays well defined);

  and the dense loss is applied to ``ũ``. For NKD, ``T̂`` renormalizes over the non-target
  tokens, so with ``"zero"`` it is ``p_i / Σ_{j∈K, j≠t} p_j`` on ``K∖{t}``, and ``T_t = 0`` when
  the target is not among the top-k (``"uniform"``: ``T_t = r/(V−k)``). ``"zero"`` needs
  ``k ≥ 2`` for NKD (otherwise ``K∖{t}`` can be empty). Both equal the dense loss when ``k = V``;
  ``"uniform"`` also equals it whenever the teacher's logits are equal outside ``K``.

Teacher tensors are treated as constants: they are detached, whether or not they require grad
(compute the teacher under ``torch.no_grad()`` to avoid keeping its graph).

Precision: logits are formed by the matmul in the inputs' dtype (the autocast dtype under
autocast, as ``F.linear`` would) and the loss maths runs in float32 (float64 stays float64);
``∂L/∂W`` and ``∂L/∂b`` are accumulated over chunks in float32 (float64), and every gradient
comes back in its input's dtype. float16 gradients are held in float32 until backward has applied
the incoming gradient, so a loss scale (``GradScaler``'s 2**16) neither overflows nor underflows
them. The losses are once differentiable: backward with ``create_graph=True`` raises.

Hard integer labels only (``target`` ``[...]``, ``ignore_index`` rows left out of the mean). The
default ``chunk_size`` keeps one ``[chunk, V]`` float32 buffer near 32 MiB:
``max(1, 2**23 // V)`` rows (262 rows at ``V = 32000``, 65 at ``V = 128256``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import _common
from ._common import check_ignore_index, check_nonnegative, check_positive, check_reduction, compute_dtype
from .kd import _kd_rows
from .nkd import _nkd_rows

__all__ = [
    "fused_linear_nkd_loss",
    "fused_linear_kd_loss",
    "FusedLinearNKDLoss",
    "FusedLinearKDLoss",
    "TOPK_REST",
    "default_chunk_size",
]

TOPK_REST = ("zero", "uniform")
_CHUNK_ELEMENTS = 2**23  # one [chunk, V] float32 buffer ≈ 32 MiB
_LOGPROB_TOL = 1e-4  # stored log-probabilities may exceed 0 by rounding
_MASS_TOL = 1e-3  # and their probabilities may sum slightly above 1


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk when ``chunk_size=None``: ``max(1, 2**23 // V)`` (≈ 32 MiB per float32 buffer)."""
    return max(1, _CHUNK_ELEMENTS // max(int(vocab_size), 1))


# ----------------------------------------------------------------------------- validation
def _check_float(name: str, x: object, dims: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor {dims}, got dtype {x.dtype}")


def _check_head(hidden_name: str, hidden: Tensor, weight_name: str, weight: Tensor, bias_name: str, bias: Tensor | None) -> None:
    _check_float(hidden_name, hidden, "[..., H]")
    _check_float(weight_name, weight, "[V, H]")
    if hidden.dim() < 1:
        raise ValueError(f"{hidden_name} must have shape [..., H], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must have shape [V, H], got {tuple(weight.shape)}")
    if weight.shape[0] < 2:
        raise ValueError(f"{weight_name} must have at least 2 rows (vocabulary entries), got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{weight_name} [V, H] must match the width of {hidden_name} [..., H]: "
            f"{weight_name} has H={weight.shape[1]}, {hidden_name} has H={hidden.shape[-1]}"
        )
    if bias is not None:
        _check_float(bias_name, bias, "[V]")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{bias_name} must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")


def _check_lead(name: str, x: Tensor, lead: torch.Size, what: str) -> None:
    if x.shape[:-1] != lead:
        raise ValueError(
            f"{name} must have leading shape {tuple(lead)} (the leading dims of hidden), "
            f"got {tuple(x.shape)} ({what})"
        )


def _check_devices(device: torch.device, **tensors) -> None:
    """Every tensor argument must live on ``hidden``'s device."""
    for name, x in tensors.items():
        parts = x if name == "teacher_topk" and isinstance(x, (tuple, list)) else (x,)
        for part in parts:
            if isinstance(part, Tensor) and part.device != device:
                raise ValueError(f"{name} must be on hidden's device {device}, got {part.device}")


def _check_chunk_size(chunk_size: object) -> None:
    if chunk_size is None:
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _parse_target(target: Tensor | None, lead: torch.Size, vocab: int, ignore_index: int) -> Tensor | None:
    """Flat int64 labels ``[N]`` (``ignore_index`` kept), validated against ``[0, V)``."""
    if target is None:
        return None
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor of int64 token ids, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer token ids (hard labels only), got dtype {target.dtype}")
    if target.shape != lead:
        raise ValueError(f"target must have shape {tuple(lead)} (the leading dims of hidden), got {tuple(target.shape)}")
    t = target.detach().reshape(-1).long()
    if t.numel() and _common._VALUE_CHECKS[0]:
        bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
        if bool(bad.any()):
            raise ValueError(
                f"target token ids must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {int(t[bad][0])}"
            )
    return t


# ----------------------------------------------------------------------------- teachers
def _take(x: Tensor, sel: slice | Tensor) -> Tensor:
    return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)


def _mm_dtype(device: torch.device, *tensors: Tensor) -> torch.dtype:
    """Matmul dtype: the autocast dtype under autocast (float64 never cast down), else promotion."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    if dtype != torch.float64 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _linear(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return h @ w.t() if b is None else torch.addmm(b, h, w.t())


@dataclass
class _LinearTeacher:
    hidden: Tensor  # [N, H_t]
    weight: Tensor  # [V, H_t], in the matmul dtype
    bias: Tensor | None

    def rows(self, sel: slice | Tensor, dtype: torch.dtype) -> Tensor:
        h = _take(self.hidden, sel).to(self.weight.dtype)
        return _linear(h, self.weight, self.bias).to(dtype)


@dataclass
class _DenseTeacher:
    logits: Tensor  # [N, V]

    def rows(self, sel: slice | Tensor, dtype: torch.dtype) -> Tensor:
        return _take(self.logits, sel).to(dtype)


@dataclass
class _TopKTeacher:
    ids: Tensor  # [N, k] int64
    logprobs: Tensor  # [N, k]
    vocab: int
    rest: str

    def rows(self, sel: slice | Tensor, dtype: torch.dtype) -> Tensor:
        ids = _take(self.ids, sel)
        lp = _take(self.logprobs, sel).to(dtype)
        c, k = ids.shape
        if self.rest == "zero" or k == self.vocab:
            u = torch.full((c, self.vocab), float("-inf"), dtype=dtype, device=lp.device)
        else:
            # log r with r = 1 - sum_K p, computed as log(-expm1(logsumexp)) and clamped to tiny
            lse = torch.logsumexp(lp, dim=-1).clamp(max=0.0)
            log_r = torch.log((-torch.expm1(lse)).clamp(min=torch.finfo(dtype).tiny))
            fill = log_r - math.log(self.vocab - k)
            u = fill[:, None].expand(c, self.vocab).clone()
        return u.scatter_(1, ids, lp)


def _build_teacher(
    lead: torch.Size,
    vocab: int,
    device: torch.device,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_logits: Tensor | None,
    teacher_topk: tuple[Tensor, Tensor] | None,
    topk_rest: str,
    min_k: int,
):
    given = [
        name
        for name, ok in (
            ("teacher_hidden/teacher_weight", teacher_hidden is not None or teacher_weight is not None),
            ("teacher_logits", teacher_logits is not None),
            ("teacher_topk", teacher_topk is not None),
        )
        if ok
    ]
    if len(given) != 1:
        raise ValueError(
            "give exactly one teacher: teacher_hidden + teacher_weight, teacher_logits, or teacher_topk=(ids, logprobs); "
            f"got {given or 'none'}"
        )
    if given[0].startswith("teacher_hidden"):
        if teacher_hidden is None or teacher_weight is None:
            missing = "teacher_weight" if teacher_weight is None else "teacher_hidden"
            raise ValueError(f"{missing} is required together with {'teacher_hidden' if missing == 'teacher_weight' else 'teacher_weight'}")
        _check_head("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
        if teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"teacher_weight must have the student's vocabulary size: teacher_weight has V={teacher_weight.shape[0]}, "
                f"weight has V={vocab}"
            )
        _check_lead("teacher_hidden", teacher_hidden, lead, "teacher_hidden [..., H_t]")
        mm = _mm_dtype(device, teacher_hidden, teacher_weight, *(() if teacher_bias is None else (teacher_bias,)))
        tb = None if teacher_bias is None else teacher_bias.detach().to(mm)
        return _LinearTeacher(teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach().to(mm), tb)
    if teacher_bias is not None:
        raise ValueError("teacher_bias is only used with teacher_hidden + teacher_weight")
    if teacher_logits is not None:
        _check_float("teacher_logits", teacher_logits, "[..., V]")
        if teacher_logits.dim() < 1 or teacher_logits.shape[-1] != vocab:
            raise ValueError(
                f"teacher_logits must have the student's vocabulary size in its last dim: teacher_logits has "
                f"V={teacher_logits.shape[-1] if teacher_logits.dim() else 'none'}, weight has V={vocab}"
            )
        _check_lead("teacher_logits", teacher_logits, lead, "teacher_logits [..., V]")
        return _DenseTeacher(teacher_logits.detach().reshape(-1, vocab))
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk must be a pair (ids [..., k] int64, logprobs [..., k] float)")
    ids, lp = teacher_topk
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"teacher_topk ids must be an integer tensor [..., k], got {getattr(ids, 'dtype', type(ids).__name__)}")
    _check_float("teacher_topk logprobs", lp, "[..., k]")
    if ids.shape != lp.shape:
        raise ValueError(f"teacher_topk ids and logprobs must have the same shape, got {tuple(ids.shape)} vs {tuple(lp.shape)}")
    if ids.dim() < 1:
        raise ValueError("teacher_topk ids must have shape [..., k], got a scalar")
    _check_lead("teacher_topk ids", ids, lead, "teacher_topk [..., k]")
    k = ids.shape[-1]
    if not min_k <= k <= vocab:
        raise ValueError(f"teacher_topk needs {min_k} <= k <= V={vocab} entries per token (topk_rest={topk_rest!r}), got k={k}")
    ids2 = ids.detach().reshape(-1, k).long()
    lp2 = lp.detach().reshape(-1, k)
    if ids2.numel() and _common._VALUE_CHECKS[0]:
        if bool(((ids2 < 0) | (ids2 >= vocab)).any()):
            raise ValueError(f"teacher_topk ids must lie in [0, {vocab})")
        srt = ids2.sort(dim=-1).values
        if k > 1 and bool((srt[:, 1:] == srt[:, :-1]).any()):
            raise ValueError("teacher_topk ids must be distinct within each token's top-k set")
        lpf = lp2.to(compute_dtype(lp2.dtype))
        if not bool(torch.isfinite(lpf).all()) or bool((lpf > _LOGPROB_TOL).any()):
            raise ValueError("teacher_topk logprobs must be finite log-probabilities (<= 0)")
        mass = torch.logsumexp(lpf, dim=-1).exp().max()
        if float(mass) > 1 + _MASS_TOL:
            raise ValueError(f"teacher_topk probabilities must sum to at most 1 per token; the largest sum is {float(mass):.4g}")
    return _TopKTeacher(ids2, lp2, vocab, topk_rest)


# ----------------------------------------------------------------------------- the chunk loop
@dataclass
class _Plan:
    """Everything the chunk loop needs besides the differentiable tensors."""

    rows_fn: Callable  # (z, u, idx, valid=None, need_grad) -> (loss [c], grad [c, V] | None)
    teacher: object
    index: Tensor  # [N] class index per row (0 where ignored)
    chunks: list  # slices (all rows valid) or index tensors into the N rows
    count: int  # valid rows
    cdtype: torch.dtype  # loss maths dtype
    mm_dtype: torch.dtype  # student matmul dtype
    reduction: str


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype a gradient is held in until backward: float16 (max 65504, normal down to 6e-5) cannot
    hold a ``1/N``-scaled gradient nor an upstream loss scale, so its gradients stay float32."""
    return torch.float32 if dtype == torch.float16 else dtype


def _chunk_pass(plan: _Plan, hidden: Tensor, weight: Tensor, bias: Tensor | None, scale, want: tuple[bool, bool, bool]):
    """Run every chunk: per-row losses ``[N]`` and the gradients scaled by ``scale``
    (``∂L/∂h = s·(G W)``, ``∂L/∂W += Gᵀ (s·h)``, ``∂L/∂b += sᵀ G``, so ``G`` itself is never scaled).

    ``scale`` is a float (mean/sum) or a ``[N]`` tensor (per-row weights, for reduction "none").
    The gradients come back in :func:`_grad_dtype` of their inputs' dtypes (the caller casts).
    """
    n, v = hidden.shape[0], weight.shape[0]
    want_h, want_w, want_b = want
    need_grad = any(want)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w_mm = weight.to(plan.mm_dtype)
    b_mm = None if bias is None else bias.to(plan.mm_dtype)
    per_row = torch.zeros(n, dtype=plan.cdtype, device=hidden.device)
    gh = torch.zeros(hidden.shape, dtype=_grad_dtype(hidden.dtype), device=hidden.device) if want_h else None
    gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
    gb = torch.zeros(v, dtype=acc, device=weight.device) if want_b else None
    for sel in plan.chunks:
        h = _take(hidden, sel).to(plan.mm_dtype)
        z = _linear(h, w_mm, b_mm).to(plan.cdtype)
        u = plan.teacher.rows(sel, plan.cdtype)
        idx = _take(plan.index, sel)
        loss, g = plan.rows_fn(z, u, idx, None, need_grad)  # ignored rows are never in a chunk
        del z, u
        if isinstance(sel, slice):
            per_row[sel] = loss
        else:
            per_row.index_copy_(0, sel, loss)
        if g is None:
            continue
        # the reduction weight is applied to the small products, not to g [chunk, V] (one pass less)
        if isinstance(scale, Tensor):
            rs = _take(scale, sel).to(g.dtype)  # per-row weights (reduction "none")
            if want_b:
                gb.add_(rs @ g)
            g = g.to(plan.mm_dtype)
            if want_h:
                gh_rows = (g @ w_mm).to(gh.dtype).mul_(rs[:, None].to(gh.dtype))
            if want_w:
                h = h * rs[:, None].to(h.dtype)
            alpha = 1.0
        else:
            alpha = float(scale)
            if want_b:
                gb.add_(g.sum(0), alpha=alpha)
            g = g.to(plan.mm_dtype)
            if want_h:
                gh_rows = (g @ w_mm).to(gh.dtype).mul_(alpha)  # 1/N applied outside float16
        if want_h:
            if isinstance(sel, slice):
                gh[sel] = gh_rows
            else:
                gh.index_copy_(0, sel, gh_rows)
        if want_w:
            if g.dtype == acc:
                gw.addmm_(g.t(), h, alpha=alpha)
            else:
                gw.add_(g.t() @ h, alpha=alpha)
        del g
    gw = None if gw is None else gw.to(_grad_dtype(weight.dtype))
    gb = None if gb is None else gb.to(_grad_dtype(bias.dtype))
    return per_row, gh, gw, gb


class _FusedLinearLossFn(torch.autograd.Function):
    """Loss of ``hidden @ weight.T + bias`` without the logits; gradients formed in forward
    (mean/sum) or recomputed chunk by chunk in backward with per-row weights ("none")."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, plan: _Plan, want: tuple[bool, bool, bool]):  # noqa: D102
        ctx.plan, ctx.want = plan, want
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        if plan.reduction == "none":
            per_row, *_ = _chunk_pass(plan, hidden, weight, bias, 1.0, (False, False, False))
            ctx.save_for_backward(hidden, weight, bias)
            return per_row
        denom = max(plan.count, 1) if plan.reduction == "mean" else 1
        per_row, gh, gw, gb = _chunk_pass(plan, hidden, weight, bias, 1.0 / denom, want)
        ctx.save_for_backward(gh, gw, gb)
        return per_row.sum() / denom

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        if torch.is_grad_enabled():
            # create_graph=True: the gradients below have no graph of their own, so a gradient penalty
            # would silently add nothing (once_differentiable only guards an incoming g requiring grad)
            raise RuntimeError(
                "the fused LM losses are once differentiable: backward with create_graph=True (double backward, "
                "gradient penalties) is not supported; use nkd_loss / kd_loss on materialized logits for that"
            )
        if ctx.plan.reduction == "none":
            hidden, weight, bias = ctx.saved_tensors
            _, *grads = _chunk_pass(ctx.plan, hidden, weight, bias, g, ctx.want)
        else:
            grads = [None if x is None else x * g.to(x.dtype) for x in ctx.saved_tensors]
        return tuple(None if x is None else x.to(dt) for x, dt in zip(grads, ctx.dtypes)) + (None, None)


def _fused_loss(
    rows_fn: Callable,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor | None,
    teacher_args: dict,
    ignore_index: int,
    reduction: str,
    chunk_size: int | None,
    min_k: int,
) -> Tensor:
    """Validate, plan the chunks, and run the fused loss."""
    _check_common(teacher_args["topk_rest"], ignore_index, reduction, chunk_size)
    _check_head("hidden", hidden, "weight", weight, "bias", bias)
    lead, h_dim, vocab = hidden.shape[:-1], hidden.shape[-1], weight.shape[0]
    device = hidden.device
    _check_devices(device, weight=weight, bias=bias, target=target, **teacher_args)
    t = _parse_target(target, lead, vocab, ignore_index)
    teacher = _build_teacher(lead, vocab, device, **teacher_args, min_k=min_k)
    n = math.prod(lead)
    if t is None:
        valid_idx, count = None, n
        index = torch.zeros(n, dtype=torch.long, device=device)
    else:
        valid = t != ignore_index
        index = torch.where(valid, t, torch.zeros_like(t))
        count = int(valid.sum())
        valid_idx = None if count == n else valid.nonzero().squeeze(1)
    cs = chunk_size or default_chunk_size(vocab)
    if valid_idx is None:
        chunks = [slice(s, min(s + cs, n)) for s in range(0, n, cs)]
    else:
        chunks = [valid_idx[s : s + cs] for s in range(0, count, cs)]
    plan = _Plan(
        rows_fn=rows_fn,
        teacher=teacher,
        index=index,
        chunks=chunks,
        count=count,
        cdtype=compute_dtype(torch.promote_types(hidden.dtype, weight.dtype)),
        mm_dtype=_mm_dtype(device, hidden, weight, *(() if bias is None else (bias,))),
        reduction=reduction,
    )
    grad_on = torch.is_grad_enabled()
    want = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad)
    with torch.autocast(device_type=device.type, enabled=False):
        out = _FusedLinearLossFn.apply(hidden.reshape(n, h_dim), weight, bias, plan, want)
    return out.reshape(lead) if reduction == "none" else out


# ----------------------------------------------------------------------------- public API
def fused_linear_nkd_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    target: Tensor | None = None,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    ce_weight: float = 0.0,
    bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    topk_rest: str = "zero",
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Token-level NKD (+ optional cross-entropy) on ``hidden @ weight.T + bias``, chunked.

    Equals ``nkd_loss(z, u, target, temperature=λ, gamma=γ) + ce_weight · CE(z, target)`` on the
    materialized logits ``z`` (module docstring for the maths, the teacher kinds and the
    sparse-teacher definitions) without ever holding ``z`` ``[N, V]`` whole.

    Args:
        hidden: student's last hidden states ``[..., H]`` (e.g. ``[B, T, H]``).
        weight: student LM head ``[V, H]``.
        teacher_hidden, teacher_weight: teacher hidden states ``[..., H_t]`` and head ``[V, H_t]``.
        target: int64 next-token ids ``[...]`` (required; ``ignore_index`` rows left out).
        temperature: λ > 0 of the non-target term.  gamma: γ ≥ 0.  ce_weight: w ≥ 0.
        bias, teacher_bias: optional head biases ``[V]``.
        teacher_logits: precomputed teacher logits ``[..., V]`` instead of hidden + head.
        teacher_topk: ``(ids, logprobs)`` ``[..., k]``, a sparse teacher; ``topk_rest`` in
            ``{"zero", "uniform"}`` says where the mass outside the top-k goes (``k ≥ 2``).
        ignore_index: label value whose rows are left out.
        reduction: ``"mean"`` over non-ignored rows, ``"sum"``, or ``"none"`` (``[...]``, ignored
            rows 0; its backward recomputes the logits chunk by chunk, ≈ 1.5× the time).
        chunk_size: rows per chunk; ``None`` → :func:`default_chunk_size`.

    Returns:
        The loss in float32 (float64 for float64 input); 0 when no row is valid.
    """
    check_positive("temperature", temperature)
    check_nonnegative("gamma", gamma)
    check_nonnegative("ce_weight", ce_weight)
    if target is None:
        raise ValueError("target is required for NKD (the next-token ids [...], ignore_index allowed)")
    rows_fn = functools.partial(_nkd_rows_fn, lam=float(temperature), gamma=float(gamma), ce_weight=float(ce_weight))
    teacher_args = dict(
        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        teacher_logits=teacher_logits, teacher_topk=teacher_topk, topk_rest=topk_rest,
    )
    min_k = 2 if topk_rest == "zero" else 1
    return _fused_loss(rows_fn, hidden, weight, bias, target, teacher_args, ignore_index, reduction, chunk_size, min_k)


def fused_linear_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    target: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    topk_rest: str = "zero",
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Token-level KD ``λ²·KL(T^λ ‖ S^λ)`` (+ optional cross-entropy) on ``hidden @ weight.T + bias``, chunked.

    Equals ``kd_loss(z, u, target, temperature=λ) + ce_weight · CE(z, target)`` on the
    materialized logits. ``target`` is optional: KD uses it only to leave out ``ignore_index``
    rows (and for the cross-entropy, which needs it). The default temperature is 1 (forward KL,
    the usual choice for language models), not :func:`~nkd.losses.kd_loss`'s 4.

    Per token with teacher/student softmax ``T^λ``/``S^λ`` at temperature λ and ``w = ce_weight``::

        L = λ²·Σ_i T^λ_i (log T^λ_i − log S^λ_i) − w·log S_t,   ∂L/∂z = λ(S^λ − T^λ) + w(S − e_t)

    Args:
        hidden: student's last hidden states ``[..., H]``.  weight: student LM head ``[V, H]``.
        teacher_hidden, teacher_weight: teacher hidden states ``[..., H_t]`` and head ``[V, H_t]``
            (constants: detached).
        target: int64 next-token ids ``[...]``; optional unless ``ce_weight > 0``; ``ignore_index``
            rows are left out.
        temperature: λ > 0 (default 1.0).  ce_weight: w ≥ 0 (default 0: KD alone).
        bias, teacher_bias: optional head biases ``[V]``.
        teacher_logits: precomputed teacher logits ``[..., V]`` instead of hidden + head.
        teacher_topk: ``(ids, logprobs)`` ``[..., k]``, a sparse teacher; ``topk_rest`` in
            ``{"zero", "uniform"}`` says where the mass outside the top-k goes (any ``k ≥ 1``).
        ignore_index: label value whose rows are left out.
        reduction: ``"mean"`` over non-ignored rows, ``"sum"``, or ``"none"`` (``[...]``).
        chunk_size: rows per chunk; ``None`` → :func:`default_chunk_size`.

    Returns:
        The loss in float32 (float64 for float64 input); 0 when no row is valid.
    """
    check_positive("temperature", temperature)
    check_nonnegative("ce_weight", ce_weight)
    if ce_weight and target is None:
        raise ValueError("target is required when ce_weight > 0 (the cross-entropy needs the next-token ids)")
    rows_fn = functools.partial(_kd_rows_fn, lam=float(temperature), ce_weight=float(ce_weight))
    teacher_args = dict(
        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        teacher_logits=teacher_logits, teacher_topk=teacher_topk, topk_rest=topk_rest,
    )
    return _fused_loss(rows_fn, hidden, weight, bias, target, teacher_args, ignore_index, reduction, chunk_size, 1)


def _nkd_rows_fn(z, u, idx, valid, need_grad, *, lam, gamma, ce_weight):
    return _nkd_rows(z, u, idx, valid, lam, gamma, need_grad, ce_weight=ce_weight)


def _kd_rows_fn(z, u, idx, valid, need_grad, *, lam, ce_weight):
    return _kd_rows(z, u, idx, valid, lam, need_grad, ce_weight=ce_weight)


class FusedLinearNKDLoss(nn.Module):
    """Module form of :func:`fused_linear_nkd_loss`: token-level ``NKD + w·CE`` on
    ``hidden @ weight.T``, chunked, with fixed hyper-parameters (no parameters are learned).

    Per token: ``−(T_t + w)·log S_t − γλ²·Σ_{i≠t} T̂_i log Ŝ_i``.

    Args:
        temperature: λ > 0 of the non-target term (default 1.0).
        gamma: γ ≥ 0, weight of the non-target term (default 1.5).
        ce_weight: w ≥ 0, weight of the student's cross-entropy computed in the same pass
            (default 0; NKD's usual objective is ``ce_weight=1.0``).
        topk_rest: ``"zero"`` or ``"uniform"``: the mass outside a sparse top-k teacher.
        ignore_index: label value whose rows are left out (default -100).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        chunk_size: rows per chunk; ``None`` → :func:`default_chunk_size`.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        gamma: float = 1.5,
        ce_weight: float = 0.0,
        topk_rest: str = "zero",
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ):
        super().__init__()
        check_positive("temperature", temperature)
        check_nonnegative("gamma", gamma)
        check_nonnegative("ce_weight", ce_weight)
        _check_common(topk_rest, ignore_index, reduction, chunk_size)
        self.temperature, self.gamma, self.ce_weight = float(temperature), float(gamma), float(ce_weight)
        self.topk_rest, self.ignore_index, self.reduction, self.chunk_size = topk_rest, ignore_index, reduction, chunk_size

    def forward(self, hidden, weight, teacher_hidden=None, teacher_weight=None, target=None, **teacher) -> Tensor:
        """The loss of the student (``hidden`` ``[..., H]``, LM head ``weight`` ``[V, H]``) against the
        teacher (``teacher_hidden`` ``[..., H_t]`` + ``teacher_weight`` ``[V, H_t]``, or, in
        ``teacher``, ``teacher_logits`` / ``teacher_topk``; ``bias`` and ``teacher_bias`` go there
        too) for the next-token ids ``target`` ``[...]``."""
        return fused_linear_nkd_loss(
            hidden, weight, teacher_hidden, teacher_weight, target, temperature=self.temperature, gamma=self.gamma,
            ce_weight=self.ce_weight, topk_rest=self.topk_rest, ignore_index=self.ignore_index,
            reduction=self.reduction, chunk_size=self.chunk_size, **teacher,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}, ce_weight={self.ce_weight}, reduction={self.reduction!r}"


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fused_linear_kd_loss`: token-level ``λ²·KL(T^λ ‖ S^λ) + w·CE`` on
    ``hidden @ weight.T``, chunked, with fixed hyper-parameters (no parameters are learned).

    Args:
        temperature: λ > 0 (default 1.0, forward KL).
        ce_weight: w ≥ 0, weight of the student's cross-entropy computed in the same pass (default 0).
        topk_rest: ``"zero"`` or ``"uniform"``: the mass outside a sparse top-k teacher.
        ignore_index: label value whose rows are left out (default -100).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        chunk_size: rows per chunk; ``None`` → :func:`default_chunk_size`.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        topk_rest: str = "zero",
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ):
        super().__init__()
        check_positive("temperature", temperature)
        check_nonnegative("ce_weight", ce_weight)
        _check_common(topk_rest, ignore_index, reduction, chunk_size)
        self.temperature, self.ce_weight = float(temperature), float(ce_weight)
        self.topk_rest, self.ignore_index, self.reduction, self.chunk_size = topk_rest, ignore_index, reduction, chunk_size

    def forward(self, hidden, weight, teacher_hidden=None, teacher_weight=None, target=None, **teacher) -> Tensor:
        """The loss of the student (``hidden`` ``[..., H]``, LM head ``weight`` ``[V, H]``) against the
        teacher (``teacher_hidden`` ``[..., H_t]`` + ``teacher_weight`` ``[V, H_t]``, or, in
        ``teacher``, ``teacher_logits`` / ``teacher_topk``; ``bias`` and ``teacher_bias`` go there
        too) for the next-token ids ``target`` ``[...]``."""
        return fused_linear_kd_loss(
            hidden, weight, teacher_hidden, teacher_weight, target, temperature=self.temperature,
            ce_weight=self.ce_weight, topk_rest=self.topk_rest, ignore_index=self.ignore_index,
            reduction=self.reduction, chunk_size=self.chunk_size, **teacher,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ce_weight={self.ce_weight}, reduction={self.reduction!r}"


def _check_common(topk_rest: str, ignore_index: int, reduction: str, chunk_size: int | None) -> None:
    if topk_rest not in TOPK_REST:
        raise ValueError(f"topk_rest must be one of {TOPK_REST}, got {topk_rest!r}")
    check_ignore_index(ignore_index)
    check_reduction(reduction)
    _check_chunk_size(chunk_size)
