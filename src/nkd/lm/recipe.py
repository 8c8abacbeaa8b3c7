"""``nkd lm cache CONFIG`` and ``nkd lm train CONFIG``: one YAML for teacher cache and student.

.. code-block:: yaml

    output_dir: runs/lm/nkd-s0          # the student's run directory (locked while training)
    seed: 0
    tokenizer: tokenizer.json           # a tokenizers file, or a transformers tokenizer directory
    corpus: {train: [data/train], val: [data/val], block_length: 64, eot_token: "<|endoftext|>"}
    teacher: {pretrained: teacher_dir}  # or {config: {hidden_size: 64, num_hidden_layers: 2, ...}} (Llama)
    student: {config: {hidden_size: 32, num_hidden_layers: 1}}
    cache: {path: runs/lm/cache, top_k: 64, dtype: float32, batch_size: 8}   # omit: live teacher
    method: {name: nkd, ce_weight: 1.0, temperature: 1.0, gamma: 1.5}        # nkd | kd | ce
    optim: {lr: 0.001, weight_decay: 0.0}
    schedule: {warmup: 0}               # linear warmup, then cosine to 10 %
    train: {steps: 100, batch_size: 8, eval_every: 50, log_every: 10}

Every problem of a config is listed before anything runs (exit 2). Training writes
``metrics.jsonl`` (one line per evaluation), ``summary.json`` (read by ``nkd report``: top-1 in
``best_top1``/``last_top1``, and ``perplexity``), ``train.log`` and ``checkpoints/last.pt``;
``--resume`` continues from it bitwise on CPU.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..integrations.hf import LM_LOSSES, hyper_parameters

__all__ = ["RecipeError", "load_recipe", "run_cache", "run_train"]

DEFAULTS: dict[str, Any] = {
    "output_dir": None, "seed": 0, "tokenizer": None,
    "corpus": {"train": None, "val": None, "block_length": 64, "eot_token": None},
    "teacher": None, "student": None,
    "cache": None,
    "method": {"name": "nkd", "ce_weight": 1.0, "temperature": 1.0, "gamma": 1.5, "beta": 0.5, "topk_rest": "zero"},
    "optim": {"lr": 1e-3, "weight_decay": 0.0},
    "schedule": {"warmup": 0},
    "train": {"steps": 100, "batch_size": 8, "eval_every": 50, "log_every": 10, "eval_batch_size": 8},
}
CACHE_DEFAULTS = {"path": None, "top_k": 64, "dtype": "float32", "batch_size": 8, "shard_size": None}


class RecipeError(ValueError):
    """A config that cannot run; ``problems`` lists every one."""

    def __init__(self, path, problems: list[str]):
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} problem(s) in the config:\n" + "\n".join(f"  - {p}" for p in problems))


def _merge(defaults: dict, given: dict, prefix: str, problems: list[str]) -> dict:
    out = dict(defaults)
    for k, v in given.items():
        if k not in defaults:
            problems.append(f"{prefix}{k}: unknown key (known: {', '.join(sorted(defaults))})")
        elif isinstance(defaults[k], dict) and defaults[k] and isinstance(v, dict):
            out[k] = _merge(defaults[k], v, f"{prefix}{k}.", problems)
        else:
            out[k] = v
    return out


def _model_spec(name: str, spec, base: Path, problems: list[str]) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in ("pretrained", "config"):
        problems.append(f"{name}: must be {{pretrained: DIR}} or {{config: {{...}}}}, got {spec!r}")
        return
    if "pretrained" in spec and not (base / str(spec["pretrained"])).is_dir():
        problems.append(f"{name}.pretrained: not a directory: {spec['pretrained']}")
    if "config" in spec and not isinstance(spec["config"], dict):
        problems.append(f"{name}.config: must be a mapping of LlamaConfig fields")


def load_recipe(path: str | os.PathLike, command: str) -> dict:
    """The validated config (defaults filled in, paths resolved against the config's folder)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, [f"config file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(path, [f"not valid YAML: {e}"]) from e
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise RecipeError(path, ["the config must be a mapping"])
    cfg = _merge(DEFAULTS, raw, "", problems)
    if isinstance(raw.get("cache"), dict):
        cfg["cache"] = _merge(CACHE_DEFAULTS, raw["cache"], "cache.", problems)
    base = path.parent
    if not cfg["tokenizer"] or not (base / str(cfg["tokenizer"])).exists():
        problems.append(f"tokenizer: file or directory not found: {cfg['tokenizer']!r}")
    c = cfg["corpus"]
    for split in ("train",) + (("val",) if command == "train" else ()):
        items = c[split]
        if isinstance(items, str):
            items = c[split] = [items]
        if not items:
            problems.append(f"corpus.{split}: required (files or folders)")
        else:
            problems += [f"corpus.{split}: not found: {p}" for p in items if not (base / str(p)).exists()]
    if not isinstance(c["block_length"], int) or c["block_length"] < 2:
        problems.append(f"corpus.block_length: must be an int >= 2, got {c['block_length']!r}")
    _model_spec("teacher", cfg["teacher"], base, problems)
    _model_spec("student", cfg["student"], base, problems)
    m = cfg["method"]
    if m["name"] not in (*LM_LOSSES, "ce"):
        problems.append(f"method.name: must be one of {', '.join((*LM_LOSSES, 'ce'))}, got {m['name']!r}")
    for k in ("ce_weight", "temperature", "gamma", "beta"):
        if not isinstance(m[k], (int, float)) or isinstance(m[k], bool) or not math.isfinite(m[k]) or m[k] < 0:
            problems.append(f"method.{k}: must be a finite number >= 0, got {m[k]!r}")
    cache = cfg["cache"]
    if command == "cache":
        if cfg["teacher"] is None:
            problems.append("teacher: required by nkd lm cache")
        if not isinstance(cache, dict) or not cache.get("path"):
            problems.append("cache.path: required by nkd lm cache")
    if isinstance(cache, dict):
        k = cache["top_k"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            problems.append(f"cache.top_k: must be an int >= 1, got {k!r}")
        elif m["name"] == "nkd" and m.get("topk_rest") == "zero" and k < 2:
            problems.append(f"cache.top_k: NKD needs top_k >= 2 (topk_rest zero), got {k}")
        if cache["dtype"] not in ("float32", "float16", "bfloat16"):
            problems.append(f"cache.dtype: must be float32, float16 or bfloat16, got {cache['dtype']!r}")
    elif cache is not None:
        problems.append(f"cache: must be a mapping (path, top_k, dtype, batch_size), got {cache!r}")
    if command == "train":
        if not cfg["output_dir"]:
            problems.append("output_dir: required by nkd lm train")
        if cfg["student"] is None:
            problems.append("student: required by nkd lm train")
        if m["name"] != "ce" and cfg["teacher"] is None and cache is None:
            problems.append(f"teacher or cache: method {m['name']} needs a teacher (teacher: ...) or a teacher cache (cache: ...)")
        t = cfg["train"]
        for k in ("steps", "batch_size", "eval_every", "log_every", "eval_batch_size"):
            if not isinstance(t[k], int) or isinstance(t[k], bool) or t[k] < 1:
                problems.append(f"train.{k}: must be an int >= 1, got {t[k]!r}")
        if not isinstance(cfg["optim"]["lr"], (int, float)) or not cfg["optim"]["lr"] > 0:
            problems.append(f"optim.lr: must be a number > 0, got {cfg['optim']['lr']!r}")
    if problems:
        raise RecipeError(path, problems)
    cfg["_base"] = str(base)
    return cfg


# ----------------------------------------------------------------------------- building
def _p(cfg, rel) -> str:
    return str(Path(cfg["_base"]) / str(rel))


def _tokenizer(cfg):
    p = Path(_p(cfg, cfg["tokenizer"]))
    if p.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(p))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p))


