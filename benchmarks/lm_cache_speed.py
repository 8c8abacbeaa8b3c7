"""Student step time from a teacher cache vs a live teacher, and cache read throughput (cold page cache).

Llama student and teacher built from configs (nothing downloaded), V = 4096, blocks of 128 tokens,
batch 8, NKD + CE with the fused loss, AdamW; one CPU thread. The live step runs the teacher
(``nkd.lm.teacher_topk``, the same top-k a cache stores) and then the same student step. Steps of
the two kinds alternate, medians are reported. Read throughput: random batches of rows from the
cache after its shards are evicted from the page cache (``posix_fadvise(DONTNEED)``).

    python benchmarks/lm_cache_speed.py [--teacher-hidden 128] [--teacher-layers 2] [--top-k 64]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nkd.integrations.hf import topk_distillation_loss  # noqa: E402
from nkd.lm import TeacherCache, teacher_topk, write_teacher_cache  # noqa: E402


def llama(hidden, layers, vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 7) // 8 * 8,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=256, tie_word_embeddings=True))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--student-hidden", type=int, default=128)
    ap.add_argument("--student-layers", type=int, default=2)
    ap.add_argument("--teacher-hidden", type=int, default=128)
    ap.add_argument("--teacher-layers", type=int, default=2)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    V, n = a.vocab, a.batch * a.steps * 2
    blocks = torch.randint(0, V, (n, a.seq), generator=torch.Generator().manual_seed(0))
    teacher = llama(a.teacher_hidden, a.teacher_layers, V, 0).eval().requires_grad_(False)
    student = llama(a.student_hidden, a.student_layers, V, 1)
    d = tempfile.mkdtemp()
    t0 = time.perf_counter()
    cache = write_teacher_cache(teacher, blocks, f"{d}/c", top_k=a.top_k, batch_size=a.batch)
    write_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

    def step(i, live):
        idx = torch.arange(i * a.batch, (i + 1) * a.batch)
        ids = blocks[idx]
        t = time.perf_counter()
        topk = teacher_topk(teacher, ids, a.top_k)[:2] if live else cache.topk(idx)
        loss = topk_distillation_loss(student, topk, ids, method="nkd", ce_weight=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step(0, True)
    step(0, False)  # warm-up
    live, cached = [], []
    for i in range(a.steps):
        live.append(step(2 * i, True))
        cached.append(step(2 * i + 1, False))
    # cold read throughput
    for s in cache.manifest["shards"]:
        fd = os.open(Path(d) / "c" / s["file"], os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    cold = TeacherCache(f"{d}/c")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    t = time.perf_counter()
    for i in range(0, n, a.batch):
        cold.topk(perm[i : i + a.batch])
    read_s = time.perf_counter() - t
    tok_step = a.batch * a.seq
    med_live, med_cache = statistics.median(live), statistics.median(cached)
    out = dict(args=vars(a), teacher_params=sum(p.numel() for p in teacher.parameters()),
               student_params=sum(p.numel() for p in student.parameters()), cache_write_s=write_s,
               cache_bytes_per_token=cache.nbytes() / blocks.numel(), step_live_s=med_live, step_cache_s=med_cache,
               ratio_cache_over_live=med_cache / med_live, cold_read_tokens_per_s=n * a.seq / read_s,
               student_tokens_per_s=tok_step / med_cache, read_over_consumption=(n * a.seq / read_s) / (tok_step / med_cache))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
