"""Token-level distillation on real text that ships with the machine: Python's standard library.

Corpus: every ``.py`` file of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``; ``site-packages`` and test folders left out), sorted; a file
goes to validation when ``sha1(relative path) % 10 == 0`` (a fixed split by file). A byte-level
BPE tokenizer (``tokenizers``) is trained on the training files. Models are small Llama
configurations (``transformers``, built from configs, nothing downloaded).

1. a teacher (wider, deeper) is trained with cross-entropy;
2. students (narrower, shallower) are trained from scratch on the same token budget with
   ``ce`` (cross-entropy), ``kd`` (CE + λ²·KL at λ = 1) and ``nkd`` (CE + NKD, λ = 1, γ = 1.5),
   each for several seeds. A seed fixes the student's initialization and its data order; every
   student sees the same set of training windows exactly once. KD and NKD use the fused
   token-level losses (``nkd.losses.fused_linear_*_loss``) on the student's final hidden
   states (``nkd.integrations.hf.causal_lm_hidden``) and the teacher's, cached once for the
   windows the students see (the teacher is frozen, so its hidden states are fixed).

Reported: validation perplexity (exp of the mean next-token cross-entropy) and next-token top-1
accuracy, mean ± std over seeds, after the last step; curves of validation perplexity.

    python benchmarks/lm_distill.py [--quick] [--seeds 0,1,2] [--out benchmarks/lm]

``--quick`` is a tiny configuration (a few dozen files, small vocabulary and models, a few dozen
steps) that checks the whole pipeline in about a minute; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nkd.integrations.hf import causal_lm_hidden  # noqa: E402
from nkd.lm import encode_texts  # noqa: E402
from nkd.lm import evaluate as lm_evaluate  # noqa: E402
from nkd.losses import fused_linear_kd_loss, fused_linear_nkd_loss  # noqa: E402

EOT = "<|endoftext|>"
METHODS = ("ce", "kd", "nkd")
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class Setup:
    vocab: int = 4096
    seq: int = 128
    batch: int = 16
    teacher_hidden: int = 192
    teacher_layers: int = 4
    student_hidden: int = 96
    student_layers: int = 2
    heads: int = 4
    teacher_steps: int = 400
    student_steps: int = 200
    lr: float = 3e-3
    warmup: int = 40
    eval_every: int = 50
    val_windows: int = 256
    max_files: int = 0  # 0 = all
    temperature: float = 1.0  # KD and NKD
    gamma: float = 1.5  # NKD


QUICK = Setup(vocab=512, seq=64, batch=8, teacher_hidden=64, teacher_layers=2, student_hidden=32, student_layers=1,
              teacher_steps=60, student_steps=30, warmup=5, eval_every=10, val_windows=16, max_files=40)


# ----------------------------------------------------------------------------- data
def stdlib_files(max_files: int = 0) -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))
    if max_files:
        files = files[:max_files]
    return root, files


def is_val(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 10 == 0


def read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def build_tokenizer(train_files: list[Path], vocab: int, path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((read(p) for p in train_files), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def encode(tok, files: list[Path]) -> np.ndarray:
    return np.asarray(encode_texts(tok, [read(p) for p in files], tok.token_to_id(EOT)), dtype=np.int32)


def windows(tokens: np.ndarray, seq: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq + 1`` tokens (position i predicts i + 1)."""
    n = (len(tokens) - 1) // seq
    idx = np.arange(n)[:, None] * seq + np.arange(seq + 1)[None]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def corpus(setup: Setup, cache: Path) -> dict:
    root, files = stdlib_files(setup.max_files)
    rel = [str(p.relative_to(root)) for p in files]
    train = [p for p, r in zip(files, rel) if not is_val(r)]
    val = [p for p, r in zip(files, rel) if is_val(r)]
    key = hashlib.sha1(json.dumps([rel, setup.vocab]).encode()).hexdigest()[:12]
    tok = build_tokenizer(train, setup.vocab, cache / f"tokenizer-{key}.json")
    arrays = cache / f"tokens-{key}.npz"
    if arrays.exists():
        z = np.load(arrays)
        tr, va = z["train"], z["val"]
    else:
        tr, va = encode(tok, train), encode(tok, val)
        np.savez(arrays, train=tr, val=va)
    return dict(root=str(root), files=len(files), train_files=len(train), val_files=len(val), train=tr, val=va,
                chars=sum(p.stat().st_size for p in files), tokenizer_vocab=tok.get_vocab_size())


