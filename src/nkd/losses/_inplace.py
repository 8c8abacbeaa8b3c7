r"""In-place per-chunk kernels of the chunked fused-linear driver (:mod:`nkd.losses.chunked`).

The same maths as the specs' :meth:`~nkd.losses.spec.LossSpec.rows` (KD, NKD, JSD), rearranged to
make few passes over the ``[chunk, V]`` buffers: the driver hands over the chunk's student and
teacher logits ``z``, ``u`` as buffers it owns, and each kernel overwrites them (``log_softmax``
in place, the gradient formed in the buffer of a probability), takes row sums where the
definition has them, and never masks. No masks are needed while every term is finite: the
masked terms of ``rows()`` are ``0·log 0`` ones (a probability that is exactly 0 where a
log-probability is ``−∞``), which here turn into NaN/±∞ in the row sum. So each kernel checks its
``[chunk]`` row values and returns ``None`` when one is not finite; the driver then recomputes
the chunk's logits and runs ``rows()`` (exact by definition) on it. With finite logits (every
student head without ``−∞`` entries and every dense teacher) that never happens unless a
probability underflows where the other distribution's does too.

Each kernel returns ``(loss [c], grad [c, V] | None)`` for a chunk whose rows are all valid, or
``None``; ``grad`` is ``∂L/∂z`` of the rows (``ce_weight``'s ``w·(S − e_t)`` included).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Workspace:
    """``[rows, V]`` buffers by name, allocated once and reused by every chunk (a view of the first
    ``c`` rows). Fresh ``[chunk, V]`` temporaries would cost new pages each chunk once they are above
    the C allocator's mmap threshold (glibc: at most 32 MiB): page faults, zeroing and unmapping."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self._bufs: dict = {}

    def get(self, name: str, c: int, dtype: torch.dtype, cols: int | None = None) -> Tensor:
        """The buffer ``name`` of ``dtype``, its first ``c`` rows (``cols`` columns, default ``V``)."""
        cols = self.vocab if cols is None else cols
        key = (name, dtype, cols)
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < c:
            buf = self._bufs[key] = torch.empty(max(c, self.rows), cols, dtype=dtype, device=self.device)
        return buf[:c]


def _buf(ws: Workspace | None, name: str, like: Tensor) -> Tensor:
    return torch.empty_like(like) if ws is None else ws.get(name, like.shape[0], like.dtype, like.shape[1])


def _log_softmax_(x: Tensor, out: Tensor | None = None) -> Tensor:
    """``log_softmax`` over the last dim into ``out`` (default: ``x`` itself; row-wise kernel, bitwise
    the out-of-place result)."""
    return torch._log_softmax(x, -1, False, out=x if out is None else out)


def _finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def _ce_log_softmax(z: Tensor, lam: float, w: float, ws: Workspace | None) -> Tensor | None:
    """The cross-entropy's ``log S`` at temperature 1 as its own buffer, needed only when ``λ ≠ 1``
    (at ``λ = 1`` the kernels read it from their own ``log S``)."""
    return _log_softmax_(z, _buf(ws, "l1", z)) if w and lam != 1.0 else None


def _add_ce_grad(grad: Tensor, s: Tensor, l1: Tensor | None, col: Tensor, w: float) -> Tensor:
    """``grad += w·(S − e_t)``, ``S`` the softmax at temperature 1 (``s`` at λ = 1, else ``exp(l1)``)."""
    grad.add_(s if l1 is None else l1.exp_(), alpha=w)
    return grad.scatter_add_(1, col, torch.full((col.shape[0], 1), -w, dtype=grad.dtype, device=grad.device))


def _log_probs(z: Tensor, u: Tensor, idx: Tensor, lam: float, w: float, ws: Workspace | None):
    """What the KL-type kernels start from: ``log S^λ`` and ``log T^λ`` in place of ``z``, ``u``; the
    target column ``col``; the cross-entropy's ``log S`` at temperature 1 (:func:`_ce_log_softmax`)
    and its ``log S_t`` (``None`` without a cross-entropy)."""
    col = idx[:, None]
    l1 = _ce_log_softmax(z, lam, w, ws)
    if lam != 1.0:
        z.div_(lam)
        u.div_(lam)
    ls = _log_softmax_(z)
    lt = _log_softmax_(u)
    logs_t = (ls if l1 is None else l1).gather(1, col).squeeze(1) if w else None
    return col, l1, ls, lt, logs_t


