"""The training loop: one class for teachers, KD and self-KD, single process or torchrun.

Run directory (``cfg.output_dir``), written by rank 0 only::

    config.yaml            the resolved config of the run
    metrics.jsonl          one JSON line per epoch (losses, lr, top-1/top-5, best so far, img/s)
    train.log              the console log
    tb/                    TensorBoard event files
    checkpoints/last.pt    full training state after the last completed epoch (atomic)
    checkpoints/best.pt    the same at the best top-1 epoch
    summary.json           best/last top-1 and top-5 when training ends
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, dump_config
from ..data.build import build_loaders
from ..losses import value_checks
from ..methods import build_method
from ..models import create_model
from . import faults
from .checkpoint import (
    CHECKPOINT_NAMES,
    load_checkpoint,
    rng_state,
    save_atomic,
    seed_everything,
    set_rng_state,
    used_run_dir_error,
)
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, init_distributed
from .schedule import lr_at

log = logging.getLogger("nkd")


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/Inf."""


class StopRequested(RuntimeError):
    """SIGTERM / SIGUSR1 arrived (a scheduler's pre-emption warning): the run saved ``last.pt`` at
    the next step boundary and stopped; ``--resume`` continues from there."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_bias: bool) -> list[dict[str, Any]]:
    """All trainable parameters; with ``exclude_norm_bias`` biases and 1-D (norm) weights get wd 0."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if exclude_norm_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.no_decay_norm_bias)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


