"""Peak extra memory and time of the fused, chunked token-level losses against the materialized path.

Baseline ("materialized"): the logits are formed whole and the existing losses are applied,

    z = hidden @ weight.T                          # [N, V], with autograd
    with torch.no_grad(): u = t_hidden @ t_weight.T
    nkd_loss(z, u, target).backward()              # (kd_loss(..., temperature=1) for KD)

against ``fused_linear_nkd_loss`` / ``fused_linear_kd_loss(hidden, weight, t_hidden, t_weight,
target).backward()``. One forward + backward each, CPU, float32.

    python benchmarks/fused_linear.py [--n 4096 --h 256 --v 32000] [--repeats 5] [--chunk-size K]

* Exactness: value and gradients (hidden, weight) of fused vs materialized in float64 at the
  same shape, as the largest relative error ``max|a − b| / max|b|``.
* Peak extra memory: each variant runs in a fresh subprocess that builds the inputs, runs one
  warm-up step at full size (loads the matmul kernels' library pages, which would otherwise
  count), drops the gradients, resets the kernel's resident-set high-water mark (``echo 5 >
  /proc/self/clear_refs``), records its resident set size ``RSS_0`` and runs one forward +
  backward; peak extra = ``VmHWM`` after − ``RSS_0`` (``/proc/self/status``: the OS's peak
  resident memory of the process above the inputs; gradients included, both paths produce
  them). This is the ``ru_maxrss`` idea without its catch: ``ru_maxrss`` carries over the
  parent's peak through fork/exec, so a child's delta can be hidden under it. The same child then
  repeats the step under the PyTorch profiler (``profile_memory``) and reports the largest
  ``Total Allocated`` of its memory events (the CPU allocator's running total), a second,
  allocator-level measure.
* Time: all variants in one process, interleaved (A B C D, A B C D, ...) so that load from other
  processes hits them alike; median and min of ``--repeats`` rounds after a warm-up, as wall
  time and as the process's CPU time (``time.process_time``, all threads), which other
  processes' load disturbs less on a shared machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nkd.losses import fused_linear_kd_loss, fused_linear_nkd_loss, kd_loss, nkd_loss  # noqa: E402

VARIANTS = ("materialized_nkd", "fused_nkd", "materialized_kd", "fused_kd")


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Inputs created in place (no temporaries that would raise the RSS high-water mark)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden=torch.randn(n, h, generator=g, dtype=dtype).requires_grad_(True),
        weight=torch.randn(v, h, generator=g, dtype=dtype).mul_(h**-0.5).requires_grad_(True),
        t_hidden=torch.randn(n, h, generator=g, dtype=dtype),
        t_weight=torch.randn(v, h, generator=g, dtype=dtype).mul_(1.5 * h**-0.5),
        target=torch.randint(0, v, (n,), generator=g),
    )


def loss_of(variant: str, x: dict, chunk_size: int | None) -> torch.Tensor:
    h, w, th, tw, t = x["hidden"], x["weight"], x["t_hidden"], x["t_weight"], x["target"]
    if variant.startswith("materialized"):
        z = h @ w.T
        with torch.no_grad():
            u = th @ tw.T
        return nkd_loss(z, u, t) if variant.endswith("nkd") else kd_loss(z, u, t, temperature=1.0)
    fn = fused_linear_nkd_loss if variant.endswith("nkd") else fused_linear_kd_loss
    return fn(h, w, th, tw, t, chunk_size=chunk_size)


def step(variant: str, x: dict, chunk_size: int | None) -> None:
    x["hidden"].grad = None
    x["weight"].grad = None
    loss_of(variant, x, chunk_size).backward()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def profiler_peak(variant: str, x: dict, chunk_size: int | None) -> int:
    """Largest ``Total Allocated`` of the profiler's ``[memory]`` events: the CPU allocator's running
    total of the bytes allocated while profiling (summing the ops' ``cpu_memory_usage`` instead
    would count an allocation once per enclosing op)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(variant, x, chunk_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return max((e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"), default=0)


def child(args) -> None:
    """Measure one variant's peak memory in this (fresh) process; print one JSON line."""
    torch.set_num_threads(args.threads)
    x = make_inputs(args.n, args.h, args.v, torch.float32)
    step(args.child, x, args.chunk_size)  # warm-up at full size: kernels, library pages, thread pools
    x["hidden"].grad = x["weight"].grad = None
    gc.collect()
    reset_peak_rss()
    rss0, max0 = rss_bytes(), peak_rss_bytes()
    step(args.child, x, args.chunk_size)
    max1 = peak_rss_bytes()
    prof = profiler_peak(args.child, x, args.chunk_size)
    print(json.dumps(dict(variant=args.child, rss0=rss0, hwm0=max0, hwm1=max1, extra=max1 - rss0,
                          new_high=max1 > max0, profiler_peak=prof)))


def exactness(n: int, h: int, v: int, chunk_size: int | None) -> dict:
    """Largest relative error of fused vs materialized in float64 (value, d/dhidden, d/dweight)."""
    out = {}
    for method in ("nkd", "kd"):
        x = make_inputs(n, h, v, torch.float64, seed=2)
        res = []
        for variant in (f"materialized_{method}", f"fused_{method}"):
            x["hidden"].grad = x["weight"].grad = None
            loss = loss_of(variant, x, chunk_size)
            loss.backward()
            res.append((loss.detach(), x["hidden"].grad.clone(), x["weight"].grad.clone()))
            del loss
            gc.collect()
        out[method] = {name: float((a - b).abs().max() / b.abs().max()) for name, b, a in zip(("value", "grad_hidden", "grad_weight"),
                                                                                             res[0], res[1])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-exactness", action="store_true")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    from nkd.losses.fused import default_chunk_size

    cs = args.chunk_size or default_chunk_size(args.v)
    print(f"# N={args.n} H={args.h} V={args.v} float32, chunk_size={cs}; torch {torch.__version__}, {args.threads} threads, "
          f"{platform.processor() or platform.machine()}, Python {platform.python_version()}")
    if not args.skip_exactness:
        err = exactness(args.n, args.h, args.v, args.chunk_size)
        print("float64 exactness, max relative error fused vs materialized:")
        for method, e in err.items():
            print(f"  {method}: " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()))

    mem = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--n", str(args.n), "--h", str(args.h), "--v", str(args.v),
               "--threads", str(args.threads)] + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        mem[variant] = json.loads(out.stdout.strip().splitlines()[-1])

    x = make_inputs(args.n, args.h, args.v, torch.float32)
    for variant in VARIANTS:
        step(variant, x, args.chunk_size)  # warm-up
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            t0, c0 = time.perf_counter(), time.process_time()
            step(variant, x, args.chunk_size)
            times[variant].append(time.perf_counter() - t0)
            cpu[variant].append(time.process_time() - c0)

    mib = 2**20
    print("| variant | wall median ms | wall min ms | CPU median ms | peak extra RSS MiB | profiler peak MiB |")
    print("|---|---|---|---|---|---|")
    for variant in VARIANTS:
        m = mem[variant]
        flag = "" if m["new_high"] else " (no new high-water mark)"
        print(f"| {variant} | {statistics.median(times[variant]) * 1e3:.0f} | {min(times[variant]) * 1e3:.0f} | "
              f"{statistics.median(cpu[variant]) * 1e3:.0f} | {m['extra'] / mib:.0f}{flag} | {m['profiler_peak'] / mib:.0f} |")
    print("| ratio fused / materialized | wall (median) | wall (min) | CPU (median) | peak extra RSS | profiler peak |")
    print("|---|---|---|---|---|---|")
    for method in ("nkd", "kd"):
        f, b = f"fused_{method}", f"materialized_{method}"
        rss = mem[b]["extra"] / mem[f]["extra"]
        prof = mem[b]["profiler_peak"] / mem[f]["profiler_peak"]
        print(f"| {method} | {statistics.median(times[f]) / statistics.median(times[b]):.2f}× | "
              f"{min(times[f]) / min(times[b]):.2f}× | {statistics.median(cpu[f]) / statistics.median(cpu[b]):.2f}× | "
              f"{1 / rss:.3f}× (1/{rss:.1f}) | {1 / prof:.3f}× (1/{prof:.1f}) |")


if __name__ == "__main__":
    main()
