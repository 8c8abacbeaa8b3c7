"""Issue 18 item 6, small: the stdlib corpus, a CE-trained teacher, its top-k caches (k = 16, 64,
256 and full V), NKD and KD students trained from each cache, several seeds.

Reuses ``benchmarks/lm_distill.py``'s corpus, models and training loop (float32, no autocast); the
students' teacher signal comes only from the cache (``nkd.lm.write_teacher_cache`` then
``TeacherCache.topk`` per batch, ``topk_rest="zero"``). Reported per k: cache size (bytes per
token), cache-writing time, validation perplexity and top-1 (mean ± std over seeds).

    python benchmarks/lm_cache_demo.py [--seeds 0,1,2] [--set student_steps=60 ...]
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

import lm_distill as D  # noqa: E402
from nkd.integrations.hf import topk_distillation_loss  # noqa: E402
from nkd.lm import write_teacher_cache  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ks", default="16,64,256,full")
    ap.add_argument("--out", default=str(ROOT / "runs" / "lm_cache_demo"))
    ap.add_argument("--set", action="append", default=[])
    a = ap.parse_args()
    torch.set_num_threads(1)
    setup = D.Setup(**{**asdict(D.QUICK), "max_files": 80, "teacher_steps": 150, "student_steps": 60, "eval_every": 60,
                       "val_windows": 32})
    for kv in a.set:
        k, v = kv.split("=", 1)
        setup = D.Setup(**{**asdict(setup), k: type(getattr(setup, k))(v)})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data = D.corpus(setup, out)
    train_w, val_w = D.windows(data["train"], setup.seq), D.windows(data["val"], setup.seq)
    val_w = val_w[torch.randperm(len(val_w), generator=torch.Generator().manual_seed(1234))[: setup.val_windows]]
    quiet = lambda m: None  # noqa: E731
    teacher = D.make_model(setup, setup.teacher_hidden, setup.teacher_layers, seed=0)
    order = torch.randint(0, len(train_w), (setup.teacher_steps, setup.batch), generator=torch.Generator().manual_seed(99))
    t_hist = D.train(teacher, setup, setup.teacher_steps, lambda s: (train_w[order[s]], None), lambda m, w, _: D._ce(m, w),
                     val_w, False, quiet)
    teacher.eval().requires_grad_(False)
    n_pool = setup.student_steps * setup.batch
    pool = train_w[torch.randperm(len(train_w), generator=torch.Generator().manual_seed(4321))[:n_pool]]
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []
    for kname in a.ks.split(","):
        k = setup.vocab if kname == "full" else int(kname)
        t0 = time.perf_counter()
        cache = write_teacher_cache(teacher, pool, out / f"cache-k{kname}", top_k=k, batch_size=setup.batch)
        write_s = time.perf_counter() - t0
        for method in ("nkd", "kd"):
            res = []
            for seed in seeds:
                perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed))
                model = D.make_model(setup, setup.student_hidden, setup.student_layers, seed=seed)

                def batches(s, perm=perm, cache=cache):
                    idx = perm[s * setup.batch : (s + 1) * setup.batch]
                    return pool[idx], cache.topk(idx)

                kw = dict(ce_weight=1.0, temperature=setup.temperature) | ({"gamma": setup.gamma} if method == "nkd" else {})

                def fn(m, w, topk, method=method, kw=kw):
                    return topk_distillation_loss(m, topk, w, method=method, **kw)

                hist = D.train(model, setup, setup.student_steps, batches, fn, val_w, False, quiet)
                res.append(hist[-1])
            ppl = [r["val_ppl"] for r in res]
            acc = [r["val_acc"] for r in res]
            row = dict(k=kname, method=method, bytes_per_token=cache.nbytes() / pool.numel(), write_s=write_s,
                       ppl_mean=statistics.fmean(ppl), ppl_std=statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                       acc_mean=statistics.fmean(acc), acc_std=statistics.stdev(acc) if len(acc) > 1 else 0.0, ppl=ppl)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps(dict(setup=asdict(setup), teacher=t_hist[-1], pool_tokens=pool.numel(), corpus_files=data["files"])))
    print("| k | method | B/token | cache write s | val ppl (mean ± std) | val top-1 % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['method']} | {r['bytes_per_token']:.0f} | {r['write_s']:.1f} | {r['ppl_mean']:.2f} ± {r['ppl_std']:.2f} "
              f"| {r['acc_mean']:.2f} ± {r['acc_std']:.2f} |")


if __name__ == "__main__":
    main()
