"""The chunked fused-linear driver: runs a row-wise :class:`~nkd.losses.spec.LossSpec` on
``hidden @ weight.T + bias`` without ever holding the ``[N, V]`` logits.

Rows are processed ``chunk_size`` at a time. For each chunk the spec's per-row loss and its
gradient ``G = ∂L/∂z`` ``[chunk, V]`` are formed — from the spec's analytic gradient where it has
one (NKD, KD, JSD), otherwise by autograd over that chunk alone (``torch.autograd.grad`` of the chunk's
rows, e.g. DKD) — and immediately folded into ``∂L/∂h = G W``, ``∂L/∂W += Gᵀ h``,
``∂L/∂b += Σ_rows G`` inside the forward pass; backward only scales these by the incoming scalar.
``ce_weight`` adds the student's cross-entropy ``−w·log S_t`` in the same pass (fused into the
spec's rows where the spec takes ``ce_weight``). A spec with an in-place form
(:meth:`~nkd.losses.spec.LossSpec.chunk_rows`: KD, NKD, JSD; kernels in :mod:`nkd.losses._inplace`)
gets the chunk's logits as buffers it may overwrite, taken with its temporaries from a
:class:`~nkd.losses._inplace.Workspace` reused by every chunk; a chunk with a non-finite row
(``−∞`` logits, a sparse teacher's zeros) is recomputed and goes through the spec's ``rows()``.
The teacher is an object that yields its logits chunk by chunk — :class:`LinearTeacher` (hidden states + head), :class:`DenseTeacher`,
:class:`TopKTeacher` — built by the caller or by :func:`make_teacher` from keywords. The maths of
the public functions, the sparse-teacher definitions and the precision rules: :mod:`nkd.losses.fused`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _common
from ._common import Rows, compute_dtype
from ._inplace import Workspace
from .spec import LossSpec, common_checks

__all__ = ["LinearTeacher", "DenseTeacher", "TopKTeacher", "make_teacher", "fused_linear_loss", "default_chunk_size",
           "TOPK_REST", "check_settings", "check_topk_rest"]

TOPK_REST = ("zero", "uniform")
_CHUNK_ROWS = 512  # rows per chunk by default: fewer rows re-read the [V, H] heads more often (4 matmuls per chunk)
_CHUNK_BYTES = 2**27  # but one [chunk, V] logits buffer (matmul dtype) at most 128 MiB
_LOGPROB_TOL = 1e-4  # stored log-probabilities may exceed 0 by rounding
_MASS_TOL = 1e-3  # and their probabilities may sum slightly above 1


def default_chunk_size(vocab_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Rows per chunk when ``chunk_size=None``: ``max(1, min(512, 2**27 // (V·itemsize)))`` — 512 rows,
    fewer where a ``[chunk, V]`` logits buffer of the matmul ``dtype`` would pass 128 MiB."""
    item = torch.empty((), dtype=dtype).element_size()
    return max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // (max(int(vocab_size), 1) * item)))


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


def check_topk_rest(topk_rest: object) -> None:
    """``topk_rest`` must be one of :data:`TOPK_REST`."""
    if topk_rest not in TOPK_REST:
        raise ValueError(f"topk_rest must be one of {TOPK_REST}, got {topk_rest!r}")


def check_settings(spec: LossSpec, ce_weight: float, ignore_index: int, reduction: str, chunk_size: int | None,
                   row_wise: bool = True) -> None:
    """The settings of a fused call, checked once for the calls and for the modules' constructors:
    a row-wise spec (unless ``row_wise=False``: a driver of its own handles the coupling, as
    :mod:`nkd.losses.fused_uskd`), ``ce_weight`` ≥ 0, ``reduction`` and ``ignore_index``
    (:func:`common_checks`), ``chunk_size`` a positive int or ``None``."""
    if row_wise and not spec.row_wise:
        own = " (use fused_linear_uskd_loss)" if spec.name == "uskd" else ""
        raise ValueError(f"{spec.name} couples the rows of a batch, so fused_linear_loss cannot chunk it over tokens{own}")
    _common.check_nonnegative("ce_weight", ce_weight)
    common_checks(spec, reduction, ignore_index)
    _check_chunk_size(chunk_size)


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
    return _common.hard_labels(target, lead, vocab, ignore_index, lead_of="hidden", what="token ids")


