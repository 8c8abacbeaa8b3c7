"""Forward+backward time and peak memory of nkd_loss / uskd_loss against the naive formulation.

Naive = the way the official code computes (boolean-mask copies of the non-target logits,
``log(softmax)``, a second argsort for the Zipf positions), written out here as the baseline.

    python benchmarks/losses.py [--repeats 30] [--device cpu]

Peak memory on CPU is measured with the PyTorch profiler (``profile_memory``: the largest
running total of allocated tensor bytes during one forward+backward); on CUDA with
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from nkd.losses import nkd_loss, uskd_loss


def naive_nkd(z, u, t, temp=1.0, gamma=1.5):
    n, c = z.shape
    label = t.view(-1, 1)
    s_i = F.log_softmax(z, dim=1)
    t_i = F.softmax(u, dim=1)
    s_t = torch.gather(s_i, 1, label)
    t_t = torch.gather(t_i, 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(z).scatter_(1, label, 0).bool()
    zs = z[mask].reshape(n, -1)
    us = u[mask].reshape(n, -1)
    s_n = F.log_softmax(zs / temp, dim=1)
    t_n = F.softmax(us / temp, dim=1)
    loss_non = -gamma * temp**2 * (t_n * s_n).sum(dim=1).mean()
    return loss_t + loss_non


def naive_uskd(z, w, t, alpha=1.0, beta=0.1, mu=0.005):
    n, c = z.shape
    label = t.view(-1, 1)
    zipf = 1 / torch.arange(1, c + 1, device=z.device, dtype=z.dtype)
    s_i = F.softmax(z, dim=1)
    s_t = torch.gather(s_i, 1, label)
    p_t = s_t**2
    p_t = (p_t + 1 - p_t.mean(0, True)).detach()
    log_s = torch.log(s_i)
    loss_t = -(p_t * torch.gather(log_s, 1, label)).sum(1).mean()
    target = torch.zeros_like(z).scatter_(1, label, 0.9) + 0.1 / c
    w_log = torch.log(F.softmax(w, dim=1))
    loss_weak = -(mu * target * w_log).sum(1).mean()
    w_i = F.softmax(w, dim=1)
    w_t = torch.gather(w_i, 1, label)
    rank = w_i / (1 - w_t + 1e-6) + s_i / (1 - s_t + 1e-6)
    _, rank = torch.sort(rank, descending=True, dim=-1)
    ids_sort = torch.argsort(rank)
    z_i = torch.gather(zipf.repeat(n, 1), 1, ids_sort)
    mask = torch.ones_like(z).scatter_(1, label, 0).bool()
    ns = torch.log(F.softmax(z[mask].reshape(n, -1), dim=1))
    nz = z_i[mask].reshape(n, -1)
    nz = (nz / nz.sum(1, keepdim=True)).detach()
    loss_non = -(nz * ns).sum(1).mean()
    return alpha * loss_t + beta * loss_non + loss_weak


def run_step(fn, z, other, t):
    z.grad = None
    if other.requires_grad:
        other.grad = None
    fn(z, other, t).backward()


def time_it(fn, z, other, t, repeats, device):
    for _ in range(3):
        run_step(fn, z, other, t)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run_step(fn, z, other, t)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn, z, other, t, device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_step(fn, z, other, t)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step(fn, z, other, t)
    running, peak = 0, 0
    events = sorted(
        (e for e in prof.events() if getattr(e, "cpu_memory_usage", 0)), key=lambda e: e.time_range.start
    )
    for e in events:
        running += e.cpu_memory_usage
        peak = max(peak, running)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="256x100,1024x1000,256x32000")
    ap.add_argument("--no-value-checks", action="store_true",
                    help="time nkd's losses with label value checks off (as the Trainer's hot loop runs them)")
    args = ap.parse_args()
    if args.no_value_checks:
        from nkd.losses import value_checks

        value_checks(False).__enter__()
    dev = args.device
    print(f"# torch {torch.__version__}, device {dev}, threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, value checks {'off' if args.no_value_checks else 'on'}")
    print("| loss | N×C | naive ms | nkd ms | time ratio (nkd/naive) | naive peak MiB | nkd peak MiB | mem ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n, c = map(int, size.split("x"))
        g = torch.Generator(device="cpu").manual_seed(0)
        z = (torch.randn(n, c, generator=g) * 3).to(dev).requires_grad_(True)
        u = (torch.randn(n, c, generator=g) * 3).to(dev)
        w = (torch.randn(n, c, generator=g) * 3).to(dev).requires_grad_(True)
        t = torch.randint(0, c, (n,), generator=g).to(dev)
        cases = [
            ("nkd", naive_nkd, lambda z, u, t: nkd_loss(z, u, t), u),
            ("uskd", naive_uskd, lambda z, w, t: uskd_loss(z, w, t), w),
        ]
        for name, naive, ours, other in cases:
            # same value first: the baseline is a faithful formulation
            with torch.no_grad():
                a, b = naive(z, other, t).item(), ours(z, other, t).item()
            assert abs(a - b) <= 1e-3 * max(1.0, abs(a)), (name, a, b)
            tn = time_it(naive, z, other, t, args.repeats, dev)
            to = time_it(ours, z, other, t, args.repeats, dev)
            mn = peak_bytes(naive, z, other, t, dev) / 2**20
            mo = peak_bytes(ours, z, other, t, dev) / 2**20
            print(f"| {name}_loss | {n}×{c} | {tn * 1e3:.2f} | {to * 1e3:.2f} | {to / tn:.2f}× | {mn:.1f} | {mo:.1f} | "
                  f"{mo / mn:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
