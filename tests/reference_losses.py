"""Straightforward reference implementations of the formulas in docs/methods.md (and each loss's
paper), for the tests only.

They use plain autograd, boolean-mask copies and loops where that is clearest — no shared code
with ``nkd.losses``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_nkd(z, u, t, temperature=1.0, gamma=1.5):
    """Per-row NKD, hard labels [N]."""
    n, c = z.shape
    u = u.detach()
    s = F.softmax(z, 1)
    tt = F.softmax(u, 1).gather(1, t[:, None]).detach()
    loss_t = -(tt * torch.log(s.gather(1, t[:, None]))).squeeze(1)
    mask = torch.ones_like(z, dtype=torch.bool)
    mask[torch.arange(n), t] = False
    zs = z[mask].reshape(n, c - 1) / temperature
    us = u[mask].reshape(n, c - 1) / temperature
    loss_non = -gamma * temperature**2 * (F.softmax(us, 1) * F.log_softmax(zs, 1)).sum(1)
    return loss_t + loss_non


def _targets(y, c):
    """SPEC's USKD targets per row: list of (class, weight)."""
    out = []
    for row in y:
        if row.dim() == 0:
            out.append([(int(row), 1.0)])
            continue
        vals, idx = torch.sort(row, descending=True, stable=True)
        k = [(int(idx[0]), float(vals[0]))]
        if vals[1] > row.min():
            k.append((int(idx[1]), float(vals[1])))
        out.append(k)
    return out


def ref_uskd(z, w, y, alpha=1.0, beta=0.1, mu=0.005, rank="paper"):
    """Per-row USKD with loops over rows; y hard [N] or soft [N, C]."""
    n, c = z.shape
    targets = _targets(y, c)
    s = F.softmax(z, 1)
    logs = F.log_softmax(z, 1)
    # batch means of s_{t_k}^2 over rows that have a k-th target
    means = []
    for k in range(2):
        vals = [s[r, targets[r][k][0]] ** 2 for r in range(n) if len(targets[r]) > k]
        means.append(torch.stack(vals).mean().detach() if vals else None)
    wsm = F.softmax(w, 1)
    logw = F.log_softmax(w, 1)
    losses = []
    for r in range(n):
        tk = targets[r]
        lt = 0.0
        for k, (cls, v) in enumerate(tk):
            p = (s[r, cls] ** 2 + v - means[k]).detach()
            lt = lt - p * logs[r, cls]
        if y.dim() == 1:
            q = torch.full((c,), 0.1 / c, dtype=z.dtype)
            q[int(y[r])] += 0.9
        else:
            q = 0.9 * y[r] + 0.1 / c
        lweak = -mu * (q * logw[r]).sum()
        shat = s[r] if rank == "paper" else logs[r]
        ws = sum(wsm[r, cls] for cls, _ in tk)
        ss = sum(shat[cls] for cls, _ in tk)
        score = (wsm[r] / (1 - ws + 1e-6) + shat / (1 - ss + 1e-6)).detach()
        # rank by score descending, ties -> lower index
        order = sorted(range(c), key=lambda i: (-float(score[i]), i))
        zipf = torch.zeros(c, dtype=z.dtype)
        for j, cls in enumerate(order):
            zipf[cls] = 1.0 / (j + 1)
        keep = [i for i in range(c) if i not in {cls for cls, _ in tk}]
        zhat = zipf[keep] / zipf[keep].sum()
        lnon = -(zhat * F.log_softmax(z[r, keep], 0)).sum()
        losses.append(alpha * lt + beta * lnon + lweak)
    return torch.stack(losses)


def ref_kd(z, u, temperature=4.0):
    p_t = F.softmax(u.detach() / temperature, 1)
    return (p_t * (torch.log(p_t) - F.log_softmax(z / temperature, 1))).sum(1) * temperature**2


def ref_dkd(z, u, t, alpha=1.0, beta=8.0, temperature=4.0):
    """mdistiller-style DKD per row."""
    n, c = z.shape
    u = u.detach()
    gt = torch.zeros_like(z, dtype=torch.bool)
    gt[torch.arange(n), t] = True
    ps = F.softmax(z / temperature, 1)
    pt = F.softmax(u / temperature, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], 1)
    tckd = (bt * (torch.log(bt) - torch.log(bs))).sum(1)
    ns = F.log_softmax(z / temperature - 1000.0 * gt, 1)
    nt = F.softmax(u / temperature - 1000.0 * gt, 1)
    nckd = (torch.special.xlogy(nt, nt) - nt * ns).sum(1)
    return (alpha * tckd + beta * nckd) * temperature**2