def forward_kl(z: Tensor, u: Tensor, idx: Tensor, need_grad: bool, lam: float, loss_scale: float, grad_scale: float,
               ce_weight: float = 0.0, ws: Workspace | None = None):
    r"""``loss_scale·KL(T^λ ‖ S^λ) + w·(−log S_t)`` per row and its gradient
    ``grad_scale·(S^λ − T^λ) + w·(S − e_t)`` (KD: scales ``λ²``, ``λ``; JSD at β = 0: ``1``, ``1/λ``)."""
    w = ce_weight
    col, l1, ls, lt, logs_t = _log_probs(z, u, idx, lam, w, ws)
    t = torch.exp(lt, out=_buf(ws, "t", lt))
    kl = lt.sub_(ls).mul_(t).sum(-1)  # Σ T (log T − log S)
    del lt
    if not _finite(kl):
        return None
    loss = kl.mul_(loss_scale) if loss_scale != 1.0 else kl
    if w:
        loss = loss.sub_(logs_t, alpha=w)
    if not need_grad:
        return loss, None
    grad = ls.exp_()
    if w and l1 is None:  # λ = 1: S is the cross-entropy's S too
        grad.mul_(grad_scale + w).sub_(t, alpha=grad_scale)
    elif grad_scale != 1.0:
        grad.sub_(t).mul_(grad_scale)
    else:
        grad.sub_(t)
    if l1 is not None:
        grad.add_(l1.exp_(), alpha=w)
    if w:
        grad.scatter_add_(1, col, torch.full((col.shape[0], 1), -w, dtype=grad.dtype, device=grad.device))
    return loss, grad


def reverse_kl(z: Tensor, u: Tensor, idx: Tensor, need_grad: bool, lam: float, ce_weight: float = 0.0,
               ws: Workspace | None = None):
    r"""``KL(S^λ ‖ T^λ)`` per row and its gradient ``(1/λ)·S ⊙ (g − KL)`` with ``g = log S − log T``
    (+ ``w·(−log S_t)`` and ``w·(S − e_t)``)."""
    w = ce_weight
    col, l1, ls, lt, logs_t = _log_probs(z, u, idx, lam, w, ws)
    s = torch.exp(ls, out=_buf(ws, "s", ls))
    g = ls.sub_(lt)  # log S − log T
    kl = torch.mul(g, s, out=lt).sum(-1)  # into u's buffer, free now
    del lt, u
    if not _finite(kl):
        return None
    loss = kl.sub(logs_t, alpha=w) if w else kl
    if not need_grad:
        return loss, None
    grad = g.sub_(kl[:, None]).mul_(s)  # S ⊙ (g − Σ S g), in the order of JSD.rows
    if lam != 1.0:
        grad.div_(lam)
    return loss, _add_ce_grad(grad, s, l1, col, w) if w else grad


def skew_jsd(z: Tensor, u: Tensor, idx: Tensor, need_grad: bool, lam: float, beta: float, ce_weight: float = 0.0,
             ws: Workspace | None = None):
    r"""``β·KL(T ‖ M) + (1−β)·KL(S ‖ M)``, ``M = β·T + (1−β)·S``, per row, and its gradient
    ``((1−β)/λ)·S ⊙ (d − KL_S)`` with ``d = log S − log M`` (``Σ S g`` of :mod:`nkd.losses.jsd` is
    ``(1−β)·KL_S``; + ``w·(−log S_t)`` and ``w·(S − e_t)``)."""
    w = ce_weight
    col, l1, ls, lt, logs_t = _log_probs(z, u, idx, lam, w, ws)
    s = torch.exp(ls, out=_buf(ws, "s", ls))
    t = torch.exp(lt, out=_buf(ws, "t", lt))
    lm = torch.lerp(s, t, beta, out=_buf(ws, "m", s)).log_()  # log M
    kl_t = lt.sub_(lm).mul_(t).sum(-1)
    del lt, u
    d = ls.sub_(lm)  # log S − log M
    del lm
    kl_s = torch.mul(d, s, out=t).sum(-1)  # into T's buffer, free now
    del t
    loss = kl_t.mul_(beta).add_(kl_s, alpha=1.0 - beta)
    if not _finite(loss):
        return None
    if w:
        loss = loss.sub_(logs_t, alpha=w)
    if not need_grad:
        return loss, None
    grad = d.sub_(kl_s[:, None]).mul_(s).mul_((1.0 - beta) / lam)  # S ⊙ (g − Σ S g), in the order of JSD.rows
    return loss, _add_ce_grad(grad, s, l1, col, w) if w else grad