def _model(cfg, name: str, vocab: int, seed: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    spec = cfg[name]
    if "pretrained" in spec:
        return AutoModelForCausalLM.from_pretrained(_p(cfg, spec["pretrained"]), torch_dtype=torch.float32)
    fields = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": None, "num_hidden_layers": 2, "num_attention_heads": 4,
              "max_position_embeddings": cfg["corpus"]["block_length"], **spec["config"]}
    if fields["intermediate_size"] is None:
        fields["intermediate_size"] = 2 * fields["hidden_size"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**fields))


def _blocks(cfg, tok, split: str):
    from .blocks import text_blocks

    c = cfg["corpus"]
    try:
        return text_blocks([_p(cfg, x) for x in c[split]], tok, c["block_length"], eot_token=c["eot_token"])
    except ValueError as e:
        raise ValueError(f"corpus.{split}: {e}") from e


def run_cache(config: str, log=print) -> int:
    from .blocks import check_vocab, tokenizer_vocab_size
    from .cache import write_teacher_cache

    cfg = load_recipe(config, "cache")
    tok = _tokenizer(cfg)
    teacher = _model(cfg, "teacher", tokenizer_vocab_size(tok), cfg["seed"])
    check_vocab(tok, teacher, "teacher")
    blocks = _blocks(cfg, tok, "train")
    c = cfg["cache"]
    t0 = time.time()

    def progress(done, total):
        log(f"cache: {done}/{total} sequences ({time.time() - t0:.1f} s)")

    cache = write_teacher_cache(teacher, blocks, _p(cfg, c["path"]), c["top_k"], batch_size=c["batch_size"], dtype=c["dtype"],
                                shard_size=c["shard_size"], progress=progress)
    log(f"wrote {cache!r} in {time.time() - t0:.1f} s ({cache.nbytes() / blocks.numel():.0f} bytes per token)")
    return 0


