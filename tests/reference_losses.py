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


# ----------------------------------------------------------------------------- feature baselines
# Written from the papers and the official code's formulas (FitNet, AT: Zagoruyko & Komodakis,
# RKD: Park et al., ReviewKD: Chen et al.), with loops over samples / pairs / triplets.

def ref_at(s_feats, t_feats, p=2.0):
    """Σ_stages mean over (sample, position) of (a_s − a_t)², a = vec(mean_c f^p) / ‖·‖₂."""
    total = 0.0
    for s, t in zip(s_feats, t_feats):
        side = min(s.shape[2], t.shape[2])
        s, t = F.adaptive_avg_pool2d(s, side), F.adaptive_avg_pool2d(t, side)
        for i in range(s.shape[0]):
            a = s[i].pow(p).mean(0).flatten()
            b = t[i].pow(p).mean(0).flatten()
            a = a / a.norm().clamp_min(1e-12)
            b = b / b.norm().clamp_min(1e-12)
            total = total + ((a - b) ** 2).sum() / (s.shape[0] * a.numel())
    return total


def _huber(x):
    return torch.where(x.abs() < 1, 0.5 * x * x, x.abs() - 0.5)


def ref_rkd(s, t, distance_weight=25.0, angle_weight=50.0):
    """w_d · mean Huber(ψ_D^s − ψ_D^t) + w_a · mean Huber(ψ_A^s − ψ_A^t) over all pairs / triplets."""
    n = s.shape[0]
    s, t = s.reshape(n, -1), t.reshape(n, -1).detach()

    def dist(e):
        d = torch.stack([torch.stack([(e[i] - e[j]).norm() if i != j else e.new_zeros(()) for j in range(n)])
                         for i in range(n)])
        return d / (d.sum() / (n * (n - 1)))

    def angles(e):
        out = []
        for a in range(n):
            for b in range(n):
                for c in range(n):
                    u, v = e[b] - e[a], e[c] - e[a]
                    nu, nv = u.norm(), v.norm()
                    out.append(u @ v / (nu * nv) if a not in (b, c) else e.new_zeros(()))
        return torch.stack(out)

    loss_d = _huber(dist(s) - dist(t)).mean()
    loss_a = _huber(angles(s) - angles(t)).mean()
    return distance_weight * loss_d + angle_weight * loss_a


def ref_hcl(s_feats, t_feats):
    """Σ_levels (mse + Σ_k w_k mse(pool_k)) / (1 + Σ_k w_k), w = 1/2, 1/4, 1/8 for the pooled sides
    4, 2, 1 that are smaller than the map, in that order."""
    total = 0.0
    for s, t in zip(s_feats, t_feats):
        terms, weights = [((s - t) ** 2).mean()], [1.0]
        for k in [k for k in (4, 2, 1) if k < s.shape[2]]:
            w = 0.5 ** len(weights)
            terms.append(w * ((F.adaptive_avg_pool2d(s, k) - F.adaptive_avg_pool2d(t, k)) ** 2).mean())
            weights.append(w)
        total = total + sum(terms) / sum(weights)
    return total


def _bn_train(x, bn):
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def ref_abf(abf, x, residual, out_side):
    """One ABF level with its module's weights, written out (BatchNorm in training mode)."""
    n, _, h, w = x.shape
    x = _bn_train(F.conv2d(x, abf.conv1[0].weight), abf.conv1[1])
    if residual is not None:
        r = residual.repeat_interleave(h // residual.shape[2], 2).repeat_interleave(w // residual.shape[3], 3)
        conv = abf.att_conv[0]
        a = torch.sigmoid(F.conv2d(torch.cat([x, r], 1), conv.weight, conv.bias))
        x = x * a[:, :1] + r * a[:, 1:2]
    if x.shape[-1] != out_side:
        x = x.repeat_interleave(out_side // x.shape[2], 2).repeat_interleave(out_side // x.shape[3], 3)
    return _bn_train(F.conv2d(x, abf.conv2[0].weight, padding=1), abf.conv2[1]), x


class RefCRD:
    """CRD's memory + NCE step as the official code writes it (ContrastMemory / ContrastLoss):
    scores against the other side's bank, Z from the first batch, then the momentum update."""

    def __init__(self, memory_s, memory_t, temperature, momentum):
        self.ms, self.mt = memory_s.clone(), memory_t.clone()
        self.t, self.mom, self.z = temperature, momentum, None

    def step(self, v_s, v_t, index, cidx):
        n, k = self.ms.shape[0], cidx.shape[1] - 1
        ms, mt = self.ms.clone(), self.mt.clone()  # the banks before this step's update
        out_s = torch.stack([torch.stack([torch.exp(mt[j] @ v_s[b] / self.t) for j in cidx[b]]) for b in range(len(v_s))])
        out_t = torch.stack([torch.stack([torch.exp(ms[j] @ v_t[b] / self.t) for j in cidx[b]]) for b in range(len(v_t))])
        if self.z is None:
            self.z = (float(out_s.detach().mean()) * n, float(out_t.detach().mean()) * n)
        pn = 1.0 / n

        def nce(x):
            pos = torch.log(x[:, 0] / (x[:, 0] + k * pn + 1e-7))
            neg = torch.log((k * pn) / (x[:, 1:] + k * pn + 1e-7))
            return -(pos.sum() + neg.sum()) / x.shape[0]

        loss = nce(out_s / self.z[0]) + nce(out_t / self.z[1])
        with torch.no_grad():
            for bank, v in ((self.ms, v_s), (self.mt, v_t)):
                for b, i in enumerate(index.tolist()):
                    row = bank[i] * self.mom + v[b] * (1 - self.mom)
                    bank[i] = row / row.norm()
        return loss
