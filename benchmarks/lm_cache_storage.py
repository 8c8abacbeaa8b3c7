"""Bytes per token and storage error of nkd.lm teacher caches: float32 / float16 / bfloat16 at top-k 16, 64, 256.

A tiny config-built Llama teacher (hidden 64, 2 layers, V = 4096, weights scaled ×4 so that its
log-probabilities spread like a trained model's), 16 random blocks of 64 tokens; the NKD + CE loss
of an untrained student on each cache is compared to the float32 cache's.

    python benchmarks/lm_cache_storage.py
"""

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from lm_tiny import tiny_blocks, tiny_llama  # noqa: E402
from nkd.integrations.hf import topk_distillation_loss  # noqa: E402
from nkd.lm import write_teacher_cache  # noqa: E402

torch.set_num_threads(1)
V=4096
t = tiny_llama(hidden=64, vocab=V)
with torch.no_grad():
    for p in t.parameters():
        p.mul_(4)  # sharper than a random init: spread-out log-probs
s = tiny_llama(hidden=32, layers=1, vocab=V, seed=2)
b = tiny_blocks(n=16, length=64, vocab=V)
d = tempfile.mkdtemp()
for k in (16, 64, 256):
    c = {dt: write_teacher_cache(t, b, f"{d}/{k}{dt}", top_k=k, dtype=dt) for dt in ("float32","float16","bfloat16")}
    ref = c["float32"].topk(slice(None))
    L32 = topk_distillation_loss(s, ref, b, method="nkd", ce_weight=1.0)
    for dt, cc in c.items():
        ids, lp = cc.topk(slice(None))
        err = (lp - ref[1]).abs().max().item()
        rel = ((lp - ref[1]).abs() / ref[1].abs().clamp(min=1e-6)).max().item()
        L = topk_distillation_loss(s, (ids, lp), b, method="nkd", ce_weight=1.0)
        print(f"k={k} {dt}: {cc.nbytes() / b.numel():.1f} B/token, max |Δlogp| {err:.2e}, max rel {rel:.2e}, "
              f"loss rel diff {abs(L - L32).item() / L32.item():.2e}, logp range [{ref[1].min():.1f},{ref[1].max():.2f}]")