def _take(x: Tensor, sel: slice | Tensor) -> Tensor:
    return x[sel] if isinstance(sel, slice) else x.index_select(0, sel)


def _mm_dtype(device: torch.device, *tensors: Tensor) -> torch.dtype:
    """Matmul dtype: the autocast dtype under autocast (float64 never cast down), else promotion."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    if dtype != torch.float64 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _linear(h: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
    """``h @ w.T + b`` (into ``out`` if given)."""
    return torch.mm(h, w.t(), out=out) if b is None else torch.addmm(b, h, w.t(), out=out)



# ----------------------------------------------------------------------------- teachers
def _device_check(device: torch.device, **tensors: Tensor | None) -> None:
    for name, x in tensors.items():
        if isinstance(x, Tensor) and x.device != device:
            raise ValueError(f"{name} must be on hidden's device {device}, got {x.device}")


@dataclass
class LinearTeacher:
    """A teacher given by its hidden states ``[..., H_t]`` and LM head ``[V, H_t]`` (+ bias ``[V]``):
    its logits are formed chunk by chunk too (``H_t`` may differ from the student's ``H``)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None

    def prepare(self, lead: torch.Size, vocab: int, device: torch.device, min_k: int) -> LinearTeacher:
        """Check against the student's rows and flatten (detached, head in the matmul dtype)."""
        _check_head("teacher_hidden", self.hidden, "teacher_weight", self.weight, "teacher_bias", self.bias)
        _device_check(device, teacher_hidden=self.hidden, teacher_weight=self.weight, teacher_bias=self.bias)
        if self.weight.shape[0] != vocab:
            raise ValueError(
                f"teacher_weight must have the student's vocabulary size: teacher_weight has V={self.weight.shape[0]}, "
                f"weight has V={vocab}"
            )
        _check_lead("teacher_hidden", self.hidden, lead, "teacher_hidden [..., H_t]")
        mm = _mm_dtype(device, self.hidden, self.weight, *(() if self.bias is None else (self.bias,)))
        tb = None if self.bias is None else self.bias.detach().to(mm)
        return LinearTeacher(self.hidden.detach().reshape(-1, self.hidden.shape[-1]), self.weight.detach().to(mm), tb)

    def rows(self, sel: slice | Tensor, dtype: torch.dtype) -> Tensor:
        h = _take(self.hidden, sel).to(self.weight.dtype)
        return _linear(h, self.weight, self.bias).to(dtype)

    def chunk(self, sel: slice | Tensor, dtype: torch.dtype, ws: Workspace) -> tuple[Tensor, bool]:
        """The chunk's logits in the head's dtype, in the workspace (a buffer the caller may overwrite)."""
        h = _take(self.hidden, sel).to(self.weight.dtype)
        return _linear(h, self.weight, self.bias, ws.get("u", h.shape[0], self.weight.dtype)), True


@dataclass
class DenseTeacher:
    """A teacher given by precomputed logits ``[..., V]`` (read one chunk at a time)."""

    logits: Tensor

    def prepare(self, lead: torch.Size, vocab: int, device: torch.device, min_k: int) -> DenseTeacher:
        """Check against the student's rows and flatten (detached)."""
        x = self.logits
        _check_float("teacher_logits", x, "[..., V]")
        _device_check(device, teacher_logits=x)
        if x.dim() < 1 or x.shape[-1] != vocab:
            raise ValueError(
                f"teacher_logits must have the student's vocabulary size in its last dim: teacher_logits has "
                f"V={x.shape[-1] if x.dim() else 'none'}, weight has V={vocab}"
            )
        _check_lead("teacher_logits", x, lead, "teacher_logits [..., V]")
        return DenseTeacher(x.detach().reshape(-1, vocab))

    def rows(self, sel: slice | Tensor, dtype: torch.dtype) -> Tensor:
        return _take(self.logits, sel).to(dtype)

    def chunk(self, sel: slice | Tensor, dtype: torch.dtype, ws: Workspace) -> tuple[Tensor, bool]:
        """The chunk's logits as given, and whether they are a buffer of their own (not for a slice:
        a view of the caller's logits, never overwritten)."""
        return _take(self.logits, sel), not isinstance(sel, slice)


@dataclass
class TopKTeacher:
    """A sparse teacher: the ``k`` token ids ``[..., k]`` and their log-probabilities under the full
    teacher softmax (what offline teacher caches store); ``rest`` says where the missing mass goes
    (``"zero"`` or ``"uniform"``; definitions in :mod:`nkd.losses.fused`)."""

    ids: Tensor
    logprobs: Tensor
    rest: str = "zero"
    vocab: int = 0  # set by prepare()

    def prepare(self, lead: torch.Size, vocab: int, device: torch.device, min_k: int) -> TopKTeacher:
        """Check ids, log-probabilities and ``k`` against the student's rows and flatten (detached)."""
        check_topk_rest(self.rest)
        ids, lp = self.ids, self.logprobs
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"teacher_topk ids must be an integer tensor [..., k], got {getattr(ids, 'dtype', type(ids).__name__)}")
        _check_float("teacher_topk logprobs", lp, "[..., k]")
        _device_check(device, teacher_topk=ids)
        _device_check(device, teacher_topk=lp)
        if ids.shape != lp.shape:
            raise ValueError(f"teacher_topk ids and logprobs must have the same shape, got {tuple(ids.shape)} vs {tuple(lp.shape)}")
        if ids.dim() < 1:
            raise ValueError("teacher_topk ids must have shape [..., k], got a scalar")
        _check_lead("teacher_topk ids", ids, lead, "teacher_topk [..., k]")
        k = ids.shape[-1]
        if not min_k <= k <= vocab:
            raise ValueError(f"teacher_topk needs {min_k} <= k <= V={vocab} entries per token (topk_rest={self.rest!r}), got k={k}")
        ids2 = ids.detach().reshape(-1, k).long()
        lp2 = lp.detach().reshape(-1, k)
        if ids2.numel() and _common.value_checks_enabled():
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
        return TopKTeacher(ids2, lp2, self.rest, vocab)

    def chunk(self, sel: slice | Tensor, dtype: torch.dtype, ws: Workspace) -> tuple[Tensor, bool]:
        """The chunk's log-probability vectors in ``dtype``, in the workspace."""
        return self.rows(sel, dtype, ws), True

    def rows(self, sel: slice | Tensor, dtype: torch.dtype, ws: Workspace | None = None) -> Tensor:
        ids = _take(self.ids, sel)
        lp = _take(self.logprobs, sel).to(dtype)
        c, k = ids.shape
        u = torch.empty(c, self.vocab, dtype=dtype, device=lp.device) if ws is None else ws.get("u", c, dtype)
        if self.rest == "zero" or k == self.vocab:
            u.fill_(float("-inf"))
        else:
            # log r with r = 1 - sum_K p, computed as log(-expm1(logsumexp)) and clamped to tiny
            lse = torch.logsumexp(lp, dim=-1).clamp(max=0.0)
            log_r = torch.log((-torch.expm1(lse)).clamp(min=torch.finfo(dtype).tiny))
            fill = log_r - math.log(self.vocab - k)
            u.copy_(fill[:, None].expand(c, self.vocab))
        return u.scatter_(1, ids, lp)