def check_writable(run_dir: Path) -> None:
    """Fail early (before any training) when the run directory cannot be written."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output_dir: {run_dir} is not writable ({e.strerror or e})") from e


@torch.no_grad()
def evaluate_model(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
                   info: DistInfo | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy and mean CE on ``loader``, reduced across ranks from counts."""
    was = model.training
    model.eval()
    stats = torch.zeros(4, device=device, dtype=torch.float64)  # correct1, correct5, n, loss_sum
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        stats[0] += (top5[:, 0] == y).sum()
        stats[1] += (top5 == y[:, None]).any(1).sum()
        stats[2] += y.numel()
        stats[3] += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    all_reduce_sum(stats, info or DistInfo())
    model.train(was)
    n = max(float(stats[2]), 1.0)
    return {"top1": 100 * float(stats[0]) / n, "top5": 100 * float(stats[1]) / n,
            "eval_loss": float(stats[3]) / n, "eval_samples": int(stats[2])}


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False):
        """``resume``: continue from ``output_dir/checkpoints/last.pt`` (from scratch if there is none).
        Without it, an ``output_dir`` that already holds checkpoints is refused (ValueError) unless
        ``overwrite``, which deletes them first: a restarted or repeated command never silently
        replaces a run's progress."""
        self.cfg = cfg
        self.dist = init_distributed("cuda" if cfg.train.device in ("cuda", "auto") and torch.cuda.is_available()
                                     else "cpu")
        self.device = resolve_device(cfg.train.device, self.dist)
        seed_everything(cfg.seed)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.run_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.dist.is_main:
            check_writable(self.run_dir)
        if not resume:
            self._claim_run_dir(overwrite)
        self._setup_logging()

        self.loaders = build_loaders(cfg, self.device, self.dist.rank, self.dist.world_size)
        if self.loaders.num_classes != cfg.model.num_classes:
            raise ValueError(f"model.num_classes={cfg.model.num_classes} but the dataset has "
                             f"{self.loaders.num_classes} classes")
        student = create_model(cfg.model.name, cfg.model.num_classes, checkpoint=cfg.model.checkpoint,
                               **cfg.model.kwargs)
        teacher = None
        if cfg.teacher is not None:
            teacher = create_model(cfg.teacher.name, cfg.teacher.num_classes, checkpoint=cfg.teacher.checkpoint,
                                   **cfg.teacher.kwargs)
        self.method, self.trainable = build_method(cfg, student, teacher)
        mf = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.method.to(self.device, memory_format=mf)
        self.trainable.to(self.device, memory_format=mf)
        self.model: nn.Module = self.trainable
        if self.dist.enabled and cfg.train.sync_bn:
            if self.device.type != "cuda":
                raise ValueError("train.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel)")
            self.trainable = nn.SyncBatchNorm.convert_sync_batchnorm(self.trainable)
            self.model = self.trainable
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.trainable, device_ids=ids)
        self.forward = self.model
        if cfg.train.compile:
            self.forward = torch.compile(self.model, mode=cfg.train.compile_mode)
            if self.method.teacher is not None:
                self.method.teacher = torch.compile(self.method.teacher, mode=cfg.train.compile_mode)
        self.optimizer = build_optimizer(cfg, self.trainable)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if cfg.train.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.trainable.student, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay),
                                     use_buffers=True)
        self.start_epoch, self.global_step = 0, 0
        self.best = {"top1": -1.0, "epoch": -1}
        self.history: list[dict[str, Any]] = []
        self.skipped_steps = 0
        self._partial: dict[str, Any] | None = None  # a mid-epoch checkpoint's position, until used
        self._signal: int | None = None  # a stop signal received (see StopRequested)
        self._stop_after_epoch = False
        if resume:
            self._resume()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            # metrics.jsonl = the epochs this run's state has seen (the checkpoint's history on resume,
            # so epochs redone after a fallback to prev.pt are not listed twice); no stale summary
            (self.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))
            (self.run_dir / "summary.json").unlink(missing_ok=True)
        self.tb = self._tensorboard()

    # ------------------------------------------------------------------ setup helpers
    def _setup_logging(self) -> None:
        log.setLevel(logging.INFO)
        log.handlers.clear()
        log.propagate = False
        if not self.dist.is_main:
            log.addHandler(logging.NullHandler())
            return
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        if self.cfg.train.console:
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(fmt)
            log.addHandler(console)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(self.run_dir / "train.log")
        fh.setFormatter(fmt)
        log.addHandler(fh)

    def _tensorboard(self):
        if not (self.dist.is_main and self.cfg.train.tensorboard):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("tensorboard not installed: event files disabled (pip install 'nkd[train]')")
            return None
        # events are logged per epoch (1-based): hide those of epochs this run is about to redo
        return SummaryWriter(str(self.run_dir / "tb"), purge_step=self.start_epoch + 1)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, epoch: int, partial: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything a resume needs. ``epoch`` is the last *complete* epoch (0-based; -1: none);
        ``partial`` = ``{"epoch", "step", "seen", "sums"}`` for a checkpoint written inside an epoch."""
        return {
            "format": "nkd-train-v1",
            "method": self.cfg.method.name,
            "model_name": self.cfg.model.name,
            "num_classes": self.cfg.model.num_classes,
            "trainable": self.trainable.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "best": dict(self.best),
            "history": json.dumps(self.history),
            "skipped_steps": self.skipped_steps,
            "partial": partial,
            "rng": rng_state(),
            "config": dump_config(self.cfg),
        }

    def save(self, epoch: int, is_best: bool, partial: dict[str, Any] | None = None) -> None:
        """Write ``last.pt`` (and ``best.pt``) atomically, keeping the previous ``last.pt`` as
        ``prev.pt``. Weights that are not finite are never written over a good checkpoint."""
        if not self.dist.is_main:
            return
        bad = [k for k, v in self.trainable.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:
            raise NonFiniteError(f"epoch {epoch + 1}: non-finite weights ({', '.join(bad[:5])}); not saved — "
                                 f"last good checkpoint: {self._last_good()}")
        state = self.state_dict(epoch, partial)
        last = self.ckpt_dir / "last.pt"
        if last.is_file():  # keep the previous complete checkpoint as prev.pt (hard link, atomic)
            tmp = self.ckpt_dir / f"prev.pt.tmp-{os.getpid()}"
            tmp.unlink(missing_ok=True)
            try:
                os.link(last, tmp)
                os.replace(tmp, self.ckpt_dir / "prev.pt")
            except OSError:
                tmp.unlink(missing_ok=True)
        save_atomic(state, last)
        if is_best:
            save_atomic(state, self.ckpt_dir / "best.pt")

    def _claim_run_dir(self, overwrite: bool) -> None:
        problem = used_run_dir_error(self.run_dir)
        if problem is None:
            return
        if not overwrite:
            raise ValueError(problem)
        if self.dist.is_main:
            for name in CHECKPOINT_NAMES:
                (self.ckpt_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / "tb", ignore_errors=True)

    def _resume(self) -> None:
        path = self.ckpt_dir / "last.pt"
        prev = self.ckpt_dir / "prev.pt"
        if not path.is_file() and not prev.is_file():
            log.info("no checkpoint at %s: starting from scratch", path)
            return
        try:
            ck = load_checkpoint(path)
        except (ValueError, FileNotFoundError) as e:
            if not prev.is_file():
                raise ValueError(f"cannot resume: {e}") from e
            log.info("%s; resuming from the previous checkpoint %s", e, prev)
            path, ck = prev, load_checkpoint(prev)
        for key, want in (("method", self.cfg.method.name), ("model_name", self.cfg.model.name),
                          ("num_classes", self.cfg.model.num_classes)):
            if ck.get(key) != want:
                raise ValueError(f"cannot resume from {path}: it was written for {key}={ck.get(key)!r}, "
                                 f"the config says {want!r}")
        from ..models.checkpoint import describe_mismatch

        problem = describe_mismatch(self.trainable, ck["trainable"])
        if problem:
            raise ValueError(f"cannot resume from {path}: {problem}")
        self.trainable.load_state_dict(ck["trainable"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        self.start_epoch = int(ck["epoch"]) + 1
        self.global_step = int(ck["global_step"])
        self.best = dict(ck["best"])
        self.history = json.loads(ck["history"])
        self.skipped_steps = int(ck.get("skipped_steps", 0))
        self._partial = ck.get("partial")
        set_rng_state(ck["rng"])
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        why = f" (torchrun restart {restart})" if restart else ""
        where = (f"inside epoch {self._partial['epoch'] + 1} after its step {self._partial['step']}" if self._partial
                 else f"after epoch {self.start_epoch}")
        log.info("resumed from %s %s of %d, global step %d%s", path, where, self.cfg.schedule.epochs,
                 self.global_step, why)

    # ------------------------------------------------------------------ loop
    def steps_per_epoch(self) -> int:
        n = len(self.loaders.train)
        cap = self.cfg.train.max_steps_per_epoch
        return min(n, cap) if cap else n

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _last_good(self) -> str:
        p = self.ckpt_dir / "last.pt"
        return str(p) if p.is_file() else "none yet"

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch. Non-finite losses/gradients: with ``nan_policy="skip"`` each step is checked
        (a host sync per step); with ``"stop"`` a flag is kept on the device and read every
        ``log_every`` steps and at the end of the epoch — before any checkpoint is written."""
        cfg = self.cfg
        self.model.train()
        self.method.train()
        self.loaders.set_epoch(epoch)
        steps = self.steps_per_epoch()
        sums: dict[str, torch.Tensor] = {}
        seen = restored = start = 0
        if self._partial is not None and self._partial["epoch"] == epoch:  # resume inside this epoch
            start = int(self._partial["step"])
            if self.dist.is_main:  # the saved sums are already summed over ranks
                sums = {k: torch.tensor(v, device=self.device) for k, v in self._partial["sums"].items()}
                seen = restored = int(self._partial["seen"])
        self._partial = None
        bar = None
        if self.dist.is_main and cfg.train.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{cfg.schedule.epochs}", leave=False,
                       dynamic_ncols=True, file=sys.stdout)
        t0 = time.perf_counter()
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        skip_policy = cfg.train.nan_policy == "skip"
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_terms = torch.zeros((), dtype=torch.long, device=self.device)
        lr = cfg.optim.lr
        nan_steps = faults.nan_steps()
        faults.maybe_kill(self.dist.rank, epoch)
        every = cfg.train.checkpoint_every_steps
        for i, (x, y) in enumerate(self.loaders.train_batches(start), start=start):
            if i >= steps:
                break
            faults.maybe_kill_at_step(self.dist.rank, self.global_step)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.loaders.mix is not None:
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.global_step * 131 + self.dist.rank)
                x, y = self.loaders.mix(x, y, g)
            lr = lr_at(cfg.optim.lr, cfg.schedule, epoch + i / steps)
            for grp in self.optimizer.param_groups:
                grp["lr"] = lr
            with self._autocast(), value_checks(i == start):  # labels validated on each epoch's first batch
                logits, weak = self.forward(x)
                losses = self.method.losses(logits, weak, x, y, epoch)
            if self.global_step + self.skipped_steps in nan_steps:  # fault injection: poison the first loss term
                first = next(iter(losses))
                losses[first] = losses[first] * float("nan")
            total = sum(losses.values())
            if skip_policy and not bool(torch.isfinite(total)):
                bad = [k for k, v in losses.items() if not bool(torch.isfinite(v))]
                self._non_finite(f"loss term(s) {bad} became non-finite", epoch, i)
                continue
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            clip = cfg.train.grad_clip if cfg.train.grad_clip else math.inf
            gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
            # with a GradScaler, inf gradients are expected (the scaler skips those steps)
            grads_ok = (torch.ones((), dtype=torch.bool, device=gnorm.device) if self.scaler.is_enabled()
                        else torch.isfinite(gnorm))
            if skip_policy and not bool(grads_ok):
                self._non_finite("gradient norm became non-finite", epoch, i)
                self.optimizer.zero_grad(set_to_none=True)
                continue
            if not skip_policy:
                self._record_non_finite(losses, grads_ok)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update_parameters(self.trainable.student)
            self.global_step += 1
            n = y.shape[0]
            seen += n
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * n
            last = i == steps - 1
            boundary = (i + 1) % cfg.train.log_every == 0 or last
            periodic_save = bool(every) and (i + 1) % every == 0 and not last
            if (boundary or periodic_save) and not skip_policy:  # before any save: nothing non-finite is kept
                self._raise_if_non_finite(list(losses), epoch)
            stop = False
            if boundary:
                stop = self._stop_agreed()
                if bar is not None:
                    rate = (seen - restored) * self.dist.world_size / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{float(total.detach()):.3f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
            if stop and last:
                self._stop_after_epoch = True  # fit() saves the epoch, then stops
            elif stop:
                self._save_inside_epoch(epoch, i + 1, seen, sums)
                raise StopRequested(self._stopped_message(f"inside epoch {epoch + 1} after its step {i + 1}"))
            elif periodic_save:
                self._save_inside_epoch(epoch, i + 1, seen, sums)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if not skip_policy:
            self._raise_if_non_finite(list(sums), epoch)
        elapsed = time.perf_counter() - t0
        count, totals = self._reduce_sums(seen, sums)
        out = {k: v / max(count, 1) for k, v in totals.items()}
        out["loss"] = sum(out.values())
        out["lr"] = lr_at(cfg.optim.lr, cfg.schedule, epoch)
        out["img_per_s"] = (count - restored) / max(elapsed, 1e-9)
        return out

    def _stop_agreed(self) -> bool:
        """Whether any rank got a stop signal (a collective under DDP, at log_every boundaries)."""
        if not self.dist.enabled:
            return self._signal is not None
        flag = torch.tensor([0 if self._signal is None else 1], device=self.device)
        return bool(all_reduce_max(flag, self.dist))

    def _stopped_message(self, where: str) -> str:
        name = signal.Signals(self._signal).name if self._signal else "a stop signal on another rank"
        return (f"stopped on {name} {where} (global step {self.global_step}); saved {self.ckpt_dir / 'last.pt'} — "
                "continue with --resume")

    def _reduce_sums(self, seen: int, sums: dict[str, torch.Tensor]) -> tuple[int, dict[str, float]]:
        """Images seen and per-term loss sums, summed over ranks (a collective: every rank calls it)."""
        count = all_reduce_sum(torch.tensor([float(seen)], device=self.device), self.dist)
        return int(count), {k: float(all_reduce_sum(torch.as_tensor(v, device=self.device).reshape(1).clone(),
                                                    self.dist)) for k, v in sums.items()}

    def _save_inside_epoch(self, epoch: int, step: int, seen: int, sums: dict[str, torch.Tensor]) -> None:
        """``last.pt`` after ``step`` steps of ``epoch`` (``train.checkpoint_every_steps`` or a stop
        signal; the caller has checked for non-finite values). The epoch's running loss sums are
        saved summed over ranks."""
        count, totals = self._reduce_sums(seen, sums)
        self.save(epoch - 1, False, partial={"epoch": epoch, "step": step, "seen": count, "sums": totals})

    def _record_non_finite(self, losses: dict[str, torch.Tensor], grads_ok: torch.Tensor) -> None:
        """Remember (on the device, no sync) the first global step with a non-finite loss term or
        gradient, and a bitmask of the offending terms (bit ``len(losses)``: the gradient)."""
        flags = [~torch.isfinite(v.detach()) for v in losses.values()] + [~grads_ok]
        bits = sum(f.long() << j for j, f in enumerate(flags))
        first = (self._first_bad < 0) & (bits > 0)
        self._first_bad = torch.where(first, torch.full_like(self._first_bad, self.global_step), self._first_bad)
        self._bad_terms = torch.where(first, bits, self._bad_terms)

    def _raise_if_non_finite(self, names: list[str], epoch: int) -> None:
        step = int(all_reduce_max(self._first_bad.clone(), self.dist))
        if step < 0:
            return
        bits = int(self._bad_terms)
        what = [n for j, n in enumerate(names) if bits >> j & 1] + (["gradient"] if bits >> len(names) & 1 else [])
        self._non_finite(f"non-finite {', '.join(what) or 'value'} (first at global step {step})", epoch,
                         step - epoch * self.steps_per_epoch())

    def _non_finite(self, what: str, epoch: int, step: int) -> bool:
        """Stop (raise) or skip (return True) per ``train.nan_policy``."""
        msg = (f"{what} at epoch {epoch + 1}, step {step} (global step {self.global_step}); "
               f"last good checkpoint: {self._last_good()}")
        if self.cfg.train.nan_policy == "skip":
            self.skipped_steps += 1
            log.info("skipping step: %s", msg)
            return True
        raise NonFiniteError(msg + " (set train.nan_policy=skip to skip such steps)")

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        return evaluate_model(model or self.trainable.student, self.loaders.eval, self.device, self.amp_dtype,
                              self.dist)

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        epochs = cfg.schedule.epochs
        log.info("run %s | method %s | student %s%s | %d epochs x %d steps | device %s x %d",
                 self.run_dir, cfg.method.name, cfg.model.name,
                 f" | teacher {cfg.teacher.name}" if cfg.teacher else "", epochs, self.steps_per_epoch(),
                 self.device, self.dist.world_size)
        with self._stop_signals():
            for epoch in range(self.start_epoch, epochs):
                self._fit_epoch(epoch)
                if self._stop_after_epoch and epoch + 1 < epochs:
                    raise StopRequested(self._stopped_message(f"at the end of epoch {epoch + 1}"))
        return self.finish()

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGTERM / SIGUSR1 set a flag (checked at log_every boundaries) instead of killing the run."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def note(signum, _frame):
            self._signal = signum

        old = {s: signal.signal(s, note) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _fit_epoch(self, epoch: int) -> None:
        """Train one epoch, evaluate when due, record, save ``last.pt`` (and ``best.pt``)."""
        cfg, epochs = self.cfg, self.cfg.schedule.epochs
        row: dict[str, Any] = {"epoch": epoch + 1, **self.train_epoch(epoch)}
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == epochs:
            row.update(self.evaluate())
            if self.ema is not None:
                row.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()})
        is_best = "top1" in row and row["top1"] > self.best["top1"]
        if is_best:
            self.best = {"top1": row["top1"], "top5": row["top5"], "epoch": epoch + 1}
        row["best_top1"] = self.best["top1"]
        row["global_step"] = self.global_step
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        self.history.append(row)
        self.save(epoch, is_best)
        self._log_epoch(row)
        barrier(self.dist)

    def _log_epoch(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()
        acc = f" | top1 {row['top1']:.2f} top5 {row['top5']:.2f} (best {row['best_top1']:.2f})" if "top1" in row else ""
        log.info("epoch %d | loss %.4f | lr %.4g | %.0f img/s%s", row["epoch"], row["loss"], row["lr"],
                 row["img_per_s"], acc)

    def finish(self) -> dict[str, Any]:
        last = next((r for r in reversed(self.history) if "top1" in r), {})
        summary = {
            "method": self.cfg.method.name, "method_params": dataclasses.asdict(self.method.p),
            "student": self.cfg.model.name,
            "teacher": self.cfg.teacher.name if self.cfg.teacher else None, "seed": self.cfg.seed,
            "epochs": self.cfg.schedule.epochs, "best_top1": self.best.get("top1"),
            "best_top5": self.best.get("top5"), "best_epoch": self.best.get("epoch"),
            "last_top1": last.get("top1"), "last_top5": last.get("top5"), "world_size": self.dist.world_size,
        }
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            log.info("done: best top1 %.2f (epoch %s), last top1 %.2f", summary["best_top1"] or 0,
                     summary["best_epoch"], summary["last_top1"] or 0)
            if self.tb is not None:
                self.tb.close()
        return summary