def _lr(step: int, cfg) -> float:
    lr, warm, total = cfg["optim"]["lr"], cfg["schedule"]["warmup"], cfg["train"]["steps"]
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(total - warm, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def run_train(config: str, resume: bool = False, overwrite: bool = False, log=print) -> int:
    from ..engine.rundir import RunDir
    from ..integrations.hf import distillation_loss, topk_distillation_loss
    from .blocks import check_vocab, tokenizer_vocab_size
    from .cache import TeacherCache
    from .evaluate import evaluate

    cfg = load_recipe(config, "train")
    torch.manual_seed(cfg["seed"])
    tok = _tokenizer(cfg)
    vocab = tokenizer_vocab_size(tok)
    student = _model(cfg, "student", vocab, cfg["seed"])
    check_vocab(tok, student, "student")
    train_blocks, val_blocks = _blocks(cfg, tok, "train"), _blocks(cfg, tok, "val")
    m, t = cfg["method"], cfg["train"]
    teacher = cache = None
    if m["name"] != "ce":
        if cfg["cache"] is not None:
            cache = TeacherCache(_p(cfg, cfg["cache"]["path"]), input_ids=train_blocks)
            if cache.temperature != 1.0:
                raise ValueError("cache: written at temperature != 1; the loss applies method.temperature itself")
            if cache.vocab_size != vocab:
                raise ValueError(f"cache: written for V={cache.vocab_size}, the tokenizer has {vocab}")
        else:
            teacher = _model(cfg, "teacher", vocab, cfg["seed"]).eval().requires_grad_(False)
            check_vocab(tok, teacher, "teacher")
    run = RunDir(_p(cfg, cfg["output_dir"]))
    run.check_writable()
    run.lock()
    try:
        ck_dir = run.path / "checkpoints"
        last = ck_dir / "last.pt"
        if last.exists() and not resume and not overwrite:
            raise ValueError(f"output_dir {run.path} holds a run (checkpoints/last.pt): --resume it or --overwrite")
        logger = run.setup_logging(None)

        def say(msg):
            logger.info(msg)
            log(msg)

        opt = torch.optim.AdamW(student.parameters(), lr=cfg["optim"]["lr"], weight_decay=cfg["optim"]["weight_decay"])
        step, history = 0, []
        if resume and last.exists():
            st = torch.load(last, weights_only=False)
            student.load_state_dict(st["model"])
            opt.load_state_dict(st["optim"])
            step, history = st["step"], st["history"]
            torch.set_rng_state(st["rng"])
            say(f"resumed at step {step}")
        run.start(yaml.safe_dump({k: v for k, v in cfg.items() if k != "_base"}, sort_keys=False), history)
        n = len(train_blocks)
        kw = {"ce_weight": m["ce_weight"]}
        if m["name"] != "ce":  # the method's own hyper-parameters (NKD: temperature, gamma; JSD: beta, temperature)
            kw.update({k: m[k] for k in hyper_parameters(m["name"]) if k in m})
        if cache is not None:
            kw["topk_rest"] = m["topk_rest"]
        student.train()
        t0, losses = time.time(), []
        while step < t["steps"]:
            epoch, pos = divmod(step * t["batch_size"], n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg["seed"] * 1000 + epoch))
            idx = perm[pos : pos + t["batch_size"]]
            ids = train_blocks[idx]
            for g in opt.param_groups:
                g["lr"] = _lr(step, cfg)
            if m["name"] == "ce":
                logits = student(input_ids=ids).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
            elif cache is not None:
                loss = topk_distillation_loss(student, cache.topk(idx), ids, method=m["name"], **kw)
            else:
                loss = distillation_loss(student, teacher, ids, method=m["name"], **kw)
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if step % t["log_every"] == 0:
                say(f"step {step}/{t['steps']}  loss {sum(losses[-t['log_every']:]) / len(losses[-t['log_every']:]):.4f}  "
                    f"lr {_lr(step - 1, cfg):.2e}  {(time.time() - t0) / len(losses):.3f} s/step")
            if step % t["eval_every"] == 0 or step == t["steps"]:
                ev = evaluate(student, val_blocks, batch_size=t["eval_batch_size"])
                student.train()
                row = {"epoch": len(history) + 1, "global_step": step, "train_loss": sum(losses) / max(len(losses), 1),
                       "top1": ev["top1"], "perplexity": ev["perplexity"], "eval_tokens": ev["tokens"]}
                losses = []
                history.append(row)
                run.record_epoch(row)
                say(f"eval step {step}: perplexity {ev['perplexity']:.3f}  top-1 {ev['top1']:.2f}%")
                ck_dir.mkdir(exist_ok=True)
                tmp = ck_dir / f"last.pt.tmp-{os.getpid()}"
                torch.save({"model": student.state_dict(), "optim": opt.state_dict(), "step": step, "history": history,
                            "rng": torch.get_rng_state()}, tmp)
                os.replace(tmp, last)
        best = max(history, key=lambda r: r["top1"])
        summary = {"method": m["name"], "student": "llama" if "config" in cfg["student"] else str(cfg["student"]["pretrained"]),
                   "teacher": None if m["name"] == "ce" else ("cache" if cache is not None else "live"),
                   "seed": cfg["seed"], "epochs": len(history), "steps": step,
                   "best_top1": best["top1"], "last_top1": history[-1]["top1"],
                   "perplexity": history[-1]["perplexity"], "best_perplexity": min(r["perplexity"] for r in history),
                   "method_params": {k: v for k, v in m.items() if k != "name"},
                   "data": {"dataset": "lm", "block_length": cfg["corpus"]["block_length"], "vocab_size": vocab,
                            "top_k": None if cache is None else cache.top_k}}
        run.write_summary(summary)
        say(json.dumps({k: summary[k] for k in ("method", "seed", "perplexity", "last_top1")}))
        return 0
    finally:
        run.close()