Teacher = LinearTeacher | DenseTeacher | TopKTeacher


def make_teacher(teacher_hidden: Tensor | None = None, teacher_weight: Tensor | None = None,
                 teacher_bias: Tensor | None = None, teacher_logits: Tensor | None = None,
                 teacher_topk: tuple[Tensor, Tensor] | None = None, topk_rest: str = "zero") -> Teacher:
    """The teacher object for the keyword forms of the fused functions: exactly one of
    ``teacher_hidden`` + ``teacher_weight`` (+ ``teacher_bias``), ``teacher_logits``, or
    ``teacher_topk = (ids, logprobs)`` (with ``topk_rest``)."""
    check_topk_rest(topk_rest)
    given = [name for name, ok in (("teacher_hidden/teacher_weight", teacher_hidden is not None or teacher_weight is not None),
                                   ("teacher_logits", teacher_logits is not None),
                                   ("teacher_topk", teacher_topk is not None)) if ok]
    if len(given) != 1:
        raise ValueError(
            "give exactly one teacher: teacher_hidden + teacher_weight, teacher_logits, or teacher_topk=(ids, logprobs); "
            f"got {given or 'none'}"
        )
    if given[0].startswith("teacher_hidden"):
        if teacher_hidden is None or teacher_weight is None:
            missing, other = ("teacher_weight", "teacher_hidden") if teacher_weight is None else ("teacher_hidden", "teacher_weight")
            raise ValueError(f"{missing} is required together with {other}")
        return LinearTeacher(teacher_hidden, teacher_weight, teacher_bias)
    if teacher_bias is not None:
        raise ValueError("teacher_bias is only used with teacher_hidden + teacher_weight")
    if teacher_logits is not None:
        return DenseTeacher(teacher_logits)
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk must be a pair (ids [..., k] int64, logprobs [..., k] float)")
    return TopKTeacher(teacher_topk[0], teacher_topk[1], topk_rest)




