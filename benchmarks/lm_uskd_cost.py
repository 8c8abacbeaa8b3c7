"""Cost of token-level USKD against token-level NKD, both fused with the LM head (forward + backward).

N tokens, width H, vocabulary V, float32, on this process's threads (default 1). NKD: CE + NKD
against a linear teacher of the same width (its head a constant). USKD: CE + USKD with a trained
weak head of the same width on a second hidden state (gradients to all four tensors). Each loss
is called once to warm up (excluded), then both are timed ``--repeats`` times, interleaved; the median is reported,
with USKD's breakdown: the first pass (batch mean of s_t²), the exact rank (the sort of V
scores per token) and the rest.

    python benchmarks/lm_uskd_cost.py [--n 4096] [--h 256] [--v 32000] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nkd.losses import _common, fused_linear_nkd_loss, fused_linear_uskd_loss  # noqa: E402
from nkd.losses.chunked import default_chunk_size  # noqa: E402
from nkd.losses.uskd import target_sq  # noqa: E402


def timed(fn, repeats: int, warm: bool = True) -> list[float]:
    if warm:
        fn()  # first call excluded
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=256)
    ap.add_argument("--v", type=int, default=32000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    n, h, v = args.n, args.h, args.v
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * h**-0.5).requires_grad_()
    second = torch.randn(n, h, generator=g)  # the teacher's hidden states (NKD) / the weak head's input (USKD)
    second_w = torch.randn(v, h, generator=g) * h**-0.5
    target = torch.randint(0, v, (n,), generator=g)
    weak_hidden, weak_weight = second.clone().requires_grad_(), second_w.clone().requires_grad_()

    def nkd():
        fused_linear_nkd_loss(hidden, weight, second, second_w, target, ce_weight=1.0).backward()

    def uskd():
        fused_linear_uskd_loss(hidden, weight, weak_hidden, weak_weight, target, ce_weight=1.0).backward()

    nkd(), uskd()  # first calls excluded
    t_nkd, t_uskd = [], []
    for _ in range(args.repeats):  # interleaved, so that a load on the machine hits both alike
        t_nkd += timed(nkd, 1, warm=False)
        t_uskd += timed(uskd, 1, warm=False)

    # breakdown of USKD: its first pass, and the exact rank (sort of the V scores of every token)
    cs = default_chunk_size(v)
    chunks = [slice(s, min(s + cs, n)) for s in range(0, n, cs)]

    def first_pass():
        with torch.no_grad():
            for sel in chunks:
                target_sq(hidden[sel] @ weight.t(), target[sel, None])

    score = torch.rand(cs, v, generator=g)

    def ranks():
        for sel in chunks:
            _common.descending_order(score[: sel.stop - sel.start])

    def ranks_torch_sort():
        for sel in chunks:
            torch.sort(score[: sel.stop - sel.start], dim=-1, descending=True, stable=True)

    t_first, t_rank = timed(first_pass, args.repeats), timed(ranks, args.repeats)
    t_sort = timed(ranks_torch_sort, 1)
    med = statistics.median
    res = dict(n=n, h=h, v=v, threads=args.threads, chunk_size=cs, nkd_s=med(t_nkd), uskd_s=med(t_uskd),
               ratio=med(t_uskd) / med(t_nkd), uskd_first_pass_s=med(t_first), uskd_rank_s=med(t_rank),
               torch_sort_rank_s=med(t_sort), nkd_runs=t_nkd, uskd_runs=t_uskd)
    print(f"N={n} H={h} V={v} float32, {args.threads} thread(s), chunk {cs} rows, median of {args.repeats} (first call excluded)")
    print(f"  fused NKD  (CE + NKD, linear teacher)  fwd+bwd {res['nkd_s']:.2f} s")
    print(f"  fused USKD (CE + USKD, weak head)      fwd+bwd {res['uskd_s']:.2f} s  = {res['ratio']:.2f}x NKD")
    print(f"    of which: first pass (mean s_t^2) {res['uskd_first_pass_s']:.2f} s, exact rank {res['uskd_rank_s']:.2f} s "
          f"(with torch.sort it would be {res['torch_sort_rank_s']:.2f} s)")
    return res


if __name__ == "__main__":
    main()
