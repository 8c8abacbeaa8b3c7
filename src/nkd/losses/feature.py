r"""Feature- and relation-based distillation losses: the baselines the KD literature (and the NKD
paper's tables) compare against. Each is the published objective as the official code computes
it (mdistiller at a08d46f, which follows the CRD / RepDistiller code; sources in ``docs/baselines.md``).
Student features ``s`` and teacher features ``t`` are ``[N, C, H, W]`` maps (or ``[N, D]`` vectors).

* **FitNet** (Romero et al., 2015) — the hint: ``L = mean((r(s) − t)²)`` with ``r`` a trained
  regressor (:class:`ConvRegressor`) that maps the student's map onto the teacher's shape.
* **AT** (Zagoruyko & Komodakis, 2017) — attention maps ``a(f) = normalize(vec(mean_c f^p))``
  (L2 over the ``H·W`` positions), ``L = Σ_stages mean((a(s) − a(t))²)``; the larger map is first
  average-pooled to the smaller one's side.
* **RKD** (Park et al., 2019) — on vectors: distance ``ψ_D(i, j) = ‖e_i − e_j‖ / μ`` (``μ`` the mean
  of the non-zero distances) and angle ``ψ_A(i, j, k) = ⟨(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖⟩``,
  ``L = w_d · smoothL1(ψ_D^s, ψ_D^t) + w_a · smoothL1(ψ_A^s, ψ_A^t)`` (Huber with δ = 1, mean over
  the pairs / triplets).
* **ReviewKD** (Chen et al., 2021) — the hierarchical context loss on the fused student features
  (:class:`ABF`): per level ``L_ℓ = (mse(s, t) + Σ_{k∈{4,2,1}, k<H} 2^{-j_k}·mse(P_k s, P_k t)) /
  (1 + Σ 2^{-j_k})`` with ``P_k`` adaptive average pooling to ``k×k`` and ``j_k`` = 1, 2, 3 for the
  pooled levels used in that order; ``L = Σ_ℓ L_ℓ``.
* **CRD** (Tian et al., 2020) — embeddings ``v = normalize(W·f + b)`` of student and teacher pooled
  features; a memory bank per side holds one embedding per training sample. With ``K`` negatives
  per sample (other classes' samples), scores ``h(v, m) = exp(⟨v, m⟩/τ) / Z`` (``Z`` fixed on the
  first batch to ``n · mean exp(⟨v, m⟩/τ)``) and the noise probability ``P_n = 1/n``:
  ``NCE(h) = −(1/B)·Σ_b [log(h⁺/(h⁺ + K·P_n)) + Σ_j log(K·P_n/(h_j + K·P_n))]``,
  ``L = NCE(h(v_s, M_t)) + NCE(h(v_t, M_s))`` (:class:`CRDMemory`, :func:`crd_nce_loss`); after each
  step the banks move to ``normalize(μ·M[i] + (1−μ)·v_i)`` at the batch's indices.

All compute in at least float32 (autocast off; float64 inputs stay float64).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import compute_dtype, no_autocast

__all__ = ["ABF", "CRDMemory", "ConvRegressor", "Embed", "at_loss", "attention_map", "crd_nce_loss", "hcl_loss",
           "hint_loss", "rkd_loss"]


def _f32(*xs: Tensor) -> list[Tensor]:
    """The tensors in one compute dtype (:func:`~nkd.losses._common.compute_dtype`: float64 stays
    float64, every other float type — half-precision activations included — is computed in float32)."""
    dtype = compute_dtype(functools.reduce(torch.promote_types, [x.dtype for x in xs]))
    return [x.to(dtype) for x in xs]


def _check_pair(name: str, s: Tensor, t: Tensor, ndim: int | None = None) -> None:
    if not isinstance(s, Tensor) or not isinstance(t, Tensor):
        raise TypeError(f"{name}: student and teacher features must be tensors")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"{name}: student and teacher features must have the same batch size, got {tuple(s.shape)} "
                         f"and {tuple(t.shape)}")
    if ndim is not None and (s.ndim != ndim or t.ndim != ndim):
        raise ValueError(f"{name}: expected [N, C, H, W] feature maps, got {tuple(s.shape)} and {tuple(t.shape)}")


def hint_loss(s: Tensor, t: Tensor) -> Tensor:
    """FitNet's hint ``mean((s − t)²)``; ``s`` is the regressed student map (same shape as ``t``)."""
    _check_pair("hint_loss", s, t)
    if s.shape != t.shape:
        raise ValueError(f"hint_loss: the regressed student map must have the teacher's shape, got {tuple(s.shape)} "
                         f"and {tuple(t.shape)}")
    with no_autocast(s):
        s, t = _f32(s, t)
        return F.mse_loss(s, t)


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """``normalize(vec(mean_c f^p))`` ``[N, H·W]`` (L2 norm over positions, ε = 1e-12)."""
    return F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1))


