"""Shared input handling for every loss: shape/dtype/range validation, label parsing, reduction.

All losses accept logits ``[..., C]`` and targets that are either hard labels (int64 ``[...]``)
or soft labels (float ``[..., C]``, rows summing to 1). They flatten to ``[M, C]`` rows, compute
one loss per row in float32 (float64 stays float64) with autocast disabled, and reduce:

* ``"mean"``: ``Σ_valid loss_r / #valid`` (0 when no row is valid, never NaN),
* ``"sum"``: ``Σ_valid loss_r``,
* ``"none"``: the per-row losses with the leading shape ``[...]``; ignored rows are 0.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")
SOFT_LABEL_TOL = 1e-3
_VALUE_CHECKS: ContextVar[bool] = ContextVar("nkd_value_checks", default=True)


def value_checks_enabled() -> bool:
    """Whether the value checks of label tensors run in this context (see :func:`value_checks`)."""
    return _VALUE_CHECKS.get()


@contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the *value* checks of label tensors (range, soft rows summing to 1) on (``enabled=True``)
    or off (``enabled=False``) inside a ``with`` block; the previous state returns on exit.

    Shape/dtype/parameter checks always run. Value checks read tensor contents, which on a GPU
    forces a host-device synchronization per call; a training loop that has validated its data
    (the nkd Trainer checks the first batch of every epoch) can switch them off in its hot path.
    """
    token = _VALUE_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


@dataclass
class Rows:
    """Flattened view of a batch: ``logits`` ``[M, C]`` plus parsed labels.

    ``index`` holds the class index of each row (argmax for soft labels; 0 for ignored rows so
    it is always safe to gather with), ``valid`` marks rows that take part in the loss, and
    ``soft`` holds the soft label rows (``None`` for hard labels).
    """

    logits: Tensor
    index: Tensor
    valid: Tensor
    soft: Tensor | None
    lead_shape: torch.Size

    @property
    def num_classes(self) -> int:
        return self.logits.shape[-1]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(t: Tensor) -> AbstractContextManager:
    """Disable autocast for the device type of ``t`` so the loss maths stays in float32."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def check_logits(name: str, logits: Tensor, min_classes: int = 2) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [..., C], got dtype {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{name} must have shape [..., C], got a scalar")
    if logits.shape[-1] < min_classes:
        raise ValueError(
            f"{name} must have at least {min_classes} classes in its last dimension, "
            f"got shape {tuple(logits.shape)}"
        )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(name: str, value: float) -> None:
    """``value`` must be a finite number > 0 (inf and NaN are refused: they give NaN/inf losses)."""
    if not _is_number(value) or not value > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    """``value`` must be a finite number >= 0."""
    if not _is_number(value) or not value >= 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> None:
    """``value`` must be a finite number in the interval ``[lo, hi)`` (openness per flag)."""
    ok = _is_number(value) and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def parse_rows(logits: Tensor, target: Tensor, ignore_index: int = -100, name: str = "logits") -> Rows:
    """Validate ``target`` against ``logits`` ``[..., C]`` and flatten both to rows.

    Hard labels: integer tensor with shape ``logits.shape[:-1]``, values in ``[0, C)`` or
    ``ignore_index``. Soft labels: floating tensor with the shape of ``logits``, entries ≥ 0 and
    rows summing to 1 within ``1e-3``.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    c = logits.shape[-1]
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, c)
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"soft target must have the shape of {name} {tuple(logits.shape)} ([..., C]), "
                f"got {tuple(target.shape)}"
            )
        soft = target.detach().reshape(-1, c).to(compute_dtype(logits.dtype))
        if soft.numel() and _VALUE_CHECKS.get():
            if bool((soft < 0).any()) or not bool(torch.isfinite(soft).all()):
                raise ValueError("soft target rows must be finite and non-negative")
            err = (soft.sum(-1) - 1).abs().max()
            if float(err) > SOFT_LABEL_TOL:
                raise ValueError(
                    f"soft target rows must sum to 1 (±{SOFT_LABEL_TOL}); worst row is off by {float(err):.3g}"
                )
        index = soft.argmax(-1)  # first index on ties
        valid = torch.ones(flat.shape[0], dtype=torch.bool, device=logits.device)
        return Rows(flat, index, valid, soft, lead)
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must be int64 class indices or float soft labels, got dtype {target.dtype}")
    t = hard_labels(target, lead, c, ignore_index, of="hard target", lead_of=f"{name} {tuple(logits.shape)}")
    valid = t != ignore_index
    index = torch.where(valid, t, torch.zeros_like(t))
    return Rows(flat, index, valid, None, lead)


def hard_labels(target: Tensor, lead: torch.Size, num_classes: int, ignore_index: int, *, of: str = "target",
                lead_of: str = "logits", what: str = "labels") -> Tensor:
    """Flat int64 labels ``[M]`` of an integer ``target``, checked once for every loss (dense and
    fused): shape ``lead`` (the leading dims of ``lead_of``), values in ``[0, num_classes)`` or
    ``ignore_index`` (the value check is skipped inside ``value_checks(False)``)."""
    if target.shape != lead:
        raise ValueError(f"{of} must have shape {tuple(lead)} (the leading dims of {lead_of}), got {tuple(target.shape)}")
    t = target.detach().reshape(-1).long()
    if t.numel() and _VALUE_CHECKS.get():
        bad = (t != ignore_index) & ((t < 0) | (t >= num_classes))
        if bool(bad.any()):
            raise ValueError(f"target {what} must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; "
                             f"found {int(t[bad][0])}")
    return t


