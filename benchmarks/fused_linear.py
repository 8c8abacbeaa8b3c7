"""Peak extra memory and time of the fused, chunked token-level losses against the materialized path
and against Liger-Kernel's chunked JSD (``liger_kernel.chunked_loss``), side by side in one run.

Baseline ("materialized"): the logits are formed whole and the existing losses are applied,

    z = hidden @ weight.T                          # [N, V], with autograd
    with torch.no_grad(): u = t_hidden @ t_weight.T
    nkd_loss(z, u, target).backward()              # (kd_loss(..., temperature=1) for KD)

against ``fused_linear_nkd_loss`` / ``fused_linear_kd_loss`` / ``fused_linear_jsd_loss(hidden, weight,
t_hidden, t_weight, target).backward()``, and Liger-Kernel's ``LigerFusedLinearJSDLoss`` (its
``torch.compile``'d chunked loss, run on CPU) at β = 0 (forward KL: the same quantity as nkd's KD at
temperature 1 and nkd's JSD at β = 0) and β = 0.5 (nkd's JSD at β = 0.5), with
``weight_hard_loss=0, weight_soft_loss=1, temperature=1`` (Liger then averages the per-token
divergence over the non-ignored tokens, as nkd's ``reduction="mean"``). One forward + backward each,
CPU, float32 and bfloat16 (bf16 inputs and weights; nkd forms the logits with the bf16 matmul and does
the loss maths in float32, Liger does it in bf16).

    python benchmarks/fused_linear.py [--shape default|llama3] [--n 4096 --h 256 --v 32000]
        [--dtypes float32,bfloat16] [--repeats 5] [--chunk-size K] [--threads 1] [--json out.json]

``--shape llama3`` is N 2048, H 512, V 128,256 (the Llama-3 vocabulary); the materialized variants
are left out there unless ``--materialized`` (they need ≈ 10 GB). Liger-Kernel is a benchmark-only
dependency (``pip install liger-kernel``); without it the Liger variants are skipped.

* Exactness: value and gradients (hidden, weight) of fused vs materialized in float64 at the
  same shape, as the largest relative error ``max|a − b| / max|b|`` (``--skip-exactness`` skips).
* Value agreement: each contender's loss against a float64 reference computed chunk by chunk with
  the dense losses (``kd_loss`` / ``nkd_loss`` / ``jsd_loss`` on float64 logits): "exact" = the
  logits formed in float64 from the (bf16) inputs; "bf16 logits" = the logits of the bf16 matmul,
  rounded to bf16, then float64 (what "float32 maths" is measured against); and nkd vs Liger
  directly (value and gradients).
* Peak extra memory: each variant runs in a fresh subprocess that builds the inputs, runs one
  warm-up step at full size (loads the matmul kernels' library pages, which would otherwise
  count; Liger compiles here), drops the gradients, resets the kernel's resident-set high-water
  mark (``echo 5 > /proc/self/clear_refs``), records its resident set size ``RSS_0`` and runs one
  forward + backward; peak extra = ``VmHWM`` after − ``RSS_0`` (``/proc/self/status``: the OS's peak
  resident memory of the process above the inputs; gradients included, every path produces
  them). This is the ``ru_maxrss`` idea without its catch: ``ru_maxrss`` carries over the
  parent's peak through fork/exec, so a child's delta can be hidden under it. The same child then
  repeats the step under the PyTorch profiler (``profile_memory``) and reports the largest
  ``Total Allocated`` of its memory events (the CPU allocator's running total), a second,
  allocator-level measure (``--no-profiler`` skips it).
* Time: all variants in one process, interleaved (A B C D, A B C D, ...) so that load from other
  processes hits them alike; median and min of ``--repeats`` rounds after a warm-up (the first
  call, reported separately: for Liger it includes ``torch.compile``, timed with an empty inductor
  cache, a fresh ``TORCHINDUCTOR_CACHE_DIR``), as wall time and as the process's CPU time
  (``time.process_time``, all threads), which other processes' load disturbs less on a shared machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nkd.losses import (  # noqa: E402
    fused_linear_jsd_loss,
    fused_linear_kd_loss,
    fused_linear_nkd_loss,
    jsd_loss,
    kd_loss,
    nkd_loss,
)

VARIANTS = ("materialized_nkd", "fused_nkd", "materialized_kd", "fused_kd", "fused_jsd0", "fused_jsd5", "liger_jsd0", "liger_jsd5")
SHAPES = {"default": (4096, 256, 32000), "llama3": (2048, 512, 128256)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
# the quantity each variant computes (value agreement) and the Liger variant it is compared with
METHOD = {"materialized_nkd": "nkd", "fused_nkd": "nkd", "materialized_kd": "jsd0", "fused_kd": "jsd0", "fused_jsd0": "jsd0",
          "fused_jsd5": "jsd5", "liger_jsd0": "jsd0", "liger_jsd5": "jsd5"}
VS_LIGER = {"fused_kd": "liger_jsd0", "fused_nkd": "liger_jsd0", "fused_jsd0": "liger_jsd0", "fused_jsd5": "liger_jsd5"}
BETA = {"jsd0": 0.0, "jsd5": 0.5}


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Inputs created in place (no temporaries that would raise the RSS high-water mark); bf16 inputs
    are drawn in float32 chunks and rounded (the same values at every dtype, up to the rounding)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        out = torch.empty(*shape, dtype=dtype)
        step = max(1, 2**22 // shape[-1])
        for s in range(0, shape[0], step):
            out[s : s + step] = torch.randn(min(step, shape[0] - s), *shape[1:], generator=g).mul_(scale)
        return out

    return dict(
        hidden=randn(n, h).requires_grad_(True),
        weight=randn(v, h, scale=h**-0.5).requires_grad_(True),
        t_hidden=randn(n, h),
        t_weight=randn(v, h, scale=1.5 * h**-0.5),
        target=torch.randint(0, v, (n,), generator=g),
    )


_LIGER: dict = {}


def liger(beta: float):
    """Liger's module at ``beta`` (imported here only: a benchmark-only dependency)."""
    if beta not in _LIGER:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        _LIGER[beta] = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=1.0)
    return _LIGER[beta]