def _sum_over_levels(name: str, s_feats: Sequence[Tensor], t_feats: Sequence[Tensor], term) -> Tensor:
    """``Σ_levels term(s, t)`` over paired ``[N, C, H, W]`` maps, in at least float32 with autocast off."""
    if len(s_feats) != len(t_feats) or not len(s_feats):
        raise ValueError(f"{name}: expected as many student as teacher maps (≥ 1), got {len(s_feats)} and {len(t_feats)}")
    total = None
    with no_autocast(s_feats[0]):
        for s, t in zip(s_feats, t_feats):
            _check_pair(name, s, t, ndim=4)
            value = term(*_f32(s, t))
            total = value if total is None else total + value
    return total


def at_loss(s_feats: Sequence[Tensor], t_feats: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """AT: ``Σ_stages mean((a(s) − a(t))²)``, the larger map average-pooled to the smaller side first."""

    def term(s: Tensor, t: Tensor) -> Tensor:
        hs, ht = s.shape[2], t.shape[2]
        if hs > ht:
            s = F.adaptive_avg_pool2d(s, (ht, ht))
        elif hs < ht:
            t = F.adaptive_avg_pool2d(t, (hs, hs))
        return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()

    return _sum_over_levels("at_loss", s_feats, t_feats, term)


def _pdist(e: Tensor, squared: bool, eps: float) -> Tensor:
    """Pairwise Euclidean distances ``[N, N]`` (squared ones clamped at ``eps`` before the root), 0 on the diagonal."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _angles(e: Tensor) -> Tensor:
    """``⟨(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖⟩`` for every ``(j, i, k)``, flattened ``[N³]``."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_loss(s: Tensor, t: Tensor, *, distance_weight: float = 25.0, angle_weight: float = 50.0,
             squared: bool = False, eps: float = 1e-12) -> Tensor:
    """RKD: ``w_d · smoothL1(ψ_D^s, ψ_D^t) + w_a · smoothL1(ψ_A^s, ψ_A^t)`` on ``[N, ...]`` embeddings
    (flattened per sample); the teacher's side is a constant. Needs ``N ≥ 2``."""
    _check_pair("rkd_loss", s, t)
    if s.shape[0] < 2:
        raise ValueError(f"rkd_loss: relations need at least 2 samples in the batch, got {s.shape[0]}")
    with no_autocast(s):
        s, t = _f32(s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1).detach())
        with torch.no_grad():
            td = _pdist(t, squared, eps)
            td = td / td[td > 0].mean()
            ta = _angles(t)
        sd = _pdist(s, squared, eps)
        sd = sd / sd[sd > 0].mean()
        return distance_weight * F.smooth_l1_loss(sd, td) + angle_weight * F.smooth_l1_loss(_angles(s), ta)


def hcl_loss(s_feats: Sequence[Tensor], t_feats: Sequence[Tensor]) -> Tensor:
    """ReviewKD's hierarchical context loss (module docstring), summed over the levels."""

    def term(s: Tensor, t: Tensor) -> Tensor:
        if s.shape != t.shape:
            raise ValueError(f"hcl_loss: each fused student map must have its teacher map's shape, got "
                             f"{tuple(s.shape)} and {tuple(t.shape)}")
        loss, weight, norm = F.mse_loss(s, t), 1.0, 1.0
        for k in (4, 2, 1):
            if k < s.shape[2]:
                weight /= 2.0
                loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, (k, k)), F.adaptive_avg_pool2d(t, (k, k)))
                norm += weight
        return loss / norm

    return _sum_over_levels("hcl_loss", s_feats, t_feats, term)


