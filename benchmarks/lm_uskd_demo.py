"""Teacher-free token-level USKD on real text: CE students against CE + USKD students on the
Python standard library's sources, the corpus, tokenizer and models of benchmarks/lm_distill.py.

Each seed trains two small Llama students (built from a config, nothing downloaded) from the
same initialization on the same windows in the same order: ``ce`` (cross-entropy) and ``uskd``
(CE + token-level USKD, ``nkd.losses.FusedLinearUSKDLoss`` with ``ce_weight=1``): the student's
final hidden states and LM head give ``z``; the weak head — a linear ``[V, H]`` head of its own,
trained with the model — reads the output of decoder layer ``L/2`` (through the model's final
RMSNorm, as the LM head reads the last layer) and gives ``w``. No teacher.

Reported: validation perplexity and next-token top-1 after the last step, mean ± std over the
seeds, and the per-seed difference to the CE student (paired: same initialization and data).

    python benchmarks/lm_uskd_demo.py [--seeds 0,1,2] [--threads 1] [--set KEY=VALUE] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import lm_distill as base  # noqa: E402  (corpus, models, training loop, evaluation)
from nkd.integrations.hf import causal_lm_hidden  # noqa: E402
from nkd.losses import FusedLinearUSKDLoss  # noqa: E402

METHODS = ("ce", "uskd")
USKD_DEFAULTS = dict(alpha=1.0, beta=0.1, mu=0.005, rank="paper")  # the published ImageNet setting


def attach_uskd(model, setup: base.Setup, hp: dict) -> None:
    """Give ``model`` the USKD loss module (its weak head is then among ``model.parameters()``,
    so the training loop's optimizer trains it) and a hook that keeps layer L/2's output."""
    cfg = model.config
    layer = cfg.num_hidden_layers // 2 - 1 if cfg.num_hidden_layers > 1 else 0
    model.uskd = FusedLinearUSKDLoss(cfg.hidden_size, cfg.vocab_size, ce_weight=1.0, **hp)
    model.uskd_layer = layer
    model.uskd_mid = []

    def keep(_module, _args, out):
        model.uskd_mid[:] = [out[0] if isinstance(out, tuple) else out]  # the last forward's only

    model.model.layers[layer].register_forward_hook(keep)


def uskd_step(model, w, _extra):
    hidden, head = causal_lm_hidden(model, w[:, :-1])
    weak_hidden = model.model.norm(model.uskd_mid[-1])
    return model.uskd(hidden, head.weight, weak_hidden, w[:, 1:])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny configuration: checks the pipeline, numbers mean nothing")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=str(HERE / "lm_uskd"))
    ap.add_argument("--cache", default=str(HERE.parent / "runs" / "lm_cache"), help="tokenizer and token arrays")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-bf16", action="store_true", help="float32 instead of bf16 autocast")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a Setup field")
    ap.add_argument("--uskd", action="append", default=[], metavar="KEY=VALUE", help="a USKD hyper-parameter (alpha, beta, mu, rank)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = base.QUICK if args.quick else base.Setup()
    for kv in args.set:
        k, v = kv.split("=", 1)
        setup = base.Setup(**{**asdict(setup), k: type(getattr(setup, k))(v)})
    hp = dict(USKD_DEFAULTS)
    for kv in args.uskd:
        k, v = kv.split("=", 1)
        hp[k] = v if k == "rank" else float(v)
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    bf16 = not args.no_bf16
    cache, out = Path(args.cache), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log = functools.partial(print, flush=True)
    data = base.corpus(setup, cache)
    train_w, val_w = base.windows(data["train"], setup.seq), base.windows(data["val"], setup.seq)
    val_w = val_w[torch.randperm(len(val_w), generator=torch.Generator().manual_seed(1234))[: setup.val_windows]]
    n_pool = setup.student_steps * setup.batch
    pool = train_w[torch.randperm(len(train_w), generator=torch.Generator().manual_seed(4321))[:n_pool]]
    log(f"corpus: {data['files']} files, train {len(data['train'])} tokens, val {len(data['val'])} tokens; "
        f"eval on {len(val_w)} val windows; USKD {hp}")

    runs = []
    for seed in seeds:
        perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed))

        def batches(s, perm=perm):
            return pool[perm[s * setup.batch : (s + 1) * setup.batch]], None

        for method in METHODS:
            model = base.make_model(setup, setup.student_hidden, setup.student_layers, seed=seed)
            n_params = sum(p.numel() for p in model.parameters())
            if method == "uskd":
                torch.manual_seed(10_000 + seed)  # the weak head's init; the model's is the CE student's
                attach_uskd(model, setup, hp)
                fn = uskd_step
            else:
                fn = lambda m, w, _: base._ce(m, w)  # noqa: E731
            log(f"student {method} seed {seed}: {n_params / 1e6:.2f} M parameters"
                + (f" + weak head {model.uskd.head.weight.numel() / 1e6:.2f} M on layer {model.uskd_layer + 1}" if method == "uskd"
                   else ""))
            t0 = time.time()
            hist = base.train(model, setup, setup.student_steps, batches, fn, val_w, bf16, log)
            runs.append(dict(method=method, seed=seed, history=hist, wall_s=time.time() - t0))

    lines = ["| run | seeds | val perplexity (mean ± std) | val next-token acc % (mean ± std) | Δppl vs CE (paired) | s / run |",
             "|---|---|---|---|---|---|"]
    ce = {r["seed"]: r["history"][-1]["val_ppl"] for r in runs if r["method"] == "ce"}
    summary = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        ppl = base.stat([r["history"][-1]["val_ppl"] for r in rs])
        acc = base.stat([r["history"][-1]["val_acc"] for r in rs])
        d = base.stat([r["history"][-1]["val_ppl"] - ce[r["seed"]] for r in rs])
        secs = statistics.fmean(r["wall_s"] for r in rs)
        summary[m] = dict(ppl=ppl, acc=acc, delta=d, wall_s=secs)
        delta = f"{d[0]:+.2f} ± {d[1]:.2f}" if m != "ce" else ""
        lines.append(f"| {m} | {len(rs)} | {ppl[0]:.2f} ± {ppl[1]:.2f} | {acc[0]:.2f} ± {acc[1]:.2f} | {delta} | {secs:.0f} |")
    table = "\n".join(lines)
    wall = time.time() - t_start
    command = (f"python benchmarks/lm_uskd_demo.py{' --quick' if args.quick else ''} --seeds {args.seeds} --threads {args.threads}"
               + "".join(f" --set {kv}" for kv in args.set) + "".join(f" --uskd {kv}" for kv in args.uskd))
    results = dict(setup=asdict(setup), uskd=hp, bf16=bf16, seeds=seeds, wall_s=wall, command=command,
                   machine=dict(python=platform.python_version(), torch=torch.__version__, threads=args.threads),
                   summary=summary, runs=runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.md").write_text(f"# Token-level USKD on the Python standard library\n\nCommand: `{command}`; wall time "
                                   f"{wall / 60:.1f} min.\n\n{table}\n")
    log(table)
    log(f"wall time {wall / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