# ----------------------------------------------------------------------------- a spec's rows in a chunk
def add_ce(z: Tensor, idx: Tensor, loss: Tensor, grad: Tensor | None, ce_weight: float) -> tuple[Tensor, Tensor | None]:
    """``loss + w·CE(z, idx)`` per row and, in place, ``grad + w(S − e_t)`` (``w = ce_weight``; nothing when 0)."""
    if not ce_weight:
        return loss, grad
    col = idx[:, None]
    lse = torch.logsumexp(z, -1, keepdim=True)
    loss = loss + ce_weight * (lse - z.gather(1, col)).squeeze(1)
    if grad is not None:
        grad.add_(torch.sub(z, lse).exp_(), alpha=ce_weight)
        grad.scatter_add_(1, col, torch.full_like(lse, -ce_weight))
    return loss, grad


def _spec_rows(spec: LossSpec, ce_weight: float) -> Callable:
    """``(z, u, idx, need_grad) -> (loss [c], G [c, V] | None)`` for a chunk (every row valid):
    the spec's analytic rows — with the CE term fused where the spec says so (``fuses_ce``),
    otherwise added here with its gradient ``w(S − e_t)`` — or autograd over the chunk's rows
    plus the CE term."""

    def analytic(z, u, idx, need_grad):
        r = Rows(z, idx, None, None, z.shape[:1])
        if spec.fuses_ce:
            out = spec.rows(z, u, r, need_grad, ce_weight=ce_weight)
            return out.loss, out.grad
        out = spec.rows(z, u, r, need_grad)
        return add_ce(z, idx, out.loss, out.grad, ce_weight)

    def by_autograd(z, u, idx, need_grad):
        r = Rows(z, idx, None, None, z.shape[:1])
        with torch.enable_grad():
            zc = z.detach().requires_grad_(need_grad)
            loss = spec.rows(zc, u, r, False).loss
            if ce_weight:
                loss = loss + ce_weight * (torch.logsumexp(zc, -1) - zc.gather(1, idx[:, None]).squeeze(1))
            if not need_grad:
                return loss.detach(), None
            (g,) = torch.autograd.grad(loss.sum(), zc)  # rows are independent: row r's gradient is ∂L_r/∂z_r
        return loss.detach(), g

    return analytic if spec.dense_analytic else by_autograd


