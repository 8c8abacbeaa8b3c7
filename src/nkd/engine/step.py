"""One student: its model, method, optimizer, AMP scaler, EMA, guard, RNG stream, run directory
and training state — and :meth:`Student.train_step`, one optimization step on a batch and the
(shared) teacher output.

A student owns its own random stream: it is seeded and its model built from ``cfg.seed`` alone,
and every step runs inside :meth:`Student.rng_scope`. So a student trained in lockstep with
others (same batches, same teacher forward) consumes exactly the random numbers (dropout, drop
path) it would consume alone, and its weights are bitwise those of a separate run on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import Config, dump_config
from ..losses import value_checks
from ..methods import Sample, Setup, build_method
from ..models import create_model
from .checkpoint import rng_state, seeded, set_rng_state
from .distributed import DistInfo, all_reduce_sum
from .guard import NonFiniteError, NonFiniteGuard
from .rundir import RunDir
from .schedule import lr_at
from .state import FORMAT, InEpoch, Progress, describe_position, save_checkpoint
from .sync_bn import convert_sync_batchnorm


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    import platform

    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict[str, Any]:
    """What a CPU run's bitwise results depend on: CPU model, thread count, torch version."""
    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


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


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Student:
    """Everything of one student run except the data and the teacher (shared by a group)."""

    def __init__(self, cfg: Config, run: RunDir, device: torch.device, dist: DistInfo, setup: Setup | None = None):
        self.cfg, self.run, self.device, self.dist = cfg, run, device, dist
        self.log = run.log
        with seeded(cfg.seed):  # the initialization depends on the seed only; the global RNG is given back
            student = create_model(cfg.model.name, cfg.model.num_classes, checkpoint=cfg.model.checkpoint,
                                   **cfg.model.kwargs)
            self.method, self.trainable = build_method(cfg.method.name, cfg.method.params, cfg.model.num_classes,
                                                       student, setup)
            self.rng = torch.get_rng_state()  # the student's own stream continues from here
            self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        mf = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.trainable.to(device, memory_format=mf)
        if dist.enabled and cfg.train.sync_bn:
            self.trainable = convert_sync_batchnorm(self.trainable, device)
        self.model: nn.Module = self.trainable
        if dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.trainable, device_ids=ids)
        self.forward = torch.compile(self.model, mode=cfg.train.compile_mode) if cfg.train.compile else self.model
        self.optimizer = build_optimizer(cfg, self.trainable)
        self.amp_dtype = AMP_DTYPES[cfg.train.amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if cfg.train.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.trainable.student, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay),
                                     use_buffers=True)
        self.params = [p for p in self.trainable.parameters() if p.requires_grad]
        self.guard = NonFiniteGuard(cfg.train.nan_policy, device, dist)
        self.state = Progress()
        self.sums: dict[str, torch.Tensor] = {}
        self.seen = self.restored = 0
        self.last_total: torch.Tensor | None = None
        self.lr = cfg.optim.lr
        self.before_rename: Any = None  # a fault hook (nkd.engine.faults), None in normal runs

    # ------------------------------------------------------------------ one step
    @contextlib.contextmanager
    def rng_scope(self) -> Iterator[None]:
        """Run with this student's own random stream (CPU, and CUDA on a GPU)."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            torch.set_rng_state(outer)
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def begin_epoch(self, epoch: int, start: int) -> None:
        """Reset the epoch's sums (restored from a mid-epoch checkpoint when resuming inside it)."""
        self.trainable.train()
        self.guard.reset()
        self.sums, self.seen, self.restored = {}, 0, 0
        partial = self.state.partial
        if partial is not None and partial.epoch == epoch and start and self.dist.is_main:
            # the saved sums are already summed over ranks
            self.sums = {k: torch.tensor(v, device=self.device) for k, v in partial.sums.items()}
            self.seen = self.restored = partial.seen
        self.state.partial = None

    def train_step(self, x: torch.Tensor, y: torch.Tensor, teacher: dict[str, torch.Tensor] | None, epoch: float,
                   check_labels: bool, sample: Sample | None = None) -> bool:
        """One optimization step at (fractional) ``epoch``; False when the step was skipped
        (``nan_policy="skip"``)."""
        cfg = self.cfg
        self.lr = lr_at(cfg.optim.lr, cfg.schedule, epoch)
        for grp in self.optimizer.param_groups:
            grp["lr"] = self.lr
        with self.rng_scope():
            with self.autocast(), value_checks(check_labels):
                out = self.forward(x)
                extra = {"sample": sample} if self.method.needs_index else {}
                losses = self.method.losses(out, teacher, y, int(epoch), **extra)
            terms = {k: v for k, v in losses.items() if k.startswith("loss_")}
            total = sum(terms.values())
            if self.guard.skip and not bool(torch.isfinite(total)):
                bad = [k for k, v in terms.items() if not bool(torch.isfinite(v))]
                return self._skip(f"loss term(s) {bad} became non-finite", epoch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)
        clip = cfg.train.grad_clip if cfg.train.grad_clip else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        # with a GradScaler, inf gradients are expected (the scaler skips those steps)
        grads_ok = (torch.ones((), dtype=torch.bool, device=gnorm.device) if self.scaler.is_enabled()
                    else torch.isfinite(gnorm))
        if self.guard.skip and not bool(grads_ok):
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip("gradient norm became non-finite", epoch)
        if not self.guard.skip:
            self.guard.record(terms, grads_ok, self.state.global_step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.trainable.student)
        self.state.global_step += 1
        n = y.shape[0]
        self.seen += n
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float() * n
        self.last_total = total.detach()
        return True

    def _skip(self, what: str, epoch: float) -> bool:
        self.state.skipped_steps += 1
        self.log.info("skipping step: %s at epoch %d (global step %d); last good checkpoint: %s", what,
                      int(epoch) + 1, self.state.global_step, self.last_good())
        return False

    def check_finite(self, epoch: int) -> None:
        """Raise :class:`NonFiniteError` if a non-finite value was recorded (policy ``stop``)."""
        if self.guard.skip:
            return
        failure = self.guard.first_failure([k for k in self.sums if k.startswith("loss_")] or ["loss"])
        if failure is None:
            return
        step, what = failure
        raise NonFiniteError(f"{self.run.path}: non-finite {', '.join(what) or 'value'} at epoch {epoch + 1} (first "
                             f"at global step {step}); last good checkpoint: {self.last_good()} (set "
                             "train.nan_policy=skip to skip such steps)")

    def last_good(self) -> str:
        p = self.run.ckpt_dir / "last.pt"
        return str(p) if p.is_file() else "none yet"

    # ------------------------------------------------------------------ epoch results
    def reduce_sums(self) -> tuple[int, dict[str, float]]:
        """Images seen and per-term sums, summed over ranks (a collective: every rank calls it)."""
        count = all_reduce_sum(torch.tensor([float(self.seen)], device=self.device), self.dist)
        return int(count), {k: float(all_reduce_sum(torch.as_tensor(v, device=self.device).reshape(1).clone(),
                                                    self.dist)) for k, v in self.sums.items()}

    def epoch_row(self, epoch: int, elapsed: float) -> dict[str, Any]:
        """Mean of every logged term over the epoch's images; ``loss`` = the objective."""
        count, totals = self.reduce_sums()
        row: dict[str, Any] = {k: v / max(count, 1) for k, v in totals.items()}
        row["loss"] = sum(v for k, v in row.items() if k.startswith("loss_"))
        row["lr"] = lr_at(self.cfg.optim.lr, self.cfg.schedule, epoch)
        row["img_per_s"] = (count - self.restored) / max(elapsed, 1e-9)
        return row

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "method": self.cfg.method.name, "model_name": self.cfg.model.name,
            "num_classes": self.cfg.model.num_classes, "trainable": self.trainable.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(), **self.state.to_state(),
            "rng": {**rng_state(), "student": self.rng, **({"student_cuda": self.cuda_rng} if self.cuda_rng is not None
                                                           else {})},
            "config": dump_config(self.cfg),
        }

    def save(self, is_best: bool = False) -> None:
        """Write ``last.pt`` (and ``best.pt``); weights that are not finite are never saved."""
        if not self.dist.is_main:
            return
        bad = [k for k, v in self.trainable.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:
            raise NonFiniteError(f"{self.run.path}: non-finite weights ({', '.join(bad[:5])}); not saved — last good "
                                 f"checkpoint: {self.last_good()}")
        save_checkpoint(self.run.ckpt_dir, self.state_dict(), is_best, self.before_rename)

    def save_inside_epoch(self, epoch: int, step: int, steps: int) -> None:
        """``last.pt`` after ``step`` of the ``steps`` steps of ``epoch``, with the epoch's sums so far."""
        count, totals = self.reduce_sums()
        self.state.partial = InEpoch(epoch, step, count, totals, steps)
        try:
            self.save()
        finally:
            self.state.partial = None

    def load(self, path, ck: dict[str, Any], changes: dict[str, tuple[Any, Any]]) -> None:
        """Restore everything from checkpoint ``ck`` (read from ``path``)."""
        from ..models.checkpoint import describe_mismatch

        problem = describe_mismatch(self.trainable, ck["trainable"])
        if problem:
            raise ValueError(f"cannot resume from {path}: {problem}")
        self.trainable.load_state_dict(ck["trainable"])
        fresh = self._load_optimizer(path, ck, changes)
        self.scaler.load_state_dict(ck["scaler"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        self.state = Progress.from_state(ck)
        rng = ck["rng"]
        set_rng_state(rng)
        self.rng = rng.get("student", rng["torch"])
        if self.cuda_rng is not None and "student_cuda" in rng:
            self.cuda_rng = rng["student_cuda"]
        if changes:
            epoch, step = self.state.position()
            self.state.changes.append({"at": describe_position(epoch, step), "global_step": self.state.global_step,
                                       "changes": {k: list(v) for k, v in changes.items()},
                                       **({"optimizer": fresh} if fresh else {})})
            if fresh:
                self.log.info("--allow-changes: %s", fresh)
            self.log.info("--allow-changes: continuing with %s", "; ".join(f"{k}: {a!r} → {b!r}"
                                                                          for k, (a, b) in changes.items()))

    def _load_optimizer(self, path, ck: dict[str, Any], changes: dict[str, tuple[Any, Any]]) -> str | None:
        """Restore the optimizer's state; with accepted changes that make the saved state not fit
        (another ``optim.name``, other parameter groups) the optimizer starts fresh instead — the
        returned note says so (None when the state was restored)."""
        from ..typed import first_line

        if "optim.name" in changes:
            a, b = changes["optim.name"]
            return (f"optim.name changed ({a} → {b}): the {b} optimizer starts fresh (no momentum or moment "
                    f"estimates from {a})")
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError) as e:
            if not changes:
                raise ValueError(f"cannot resume from {path}: its optimizer state does not fit: {first_line(e)}") from e
            return f"the saved optimizer state does not fit the changed settings ({first_line(e)}): it starts fresh"
        return None

    def summary(self, world_size: int) -> dict[str, Any]:
        cfg, st = self.cfg, self.state
        last = next((r for r in reversed(st.history) if "top1" in r), {})
        d = cfg.data
        return {
            "method": cfg.method.name, "method_params": dataclasses.asdict(self.method.p), "label": cfg.label,
            "student": cfg.model.name, "teacher": cfg.teacher.name if cfg.teacher else None, "seed": cfg.seed,
            "epochs": cfg.schedule.epochs, "best_top1": st.best.get("top1"), "best_top5": st.best.get("top5"),
            "best_epoch": st.best.get("epoch"), "last_top1": last.get("top1"), "last_top5": last.get("top5"),
            "world_size": world_size,
            "data": {"name": d.name, "root": d.root, "train_subset": d.train_subset, "image_size": d.image_size,
                     "num_classes": cfg.model.num_classes},
            "config_changes": st.changes,
            "machine": machine(),
        }