def nkd(z: Tensor, u: Tensor, idx: Tensor, need_grad: bool, lam: float, gamma: float, ce_weight: float = 0.0,
        ws: Workspace | None = None):
    r"""NKD per row, ``−(T_t + w)·log S_t − γλ²·Σ_{i≠t} T̂_i log Ŝ_i``, and its gradient
    ``(T_t + w)(S − e_t) + γλ(Ŝ − T̂)`` (:mod:`nkd.losses.nkd`).

    The non-target distributions come from one in-place ``log_softmax`` of each chunk with the
    target column at ``−∞``; the log-sum-exp over the non-targets is read back from it (``max z −
    max log Ŝ``), and at temperature 1 the full softmax follows from it without another pass over
    the row: ``log S_t = z_t − logaddexp(lse_≠t, z_t)``, ``1 − S_t = exp(lse_≠t − lse)`` and
    ``S_i = (1 − S_t)·Ŝ_i`` for ``i ≠ t``.
    """
    col = idx[:, None]
    w = ce_weight
    z_t, u_t = z.gather(1, col), u.gather(1, col)
    s1 = None
    if lam != 1.0:
        l1 = _log_softmax_(z, _buf(ws, "l1", z))
        logs_t = l1.gather(1, col)
        s1 = l1.exp_() if need_grad else None
        del l1
        t_t = (u_t - torch.logsumexp(u, -1, keepdim=True)).exp_()
        z.div_(lam)
        u.div_(lam)
    z.scatter_(1, col, float("-inf"))
    u.scatter_(1, col, float("-inf"))
    mz = z.amax(-1, keepdim=True)
    mu = u.amax(-1, keepdim=True) if lam == 1.0 else None
    lsh = _log_softmax_(z)  # log Ŝ (−∞ at t)
    lth = _log_softmax_(u)
    lse_nt_z = mz - lsh.amax(-1, keepdim=True)
    if lam == 1.0:
        lse_nt_u = mu - lth.amax(-1, keepdim=True)
        lse_z = torch.logaddexp(lse_nt_z, z_t)
        logs_t = z_t - lse_z
        rho = (lse_nt_z - lse_z).exp_()  # 1 − S_t
        t_t = (u_t - torch.logaddexp(lse_nt_u, u_t)).exp_()
    th = lth.exp_()  # T̂ (0 at t)
    lsh.scatter_(1, col, 0.0)  # 0·(−∞) at t would be NaN
    cross = torch.mul(lsh, th, out=_buf(ws, "p", th)).sum(-1, keepdim=True)  # Σ_{i≠t} T̂_i log Ŝ_i
    if not _finite(cross):
        return None
    wt = t_t + w if w else t_t
    loss = (wt * logs_t).add_(cross, alpha=gamma * lam * lam).neg_().squeeze(1)
    if not need_grad:
        return loss, None
    sh = lsh.exp_()
    if lam == 1.0:
        a = wt * rho  # (T_t + w)(1 − S_t)
        grad = sh.mul_(a + gamma).sub_(th, alpha=gamma)
        grad.scatter_(1, col, a.neg_())
    else:
        sh.scatter_(1, col, 0.0)
        grad = s1.mul_(wt).add_(sh, alpha=gamma * lam).sub_(th, alpha=gamma * lam)
        grad.scatter_add_(1, col, wt.neg())
    return loss, grad