def _fast_rows(spec: LossSpec, ce_weight: float) -> Callable | None:
    """The spec's in-place :meth:`~nkd.losses.spec.LossSpec.chunk_rows` for the chunk loop, if it has one
    (the CE term inside it: it adds ``ce_weight·CE`` itself)."""
    if type(spec).chunk_rows is LossSpec.chunk_rows:
        return None
    return functools.partial(spec.chunk_rows, ce_weight=ce_weight)


# ----------------------------------------------------------------------------- the chunk loop
def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype a gradient is held in until backward: float16 (max 65504, normal down to 6e-5) cannot
    hold a ``1/N``-scaled gradient nor an upstream loss scale, so its gradients stay float32."""
    return torch.float32 if dtype == torch.float16 else dtype


def _put(out: Tensor, sel: slice | Tensor, rows: Tensor) -> None:
    if isinstance(sel, slice):
        out[sel] = rows
    else:
        out.index_copy_(0, sel, rows)


class _Head:
    """One linear head ``z = h Wᵀ + b`` in a chunk loop: its logits chunk by chunk, and the gradients
    ``∂L/∂h = s·(G W)``, ``∂L/∂W += Gᵀ (s·h)``, ``∂L/∂b += sᵀ G`` of each chunk's ``G = ∂L/∂z``
    folded in at once (``G`` itself is never scaled). ``s``, the reduction weight, is a float
    (mean/sum) or a ``[N]`` tensor (per-row weights, for reduction "none"). ``want`` says which of
    ``h``, ``W``, ``b`` need a gradient."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, mm_dtype: torch.dtype,
                 want: tuple[bool, bool, bool]):
        self.hidden, self.mm_dtype, self.want = hidden, mm_dtype, want
        self.w_mm = weight.to(mm_dtype)
        self.b_mm = None if bias is None else bias.to(mm_dtype)
        self.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.acc = acc
        want_h, want_w, want_b = want
        self.gh = torch.zeros(hidden.shape, dtype=_grad_dtype(hidden.dtype), device=hidden.device) if want_h else None
        self.gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        self.gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None

    def logits(self, sel: slice | Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The chunk's rows of ``h`` (matmul dtype) and their logits in ``dtype``."""
        h = _take(self.hidden, sel).to(self.mm_dtype)
        return h, _linear(h, self.w_mm, self.b_mm).to(dtype)

    def fold(self, sel: slice | Tensor, h: Tensor, g: Tensor, scale: float | Tensor, gsum: Tensor | None = None,
             ws: tuple[Workspace, Workspace] | None = None) -> None:
        """Fold the chunk's ``G`` ``[chunk, V]`` into the gradients (``h``: the chunk's rows from :meth:`logits`).
        ``gsum``: ``Σ_rows G`` (weighted by the per-row scale) when the kernel already formed it; ``ws``:
        workspaces in which a low-precision ``Gᵀh`` is accumulated into float32 block by block."""
        want_h, want_w, want_b = self.want
        # the reduction weight is applied to the small products, not to g [chunk, V] (one pass less)
        if isinstance(scale, Tensor):
            rs = _take(scale, sel).to(self.acc if g.dtype in (torch.bfloat16, torch.float16) else g.dtype)
            if want_b:
                self.gb.add_(rs.to(g.dtype) @ g if gsum is None else gsum)
            g = g.to(self.mm_dtype)
            if want_h:
                gh_rows = (g @ self.w_mm).to(self.gh.dtype).mul_(rs[:, None].to(self.gh.dtype))
            if want_w:
                h = h * rs[:, None].to(h.dtype)
            alpha = 1.0
        else:
            alpha = float(scale)
            if want_b:
                self.gb.add_(g.sum(0) if gsum is None else gsum, alpha=alpha)
            g = g.to(self.mm_dtype)
            if want_h:
                gh_rows = (g @ self.w_mm).to(self.gh.dtype).mul_(alpha)  # 1/N applied outside float16
        if want_h:
            _put(self.gh, sel, gh_rows)
        if want_w:
            if g.dtype == self.acc:
                self.gw.addmm_(g.t(), h, alpha=alpha)
            elif ws is None:
                self.gw.add_(g.t() @ h, alpha=alpha)
            else:  # Gᵀh in the matmul dtype, accumulated in float32 block by block (cast in a cache-sized buffer)
                big, small = ws
                v, width = g.shape[1], h.shape[1]
                prod = torch.mm(g.t(), h, out=big.get("gw", v, g.dtype, width))
                step = _block_rows(width)
                for r0 in range(0, v, step):
                    blk = prod[r0 : r0 + step]
                    self.gw[r0 : r0 + step].add_(small.get("gw", blk.shape[0], self.acc, width).copy_(blk), alpha=alpha)

    def grads(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(∂L/∂h, ∂L/∂W, ∂L/∂b)`` in :func:`_grad_dtype` of their inputs' dtypes (the caller casts)."""
        wd, bd = self.dtypes
        gw = None if self.gw is None else self.gw.to(_grad_dtype(wd))
        gb = None if self.gb is None else self.gb.to(_grad_dtype(bd))
        return self.gh, gw, gb


@dataclass
class _Plan:
    """Everything the chunk loop needs besides the differentiable tensors."""

    rows_fn: Callable  # (z, u, idx, need_grad) -> (loss [c], grad [c, V] | None)
    fast_fn: Callable | None  # the spec's in-place chunk_rows (may overwrite z, u; None = use rows_fn)
    teacher: object
    index: Tensor  # [N] class index per row (0 where ignored)
    chunks: list  # slices (all rows valid) or index tensors into the N rows
    count: int  # valid rows
    cdtype: torch.dtype  # loss maths dtype
    mm_dtype: torch.dtype  # student matmul dtype
    reduction: str

    def run(self, tensors: tuple[Tensor | None, ...], scale: float | Tensor, want: tuple[bool, ...]):
        """Every chunk of ``tensors = (hidden, weight, bias)``: per-row losses ``[N]`` and the
        gradients ``(∂h, ∂W, ∂b)`` scaled by ``scale`` (:class:`_Head`). A chunk goes through the
        spec's in-place kernel (:func:`_fast_chunk`) when it has one, else (or when a row is not
        finite) through its ``rows()``."""
        hidden, weight = tensors[0], tensors[1]
        head = _Head(*tensors, self.mm_dtype, want)
        need_grad = any(want)
        v = weight.shape[0]
        rows_max = max((c.stop - c.start if isinstance(c, slice) else c.numel() for c in self.chunks), default=1)
        big = Workspace(rows_max, v, hidden.device)  # chunk-sized buffers (logits, bf16 Gᵀh)
        small = Workspace(min(rows_max, _block_rows(v)), v, hidden.device)  # block-sized (the kernels' temporaries)
        per_row = torch.zeros(hidden.shape[0], dtype=self.cdtype, device=hidden.device)
        for sel in self.chunks:
            idx = _take(self.index, sel)  # ignored rows are never in a chunk
            rs = _take(scale, sel) if isinstance(scale, Tensor) else None
            h = _take(hidden, sel).to(self.mm_dtype)
            fast = None
            if self.fast_fn is not None:
                fast = _fast_chunk(self, h, head.w_mm, head.b_mm, sel, idx, need_grad, big, small, rs, want[2])
            if fast is None:
                z = _linear(h, head.w_mm, head.b_mm).to(self.cdtype)
                u = self.teacher.rows(sel, self.cdtype)
                loss, g = self.rows_fn(z, u, idx, need_grad)
                del z, u
                gsum = None
            else:
                loss, g, gsum = fast
            del fast
            _put(per_row, sel, loss)
            if g is not None:
                head.fold(sel, h, g, scale, gsum=gsum, ws=(big, small))
            del g
        return per_row, head.grads()


_BLOCK_ELEMENTS = 2**20  # rows of a chunk the in-place kernels take at once: ≈ 4 MiB per float32 buffer, cache-sized
_BLOCK_ROWS_MIN = 8


def _block_rows(vocab: int) -> int:
    """Rows per block of a chunk for the in-place kernels: ``max(8, 2**20 // V)``."""
    return max(_BLOCK_ROWS_MIN, _BLOCK_ELEMENTS // max(vocab, 1))


def _fast_chunk(plan: _Plan, h: Tensor, w_mm: Tensor, b_mm: Tensor | None, sel: slice | Tensor, idx: Tensor, need_grad: bool,
                big: Workspace, small: Workspace, rs: Tensor | None, want_b: bool):
    """One chunk by the spec's in-place kernel: the logits of the whole chunk by one matmul each
    (student, teacher), the kernel on blocks of :func:`_block_rows` rows (its passes over a block
    stay in cache; bf16/float16 logits are cast block by block into float32 buffers). Returns
    ``(loss [c], G [c, V] in the matmul dtype | None, Σ_rows G (weighted by ``rs``) | None)``, the
    gradient written into the student logits' buffer; or ``None`` when a block has a non-finite row."""
    c, cdtype = h.shape[0], plan.cdtype
    zb = _linear(h, w_mm, b_mm, big.get("z", c, w_mm.dtype))
    ub, owned = plan.teacher.chunk(sel, cdtype, big)
    loss = torch.empty(c, dtype=cdtype, device=h.device)
    gsum = torch.zeros(zb.shape[1], dtype=cdtype, device=h.device) if need_grad and want_b else None
    step = _block_rows(zb.shape[1])
    for r0 in range(0, c, step):
        r = slice(r0, min(r0 + step, c))
        nr = r.stop - r0
        zs = zb[r] if zb.dtype == cdtype else small.get("z", nr, cdtype).copy_(zb[r])
        us = ub[r] if owned and ub.dtype == cdtype else small.get("u", nr, cdtype).copy_(ub[r])
        out = plan.fast_fn(zs, us, idx[r], need_grad, ws=small)
        if out is None:
            return None
        loss[r], g = out
        if g is None:
            continue
        if gsum is not None:
            gsum.add_(g.sum(0) if rs is None else rs[r].to(g.dtype) @ g)
        if g.data_ptr() != zb[r].data_ptr() or g.dtype != zb.dtype:
            zb[r].copy_(g)
    return loss, (zb if need_grad else None), gsum


class _FusedLinearLossFn(torch.autograd.Function):
    """Loss of one or more linear heads ``(hidden, weight, bias, ...)`` without their logits, run by
    ``plan.run``; gradients formed in forward (mean/sum) or recomputed chunk by chunk in backward
    with per-row weights ("none")."""

    @staticmethod
    def forward(ctx, plan, want: tuple[bool, ...], *tensors: Tensor | None):  # noqa: D102
        ctx.plan, ctx.want = plan, want
        ctx.dtypes = tuple(None if x is None else x.dtype for x in tensors)
        if plan.reduction == "none":
            per_row, _ = plan.run(tensors, 1.0, (False,) * len(tensors))
            ctx.save_for_backward(*tensors)
            return per_row
        denom = max(plan.count, 1) if plan.reduction == "mean" else 1
        per_row, grads = plan.run(tensors, 1.0 / denom, want)
        ctx.save_for_backward(*grads)
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
            _, grads = ctx.plan.run(ctx.saved_tensors, g, ctx.want)
        else:
            grads = [None if x is None else x * g.to(x.dtype) for x in ctx.saved_tensors]
        return (None, None) + tuple(None if x is None else x.to(dt) for x, dt in zip(grads, ctx.dtypes))


def row_chunks(t: Tensor | None, n: int, ignore_index: int, chunk_size: int, device: torch.device
               ) -> tuple[Tensor, int, list[slice | Tensor]]:
    """The rows of a call: the class index per row ``[N]`` (0 where ignored), the number of valid
    rows, and the chunks of ``chunk_size`` valid rows — slices when every row is valid, index
    tensors otherwise (ignored rows are in no chunk). ``t``: flat labels, or ``None`` (all valid)."""
    if t is None:
        valid_idx, count = None, n
        index = torch.zeros(n, dtype=torch.long, device=device)
    else:
        valid = t != ignore_index
        index = torch.where(valid, t, torch.zeros_like(t))
        count = int(valid.sum())
        valid_idx = None if count == n else valid.nonzero().squeeze(1)
    if valid_idx is None:
        return index, count, [slice(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    return index, count, [valid_idx[s : s + chunk_size] for s in range(0, count, chunk_size)]


def fused_linear_loss(spec: LossSpec, hidden: Tensor, weight: Tensor, teacher: Teacher, target: Tensor | None = None, *,
                      bias: Tensor | None = None, ce_weight: float = 0.0, ignore_index: int = -100,
                      reduction: str = "mean", chunk_size: int | None = None) -> Tensor:
    """The loss ``spec`` describes on ``z = hidden @ weight.T + bias`` against ``teacher``, plus
    ``ce_weight·CE(z, target)``, chunked over the rows (module docstring).

    Args:
        spec: a row-wise loss spec with a teacher (``NKD(...)``, ``KD(...)``, ``DKD(...)``, ...).
        hidden: student's last hidden states ``[..., H]``.  weight: student LM head ``[V, H]``.
        teacher: a :class:`LinearTeacher`, :class:`DenseTeacher` or :class:`TopKTeacher`.
        target: int64 next-token ids ``[...]`` (``ignore_index`` rows left out); required when the
            spec needs a label or ``ce_weight > 0``.
        bias: optional student head bias ``[V]``.  ce_weight: w ≥ 0 of the cross-entropy.
        ignore_index, reduction, chunk_size: as in :func:`nkd.losses.fused_linear_nkd_loss`.
    """
    check_settings(spec, ce_weight, ignore_index, reduction, chunk_size)
    if target is None and (spec.target == "required" or ce_weight):
        if ce_weight:
            raise ValueError("target is required when ce_weight > 0 (the cross-entropy needs the next-token ids)")
        raise ValueError(f"target is required for {spec.name.upper()} (the next-token ids [...], ignore_index allowed)")
    _check_head("hidden", hidden, "weight", weight, "bias", bias)
    lead, h_dim, vocab = hidden.shape[:-1], hidden.shape[-1], weight.shape[0]
    device = hidden.device
    _device_check(device, weight=weight, bias=bias, target=target)
    t = _parse_target(target, lead, vocab, ignore_index)
    prepared = teacher.prepare(lead, vocab, device, spec.min_topk(getattr(teacher, "rest", "zero")))
    n = math.prod(lead)
    mm_dtype = _mm_dtype(device, hidden, weight, *(() if bias is None else (bias,)))
    index, count, chunks = row_chunks(t, n, ignore_index, chunk_size or default_chunk_size(vocab, mm_dtype), device)
    plan = _Plan(
        rows_fn=_spec_rows(spec, float(ce_weight)),
        fast_fn=_fast_rows(spec, float(ce_weight)),
        teacher=prepared,
        index=index,
        chunks=chunks,
        count=count,
        cdtype=compute_dtype(torch.promote_types(hidden.dtype, weight.dtype)),
        mm_dtype=mm_dtype,
        reduction=reduction,
    )
    grad_on = torch.is_grad_enabled()
    want = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad)
    with torch.autocast(device_type=device.type, enabled=False):
        out = _FusedLinearLossFn.apply(plan, want, hidden.reshape(n, h_dim), weight, bias)
    return out.reshape(lead) if reduction == "none" else out