# ----------------------------------------------------------------------------- models
def make_model(setup: Setup, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=setup.vocab, hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 7) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=setup.heads, num_key_value_heads=setup.heads,
                      max_position_embeddings=setup.seq + 1, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def lr_at(step: int, setup: Setup, total: int) -> float:
    if step < setup.warmup:
        return setup.lr * (step + 1) / setup.warmup
    frac = (step - setup.warmup) / max(total - setup.warmup, 1)
    return setup.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def evaluate(model, val: torch.Tensor, batch: int, bf16: bool) -> dict:
    """Perplexity and top-1 on ``[n, seq + 1]`` windows (``nkd.lm.evaluate``), under bf16 autocast when set."""
    with autocast(bf16):
        r = lm_evaluate(model, val, batch_size=batch)
    model.train()
    return dict(val_ppl=r["perplexity"], val_acc=r["top1"], val_nll=r["nll"])


def train(model, setup: Setup, steps: int, batches, loss_fn, val: torch.Tensor, bf16: bool, log) -> list[dict]:
    """AdamW (fused), warmup + cosine to 10 %, clipping at 1; evaluates every ``eval_every`` steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    history, t0, run_loss = [], time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, setup, steps)
        w, extra = batches(step)
        with autocast(bf16):
            loss = loss_fn(model, w, extra)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite loss at step {step}")
        run_loss.append(float(loss.detach()))
        if (step + 1) % setup.eval_every == 0 or step + 1 == steps:
            rec = dict(step=step + 1, train_loss=statistics.fmean(run_loss), time_s=time.time() - t0,
                       **evaluate(model, val, setup.batch, bf16))
            run_loss = []
            history.append(rec)
            log(f"  step {rec['step']:5d}  loss {rec['train_loss']:.3f}  val ppl {rec['val_ppl']:.2f}  acc {rec['val_acc']:.2f}%"
                f"  ({rec['time_s']:.0f} s)")
    return history


def _ce(model, w):
    logits = model(input_ids=w[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))


def distill_loss(method: str, teacher_head: torch.Tensor, setup: Setup):
    def fn(model, w, t_hidden):
        hidden, head = causal_lm_hidden(model, w[:, :-1])
        kw = dict(temperature=setup.temperature, ce_weight=1.0)
        if method == "nkd":
            return fused_linear_nkd_loss(hidden, head.weight, t_hidden, teacher_head, w[:, 1:], gamma=setup.gamma, **kw)
        return fused_linear_kd_loss(hidden, head.weight, t_hidden, teacher_head, w[:, 1:], **kw)

    return fn


# ----------------------------------------------------------------------------- report
def stat(vals: list[float]) -> tuple[float, float]:
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def write_report(out: Path, results: dict, preamble: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    t = results["teacher"]["history"][-1]
    lines = ["| run | seeds | val perplexity (mean ± std) | val next-token acc % (mean ± std) | Δppl vs CE (paired, mean ± std) |",
             "|---|---|---|---|---|",
             f"| teacher (CE) | 1 | {t['val_ppl']:.2f} | {t['val_acc']:.2f} | |"]
    ce_by_seed = {r["seed"]: r["history"][-1]["val_ppl"] for r in results["students"] if r["method"] == "ce"}
    for m in METHODS:
        runs = [r for r in results["students"] if r["method"] == m]
        if not runs:
            continue
        ppl = stat([r["history"][-1]["val_ppl"] for r in runs])
        acc = stat([r["history"][-1]["val_acc"] for r in runs])
        paired = [r["history"][-1]["val_ppl"] - ce_by_seed[r["seed"]] for r in runs if r["seed"] in ce_by_seed]
        delta = f"{stat(paired)[0]:+.2f} ± {stat(paired)[1]:.2f}" if m != "ce" and paired else ""
        lines.append(f"| {m} student | {len(runs)} | {ppl[0]:.2f} ± {ppl[1]:.2f} | {acc[0]:.2f} ± {acc[1]:.2f} | {delta} |")
    table = "\n".join(lines)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in METHODS:
        runs = [r for r in results["students"] if r["method"] == m]
        if not runs:
            continue
        steps = [h["step"] for h in runs[0]["history"]]
        for ax, key in zip(axes, ("val_ppl", "val_acc")):
            arr = np.array([[h[key] for h in r["history"]] for r in runs])
            mean, std = arr.mean(0), arr.std(0)
            ax.plot(steps, mean, label=f"{m} student")
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    for ax, key, name in zip(axes, ("val_ppl", "val_acc"), ("validation perplexity", "validation next-token accuracy (%)")):
        ax.axhline(t[key], color="k", ls="--", lw=0.8, label="teacher")
        ax.set_xlabel("student step")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.suptitle("students on the Python standard library (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    md = ["# LM distillation demo: Python standard library", "", preamble, "", table, "",
          "Perplexity and accuracy on the validation files after the last student step. Δppl vs CE: per seed, "
          "the student's perplexity minus the CE student's with the same seed (same initialization and data order); "
          "negative is better.", "", "![curves](curves.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return table


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny configuration: checks the pipeline, numbers mean nothing")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "lm"))
    ap.add_argument("--cache", default=str(ROOT / "runs" / "lm_cache"), help="tokenizer, token arrays, teacher checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bf16", action="store_true", help="float32 instead of bf16 autocast")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a Setup field")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    setup = QUICK if args.quick else Setup()
    for kv in args.set:
        k, v = kv.split("=", 1)
        setup = Setup(**{**asdict(setup), k: type(getattr(setup, k))(v)})
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    methods = [m for m in args.methods.split(",") if m]
    bad = set(methods) - set(METHODS)
    if bad:
        raise SystemExit(f"--methods: unknown {sorted(bad)}; choose from {METHODS}")
    bf16 = not args.no_bf16
    cache, out = Path(args.cache), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(msg, flush=True)

    data = corpus(setup, cache)
    train_w, val_w = windows(data["train"], setup.seq), windows(data["val"], setup.seq)
    g = torch.Generator().manual_seed(1234)
    val_w = val_w[torch.randperm(len(val_w), generator=g)[: setup.val_windows]]
    log(f"corpus: {data['files']} files ({data['chars'] / 1e6:.1f} MB) from {data['root']}; "
        f"train {len(data['train'])} tokens / {len(train_w)} windows, val {len(data['val'])} tokens; "
        f"eval on {len(val_w)} val windows")

    # ---- teacher
    teacher = make_model(setup, setup.teacher_hidden, setup.teacher_layers, seed=0)
    teacher_fields = ("vocab", "seq", "batch", "teacher_hidden", "teacher_layers", "heads", "teacher_steps", "lr", "warmup",
                      "eval_every", "val_windows", "max_files")
    key = hashlib.sha1(json.dumps([[getattr(setup, f) for f in teacher_fields], data["files"], len(data["train"]), bf16]).encode())
    key = key.hexdigest()[:12]
    ckpt = cache / f"teacher-{key}.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=True)
        teacher.load_state_dict(saved["state"])
        t_hist = saved["history"]
        log(f"teacher: loaded {ckpt}")
    else:
        log(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M parameters, {setup.teacher_steps} steps")
        order = torch.randint(0, len(train_w), (setup.teacher_steps, setup.batch), generator=torch.Generator().manual_seed(99))
        t_hist = train(teacher, setup, setup.teacher_steps, lambda s: (train_w[order[s]], None), lambda m, w, _: _ce(m, w),
                       val_w, bf16, log)
        torch.save({"state": teacher.state_dict(), "history": t_hist}, ckpt)
    teacher.eval().requires_grad_(False)

    # ---- the windows every student sees once, and the teacher's hidden states on them
    n_pool = setup.student_steps * setup.batch
    pool = train_w[torch.randperm(len(train_w), generator=torch.Generator().manual_seed(4321))[:n_pool]]
    if len(pool) < n_pool:
        raise SystemExit(f"only {len(pool)} training windows for {n_pool} student samples: lower student_steps or batch")
    t_hidden = None
    if set(methods) & {"kd", "nkd"}:
        t0 = time.time()
        chunks = []
        with torch.no_grad():
            for i in range(0, n_pool, setup.batch):
                with autocast(bf16):
                    h, _ = causal_lm_hidden(teacher, pool[i : i + setup.batch, :-1])
                chunks.append(h.to(torch.bfloat16 if bf16 else torch.float32))
        t_hidden = torch.cat(chunks)
        log(f"teacher hidden states for {n_pool} windows cached in {time.time() - t0:.0f} s")
    t_head = teacher.get_output_embeddings().weight.detach()

    # ---- students
    students = []
    for seed in seeds:
        perm = torch.randperm(n_pool, generator=torch.Generator().manual_seed(seed))
        for method in methods:
            log(f"student {method} seed {seed}: "
                f"{sum(p.numel() for p in make_model(setup, setup.student_hidden, setup.student_layers, seed).parameters()) / 1e6:.2f} M")
            model = make_model(setup, setup.student_hidden, setup.student_layers, seed=seed)

            def batches(s, perm=perm):
                idx = perm[s * setup.batch : (s + 1) * setup.batch]
                return pool[idx], (None if t_hidden is None else t_hidden[idx])

            fn = (lambda m, w, _: _ce(m, w)) if method == "ce" else distill_loss(method, t_head, setup)
            t0 = time.time()
            hist = train(model, setup, setup.student_steps, batches, fn, val_w, bf16, log)
            students.append(dict(method=method, seed=seed, history=hist, wall_s=time.time() - t0))

    wall = time.time() - t_start
    results = dict(setup=asdict(setup), quick=args.quick, bf16=bf16, seeds=seeds, methods=methods, wall_s=wall,
                   corpus={k: v for k, v in data.items() if k not in ("train", "val")} | dict(train_tokens=len(data["train"]),
                                                                                                val_tokens=len(data["val"])),
                   machine=dict(python=platform.python_version(), torch=torch.__version__, threads=args.threads,
                                processor=platform.processor() or platform.machine()),
                   teacher=dict(history=t_hist, params=sum(p.numel() for p in teacher.parameters())),
                   students=students)
    s = setup
    preamble = (
        f"Corpus: the Python {platform.python_version()} standard library, {data['files']} files "
        f"({data['chars'] / 1e6:.1f} MB; {data['train_files']} train / {data['val_files']} val files by a fixed hash split), "
        f"byte-level BPE with {data['tokenizer_vocab']} tokens: {len(data['train']):,} train / {len(data['val']):,} val tokens. "
        f"Teacher: Llama {s.teacher_layers}×{s.teacher_hidden} ({results['teacher']['params'] / 1e6:.2f} M parameters), "
        f"{s.teacher_steps} steps. Students: Llama {s.student_layers}×{s.student_hidden}, {s.student_steps} steps of "
        f"{s.batch}×{s.seq} tokens (each training window once), AdamW lr {s.lr:g}, warmup {s.warmup} + cosine, "
        f"{'bf16 autocast' if bf16 else 'float32'}, {args.threads} CPU threads. "
        f"kd = CE + KD (λ={s.temperature:g}); nkd = CE + NKD (λ={s.temperature:g}, γ={s.gamma:g}); fused losses. "
        f"Validation on {len(val_w)} windows ({len(val_w) * s.seq:,} tokens). Seeds {seeds}. "
        f"Wall time {wall / 3600:.2f} h. Command: `python benchmarks/lm_distill.py{' --quick' if args.quick else ''}"
        f"{' ' + ' '.join(f'--set {kv}' for kv in args.set) if args.set else ''} --seeds {args.seeds}`."
    )
    table = write_report(out, results, preamble)
    log(table)
    return results


if __name__ == "__main__":
    main()