def loss_of(variant: str, x: dict, chunk_size: int | None) -> torch.Tensor:
    h, w, th, tw, t = x["hidden"], x["weight"], x["t_hidden"], x["t_weight"], x["target"]
    if variant.startswith("materialized"):
        z = h @ w.T
        with torch.no_grad():
            u = th @ tw.T
        return nkd_loss(z, u, t) if variant.endswith("nkd") else kd_loss(z, u, t, temperature=1.0)
    if variant.startswith("liger"):
        return liger(BETA[METHOD[variant]])(h, w, th, tw, t)
    if variant == "fused_nkd":
        return fused_linear_nkd_loss(h, w, th, tw, t, chunk_size=chunk_size)
    if variant == "fused_kd":
        return fused_linear_kd_loss(h, w, th, tw, t, chunk_size=chunk_size)
    return fused_linear_jsd_loss(h, w, th, tw, t, beta=BETA[METHOD[variant]], chunk_size=chunk_size)


def step(variant: str, x: dict, chunk_size: int | None) -> float:
    x["hidden"].grad = None
    x["weight"].grad = None
    loss = loss_of(variant, x, chunk_size)
    loss.backward()
    return float(loss)


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
    x = make_inputs(args.n, args.h, args.v, DTYPES[args.dtype])
    step(args.child, x, args.chunk_size)  # warm-up at full size: kernels, library pages, thread pools, compilation
    x["hidden"].grad = x["weight"].grad = None
    gc.collect()
    reset_peak_rss()
    rss0, max0 = rss_bytes(), peak_rss_bytes()
    step(args.child, x, args.chunk_size)
    max1 = peak_rss_bytes()
    prof = profiler_peak(args.child, x, args.chunk_size) if args.profiler else None
    print(json.dumps(dict(variant=args.child, dtype=args.dtype, rss0=rss0, hwm0=max0, hwm1=max1, extra=max1 - rss0,
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


def reference(method: str, x: dict, round_logits: bool, rows: int = 256) -> float:
    """float64 loss of ``method`` by the dense losses, ``rows`` tokens at a time: logits in float64
    from the inputs, or (``round_logits``) the inputs' own matmul output (bf16) converted to float64."""
    h, w, th, tw, t = (x[k].detach() for k in ("hidden", "weight", "t_hidden", "t_weight", "target"))
    total = 0.0
    with torch.no_grad():
        w64, tw64 = w.double(), tw.double()
        for s in range(0, h.shape[0], rows):
            sl = slice(s, s + rows)
            if round_logits:
                z, u = (h[sl] @ w.T).double(), (th[sl] @ tw.T).double()
            else:
                z, u = h[sl].double() @ w64.T, th[sl].double() @ tw64.T
            if method == "nkd":
                total += float(nkd_loss(z, u, t[sl], reduction="sum"))
            else:
                total += float(jsd_loss(z, u, t[sl], beta=BETA[method], temperature=1.0, reduction="sum"))
    return total / h.shape[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=tuple(SHAPES), default="default", help="default: N 4096, H 256, V 32000; llama3: 2048, 512, 128256")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--h", type=int, default=None)
    ap.add_argument("--v", type=int, default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)  # a memory child's dtype
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--materialized", action="store_true", help="run the materialized variants at --shape llama3 too")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-exactness", action="store_true")
    ap.add_argument("--no-profiler", dest="profiler", action="store_false", help="memory children skip the profiler's allocator peak")
    ap.add_argument("--json", default=None, help="also write every figure to this file")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    n0, h0, v0 = SHAPES[args.shape]
    args.n, args.h, args.v = args.n or n0, args.h or h0, args.v or v0
    if args.child:
        return child(args)
    # an empty inductor cache, so Liger's first call shows its whole compile time (children share it)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fused_linear_inductor_")
    torch.set_num_threads(args.threads)
    from nkd.losses.fused import default_chunk_size

    variants = [v for v in args.variants.split(",") if v]
    if args.shape == "llama3" and not args.materialized:
        variants = [v for v in variants if not v.startswith("materialized")]
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        liger_version = version("liger-kernel")
    except ImportError:
        liger_version = None
        variants = [v for v in variants if not v.startswith("liger")]
        print("# liger-kernel not installed: its variants are skipped (pip install liger-kernel)")
    dtypes = [d for d in args.dtypes.split(",") if d]
    runs = [(v, d) for d in dtypes for v in variants if d == "float32" or not v.startswith("materialized")]

    cs = args.chunk_size or "/".join(str(default_chunk_size(args.v, DTYPES[d])) for d in args.dtypes.split(",") if d)
    with open("/proc/cpuinfo") as f:
        cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    load = os.getloadavg()
    print(f"# N={args.n} H={args.h} V={args.v} {'/'.join(dtypes)}, nkd chunk_size={cs}, Liger {liger_version} chunk_size=1024; "
          f"torch {torch.__version__}, {args.threads} threads, {cpu_model} ({os.cpu_count()} CPUs), Python {platform.python_version()}, "
          f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    report: dict = dict(shape=[args.n, args.h, args.v], dtypes=dtypes, threads=args.threads, chunk_size=cs, torch=torch.__version__,
                        liger=liger_version, cpu=cpu_model, load_start=load)
    if not args.skip_exactness:
        err = exactness(args.n, args.h, args.v, args.chunk_size)
        report["exactness"] = err
        print("float64 exactness, max relative error fused vs materialized:")
        for method, e in err.items():
            print(f"  {method}: " + ", ".join(f"{k} {v:.2e}" for k, v in e.items()))

    # ---- time: one process, interleaved rounds; the first call separately
    inputs = {d: make_inputs(args.n, args.h, args.v, DTYPES[d]) for d in dtypes}
    first: dict = {}
    values: dict = {}
    for v, d in runs:
        t0 = time.perf_counter()
        step(v, inputs[d], args.chunk_size)
        first[v, d] = time.perf_counter() - t0
    times: dict = {r: [] for r in runs}
    cpu: dict = {r: [] for r in runs}
    grads: dict = {}
    for i in range(args.repeats):
        for v, d in runs:
            x = inputs[d]
            t0, c0 = time.perf_counter(), time.process_time()
            values[v, d] = step(v, x, args.chunk_size)
            times[v, d].append(time.perf_counter() - t0)
            cpu[v, d].append(time.process_time() - c0)
            if i == args.repeats - 1 and (v in VS_LIGER or v.startswith("liger")):
                grads[v, d] = (x["hidden"].grad.clone(), x["weight"].grad.clone())
    load_end = os.getloadavg()
    report["load_end"] = load_end

    # ---- memory: one fresh process per variant (after the timing: the inductor cache is warm)
    mem = {}
    for v, d in runs:
        cmd = [sys.executable, __file__, "--child", v, "--dtype", d, "--n", str(args.n), "--h", str(args.h), "--v", str(args.v),
               "--threads", str(args.threads)] + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else [])
        cmd += [] if args.profiler else ["--no-profiler"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        mem[v, d] = json.loads(out.stdout.strip().splitlines()[-1])

    # ---- value agreement against float64
    refs = {}
    for d in dtypes:
        for method in sorted({METHOD[v] for v, dd in runs if dd == d}):
            refs[method, d, "exact"] = reference(method, inputs[d], round_logits=False)
            if d != "float32":
                refs[method, d, "rounded"] = reference(method, inputs[d], round_logits=True)

    mib = 2**20
    med = {r: statistics.median(times[r]) for r in runs}
    medc = {r: statistics.median(cpu[r]) for r in runs}
    print(f"load average at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print("| variant | dtype | wall median ms | wall min ms | CPU median ms | first call ms | peak extra RSS MiB | profiler peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for v, d in runs:
        m = mem[v, d]
        flag = "" if m["new_high"] else " (no new high-water mark)"
        prof = "–" if m["profiler_peak"] is None else f"{m['profiler_peak'] / mib:.0f}"
        print(f"| {v} | {SHORT[d]} | {med[v, d] * 1e3:.0f} | {min(times[v, d]) * 1e3:.0f} | {medc[v, d] * 1e3:.0f} | "
              f"{first[v, d] * 1e3:.0f} | {m['extra'] / mib:.0f}{flag} | {prof} |")
        rows.append(dict(variant=v, dtype=d, wall=times[v, d], cpu=cpu[v, d], first_call=first[v, d], mem=m, value=values[v, d]))
    report["rows"] = rows
    if any(v.startswith("liger") for v, _ in runs):
        print("Liger's first call (includes torch.compile, empty inductor cache) minus its median step: "
              + ", ".join(f"{v} {SHORT[d]} {first[v, d] - med[v, d]:.1f} s" for v, d in runs if v.startswith("liger")))
    if any(v.startswith("materialized") for v, _ in runs):
        print("| ratio fused / materialized (fp32) | wall (median) | wall (min) | CPU (median) | peak extra RSS | profiler peak |")
        print("|---|---|---|---|---|---|")
        for method in ("nkd", "kd"):
            f, b = (f"fused_{method}", "float32"), (f"materialized_{method}", "float32")
            if f not in mem or b not in mem:
                continue
            rss = mem[b]["extra"] / mem[f]["extra"]
            prof = "–" if mem[f]["profiler_peak"] is None else f"{mem[f]['profiler_peak'] / mem[b]['profiler_peak']:.3f}×"
            print(f"| {method} | {med[f] / med[b]:.2f}× | {min(times[f]) / min(times[b[0], b[1]]):.2f}× | {medc[f] / medc[b]:.2f}× | "
                  f"{1 / rss:.3f}× (1/{rss:.1f}) | {prof} |")
    ratios = []
    if any(v.startswith("liger") for v, _ in runs):
        print("| nkd / Liger | dtype | vs | CPU (median) | wall (median) | wall (min) | peak extra RSS | profiler peak | "
              "time target | met |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for v, d in runs:
            lg = VS_LIGER.get(v)
            if lg is None or (lg, d) not in mem:
                continue
            a, b = (v, d), (lg, d)
            target = 0.9 if d == "float32" else 1.0
            rc = medc[a] / medc[b]
            rm = mem[a]["extra"] / mem[b]["extra"]
            rp = None if mem[a]["profiler_peak"] is None else mem[a]["profiler_peak"] / mem[b]["profiler_peak"]
            met = "yes" if rc <= target and rm <= 0.6 else "no"
            print(f"| {v} | {SHORT[d]} | {lg} | {rc:.2f}× | {med[a] / med[b]:.2f}× | {min(times[a]) / min(times[b]):.2f}× | {rm:.3f}× | "
                  f"{'–' if rp is None else f'{rp:.3f}×'} | ≤ {target}× time, ≤ 0.6× memory | {met} |")
            ratios.append(dict(variant=v, dtype=d, vs=lg, cpu=rc, wall=med[a] / med[b], rss=rm, profiler=rp))
    report["ratios"] = ratios

    print("| variant | dtype | loss | rel. diff vs float64 (exact logits) | vs float64 of the bf16 logits | vs Liger value | "
          "vs Liger ∂h, ∂W (max rel.) |")
    print("|---|---|---|---|---|---|---|")
    agree = []
    for v, d in runs:
        method = METHOD[v]
        ex = abs(values[v, d] - refs[method, d, "exact"]) / abs(refs[method, d, "exact"])
        ro = abs(values[v, d] - refs[method, d, "rounded"]) / abs(refs[method, d, "rounded"]) if (method, d, "rounded") in refs else None
        lg = VS_LIGER.get(v) if METHOD[v] == METHOD.get(VS_LIGER.get(v, ""), None) else None
        vl = gl = None
        if lg is not None and (lg, d) in values:
            vl = abs(values[v, d] - values[lg, d]) / abs(values[lg, d])
            gl = tuple(_rel(a, b) for a, b in zip(grads[v, d], grads[lg, d]))
        print(f"| {v} | {SHORT[d]} | {values[v, d]:.7g} | {ex:.1e} | {'–' if ro is None else f'{ro:.1e}'} | "
              f"{'–' if vl is None else f'{vl:.1e}'} | {'–' if gl is None else f'{gl[0]:.1e}, {gl[1]:.1e}'} |")
        agree.append(dict(variant=v, dtype=d, value=values[v, d], vs_exact=ex, vs_rounded=ro, vs_liger=vl, grads_vs_liger=gl))
    report["agreement"] = agree
    report["references"] = {f"{m}/{d}/{k}": val for (m, d, k), val in refs.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