class ConvRegressor(nn.Module):
    """FitNet's regressor from a student map ``[N, C_s, H_s, W_s]`` to the teacher's ``[N, C_t, H_t, W_t]``:
    a 3×3 stride-2 conv when ``H_s = 2·H_t``, a 4×4 stride-2 transposed conv when ``2·H_s = H_t``,
    else a ``(1 + H_s − H_t) × (1 + W_s − W_t)`` conv (``H_s ≥ H_t``); then BatchNorm and ReLU."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], relu: bool = True):
        super().__init__()
        if len(s_shape) != 4 or len(t_shape) != 4:
            raise ValueError(f"ConvRegressor: expected [N, C, H, W] shapes, got {tuple(s_shape)} and {tuple(t_shape)}")
        (_, cs, hs, ws), (_, ct, ht, wt) = s_shape, t_shape
        if hs == 2 * ht:
            self.conv = nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
        elif 2 * hs == ht:
            self.conv = nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
        else:
            raise ValueError(f"ConvRegressor: no regressor from a {hs}×{ws} student map to a {ht}×{wt} teacher map "
                             "(the student map must be at least as large, or half as large)")
        self.bn = nn.BatchNorm2d(ct)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.relu else x


class ABF(nn.Module):
    """ReviewKD's attention-based fusion of one student level with the fused residual of the deeper ones.

    ``x' = BN(conv1×1(x))``; with a residual ``y`` (upsampled, nearest, to ``x``'s side):
    ``[a₀, a₁] = σ(conv1×1([x', y]))``, ``x' = a₀·x' + a₁·y``; ``x'`` is resized (nearest) to the
    teacher level's side and ``out = BN(conv3×3(x'))``. Returns ``(out, x')`` (``x'`` is the next
    level's residual).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_side: int) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ABF: a fusing level needs the residual of the deeper levels")
            residual = F.interpolate(residual, (h, w), mode="nearest")
            a = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * a[:, 0].view(n, 1, h, w) + residual * a[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_side:
            x = F.interpolate(x, (out_side, out_side), mode="nearest")
        return self.conv2(x), x


class Embed(nn.Module):
    """CRD's embedding: ``normalize(W·vec(f) + b)`` (L2 over the output's ``dim`` values)."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.reshape(x.shape[0], -1)), dim=1)


def crd_nce_loss(h: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's NCE loss on scores ``h`` ``[B, 1 + K]`` (the positive first; module docstring)."""
    if h.ndim != 2 or h.shape[1] < 2:
        raise ValueError(f"crd_nce_loss: expected scores [B, 1 + K] with K ≥ 1, got {tuple(h.shape)}")
    k = h.shape[1] - 1
    noise = k / float(num_data)
    log_pos = torch.log(h[:, 0] / (h[:, 0] + noise + eps))
    log_neg = torch.log(noise / (h[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / h.shape[0]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_rows(x: Tensor) -> Tensor:
    """``x`` ``[B_r, ...]`` of every process, concatenated in rank order (B_r may differ)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(_world())]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


class CRDMemory(nn.Module):
    """CRD's two memory banks (buffers ``memory_s``, ``memory_t`` ``[n, d]``, initialised uniform in
    ``±1/√(d/3)``) and normalization constants ``z`` (``−1`` until the first batch sets them).

    :meth:`scores` gives ``(h(v_s, M_t), h(v_t, M_s))`` at ``contrast_index`` ``[B, 1 + K]``;
    :meth:`update` moves the banks at the batch's ``index``. Under DDP the constants are the mean
    over the processes' first batches and every process applies every process's update, so the banks
    stay identical on all ranks (single-process CRD has one batch; this keeps its meaning).
    """

    def __init__(self, dim: int, num_data: int, temperature: float = 0.07, momentum: float = 0.5):
        super().__init__()
        stdv = 1.0 / math.sqrt(dim / 3)
        self.num_data, self.temperature, self.momentum = num_data, temperature, momentum
        self.register_buffer("memory_s", torch.rand(num_data, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(num_data, dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))

    def _score(self, v: Tensor, bank: Tensor, contrast_index: Tensor) -> Tensor:
        m = bank.index_select(0, contrast_index.reshape(-1)).view(*contrast_index.shape, -1)
        return torch.exp(torch.bmm(m.to(v.dtype), v.unsqueeze(2)).squeeze(2) / self.temperature)

    def scores(self, v_s: Tensor, v_t: Tensor, contrast_index: Tensor) -> tuple[Tensor, Tensor]:
        out_s = self._score(v_s, self.memory_t, contrast_index)
        out_t = self._score(v_t, self.memory_s, contrast_index)
        if bool(self.z[0] < 0):  # set once, from the first batch (a buffer: checkpointed and resumed)
            with torch.no_grad():
                z = torch.stack([out_s.mean(), out_t.mean()]).to(self.z.dtype) * self.num_data
                if _world() > 1:
                    dist.all_reduce(z)
                    z /= _world()
                self.z.copy_(z)
        return out_s / self.z[0], out_t / self.z[1]

    @torch.no_grad()
    def update(self, v_s: Tensor, v_t: Tensor, index: Tensor) -> None:
        if _world() > 1:
            v_s, v_t, index = _all_gather_rows(v_s), _all_gather_rows(v_t), _all_gather_rows(index)
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            moved = bank.index_select(0, index).mul_(self.momentum).add_(v.detach().to(bank.dtype), alpha=1 - self.momentum)
            bank.index_copy_(0, index, moved / moved.norm(dim=1, keepdim=True))