def kl_terms(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise ``p (log p - log q)`` with ``0·log 0 = 0``: no NaN where ``p`` underflows to 0
    (a confident teacher) or where ``log q`` is −inf on a column that ``p`` leaves out."""
    p = log_p.exp()
    keep = p > 0
    zero = torch.zeros_like(log_q)
    return p * (torch.where(keep, log_p, zero) - torch.where(keep, log_q, zero))


def log_softmax_without(x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Log-softmax over the columns of ``x`` ``[M, C]`` not in ``idx`` ``[M, k]`` (−inf on those),
    and ``logsumexp`` over the kept columns ``[M, 1]``."""
    xm = x.scatter(1, idx, float("-inf"))
    lse = torch.logsumexp(xm, -1, keepdim=True)
    return xm - lse, lse


_KEY_SORT_MIN = 4096  # elements: below this torch.sort is as fast


def descending_order(score: Tensor) -> Tensor:
    """The column indices of each row of ``score`` ``[M, C]`` by value, descending, ties to the lower
    index: exactly ``torch.sort(score, dim=-1, descending=True, stable=True).indices``.

    On CPU in float32 (and ``C < 2**31``) each entry becomes one unique int64 key — its float bits
    made order-preserving (``b ^ ((b >> 31) & 0x7FFFFFFF)``, ``−0.0`` read as ``+0.0``), inverted for
    a descending order, in the high 32 bits, its column index in the low 32 — and the keys are
    sorted by numpy's vectorized sort, rows split over ``torch.get_num_threads()`` threads. The keys
    are distinct, so the order is the stable one (NaN scores aside); at ``C = 32000`` it is 5–7×
    faster than ``torch.sort`` on one core. Elsewhere (GPU, float64) it is ``torch.sort``.
    """
    m, c = score.shape
    if (score.device.type != "cpu" or score.dtype != torch.float32 or m * c < _KEY_SORT_MIN or c >= 2**31
            or sys.byteorder != "little"):
        return torch.sort(score, dim=-1, descending=True, stable=True).indices
    import numpy as np

    bits = (score.detach() + 0.0).view(torch.int32).numpy()  # + 0.0 turns -0.0 into +0.0
    high = bits >> 31
    high &= 0x7FFFFFFF
    high ^= -1
    high ^= bits  # ~(b ^ ((b >> 31) & 0x7FFFFFFF)): signed-int order == reversed float order
    keys = np.empty((m, c), dtype=np.int64)
    halves = keys.view(np.int32).reshape(m, c, 2)  # little-endian: [low, high] words of each key
    halves[:, :, 0] = np.arange(c, dtype=np.int32)
    halves[:, :, 1] = high
    threads = min(torch.get_num_threads(), m)
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        bounds = np.linspace(0, m, threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:  # numpy's sort releases the GIL
            list(pool.map(lambda i: keys[bounds[i] : bounds[i + 1]].sort(axis=-1), range(threads)))
    else:
        keys.sort(axis=-1)
    keys &= 0xFFFFFFFF
    return torch.from_numpy(keys)


def zipf_labels(score: Tensor, drop: Tensor) -> Tensor:
    """Zipf soft labels from a ranking: sort the ``C`` columns of ``score`` ``[M, C]`` descending
    (stable: ties go to the lower class index; :func:`descending_order`), give position ``j``
    (0-based) the value ``1/(j+1)``, zero the columns in ``drop`` ``[M, k]`` and renormalize rows
    to sum to 1."""
    m, c = score.shape
    order = descending_order(score)
    zipf = 1.0 / torch.arange(1, c + 1, device=score.device, dtype=score.dtype)
    out = torch.empty_like(score).scatter_(1, order, zipf.expand(m, c))
    out.scatter_(1, drop, 0.0)
    return out.div_(out.sum(-1, keepdim=True))


def reduce_rows(per_row: Tensor, valid: Tensor | None, reduction: str, lead_shape: torch.Size) -> Tensor:
    """Reduce per-row losses ``[M]`` (already 0 on ignored rows)."""
    if reduction == "none":
        return per_row.reshape(lead_shape)
    if valid is None:
        valid = torch.ones_like(per_row, dtype=torch.bool)
    total = per_row.sum()
    if reduction == "sum":
        return total
    count = valid.sum().clamp(min=1).to(per_row.dtype)
    return total / count


class _RowLossFn(torch.autograd.Function):
    """Per-row losses ``[M]`` whose gradients w.r.t. up to two inputs were computed in forward.

    Backward scales each saved per-row gradient ``[M, C]`` by the incoming ``[M]`` gradient.
    """

    @staticmethod
    def forward(ctx, loss: Tensor, a: Tensor, grad_a: Tensor, b: Tensor | None, grad_b: Tensor | None) -> Tensor:  # noqa: D102
        ctx.save_for_backward(grad_a, grad_b)
        return loss.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # noqa: D102
        grad_a, grad_b = ctx.saved_tensors
        g = g[:, None]
        return None, grad_a * g, None, (None if grad_b is None else grad_b * g), None


def row_loss_with_grad(
    loss: Tensor, a: Tensor, grad_a: Tensor | None, b: Tensor | None = None, grad_b: Tensor | None = None
) -> Tensor:
    """Attach precomputed per-row gradients (``d loss_r / d a_r``, ``d loss_r / d b_r``) to ``loss``.

    ``grad_a`` is ``None`` when no gradient is needed (then ``loss`` is returned as is).
    """
    if grad_a is None:
        return loss
    return _RowLossFn.apply(loss, a, grad_a, b, grad_b)
