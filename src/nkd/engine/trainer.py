"""The training loop: one student, or several in lockstep sharing the data and the teacher.

``Trainer(cfg)`` trains one run; ``Trainer([cfg_a, cfg_b, …])`` (or :func:`train_together`)
trains several students whose configs agree on everything that decides the batches and the
teacher output (:func:`shared_settings`: data, seed, epochs, steps, teacher, precision, …).
Each batch is drawn once, the teacher runs once, and each student takes its own step
(:meth:`nkd.engine.step.Student.train_step`) with its own optimizer, schedule, method, EMA,
guard, checkpoints and run directory — on the CPU each ends bitwise where its own separate
run ends. Single process or under ``torchrun``.

The parts live in their own modules: :mod:`.rundir` (lock, logs, metrics, TensorBoard),
:mod:`.state` (checkpoint contents, save, resume), :mod:`.guard` (non-finite values),
:mod:`.step` (one student and its step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..config import LOCKSTEP_SHARED_KEYS, Config, dump_config, flatten
from ..data.build import build_loaders
from ..methods import METHODS, Sample, Setup, Teacher, method_params
from ..models import create_model
from .distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, init_distributed
from .faults import Faults
from .guard import NonFiniteError
from .rundir import RunDir
from .state import InEpoch, check_compatible, checkpoint_position, describe_position, read_checkpoints, restore_best
from .step import Student

log = logging.getLogger("nkd")


class StopRequested(RuntimeError):
    """SIGTERM / SIGUSR1 arrived (a scheduler's pre-emption warning): the run saved ``last.pt``
    and stopped; ``--resume`` continues from there."""


class GroupError(NonFiniteError):
    """Some students of a lockstep group stopped (each named with its run directory); the
    others finished."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def shared_settings(cfg: Config) -> dict[str, Any]:
    """What a student shares with its lockstep group: :data:`nkd.config.LOCKSTEP_SHARED_KEYS`
    (declared on the config's fields), plus the teacher (name,
    checkpoint, classes, constructor arguments) for methods that use one (``None`` otherwise)."""
    flat = flatten(cfg.to_dict())
    out = {k: v for k, v in flat.items() if any(k == s or k.startswith(s + ".") for s in LOCKSTEP_SHARED_KEYS)}
    uses_teacher = cfg.method.name in METHODS and METHODS[cfg.method.name].needs_teacher()
    teacher = cfg.teacher.__dict__ if uses_teacher and cfg.teacher is not None else None
    out["teacher"] = None if teacher is None else {k: teacher[k] for k in ("name", "checkpoint", "num_classes",
                                                                           "kwargs")}
    return out


def differences(a: Config, b: Config) -> dict[str, tuple[Any, Any]]:
    """The shared settings in which two configs differ (``{key: (a, b)}``)."""
    sa, sb = flatten(shared_settings(a)), flatten(shared_settings(b))
    return {k: (sa.get(k), sb.get(k)) for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)}


def group_problems(cfgs: Sequence[Config]) -> list[str]:
    """Why ``cfgs`` cannot train in one lockstep group (empty when they can)."""
    problems = []
    dirs: dict[str, int] = {}
    for i, c in enumerate(cfgs):
        d = os.path.abspath(c.output_dir)
        if d in dirs:
            problems.append(f"configs {dirs[d] + 1} and {i + 1} both write output_dir {c.output_dir}")
        dirs.setdefault(d, i)
        diff = differences(cfgs[0], c)
        if diff:
            listed = "; ".join(f"{k}: {a!r} vs {b!r}" for k, (a, b) in diff.items())
            problems.append(f"{c.output_dir} cannot share batches/teacher with {cfgs[0].output_dir}: {listed}")
    return problems


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return torch.device(name)


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
    """Train one config, or a lockstep group of configs (see the module docstring).

    ``resume``: continue each run from its ``checkpoints/last.pt`` (from scratch if there is
    none). Without it, an ``output_dir`` that holds checkpoints is refused (ValueError) unless
    ``overwrite``, which deletes them first. ``allow_changes``: accept a resume whose config
    changes the run (recorded in its history). Use as a context manager, or call :meth:`fit`
    (which releases the run directories at the end).
    """

    def __init__(self, cfg: Config | Sequence[Config], resume: bool = False, overwrite: bool = False,
                 allow_changes: bool = False, faults: Faults | None = None):
        self.single = isinstance(cfg, Config)
        self.cfgs = [cfg] if self.single else list(cfg)
        if not self.cfgs:
            raise ValueError("no configs to train")
        problems = group_problems(self.cfgs)
        if problems:
            raise ValueError("these configs cannot train in lockstep: " + "; ".join(problems))
        self.cfg = c = self.cfgs[0]
        self.dist = init_distributed("cuda" if c.train.device in ("cuda", "auto") and torch.cuda.is_available()
                                     else "cpu")
        self.device = resolve_device(c.train.device, self.dist)
        # process-wide settings this trainer changes, given back by close()
        self._restore = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled(), log.level, list(log.handlers),
                         log.propagate)
        if c.train.threads:
            torch.set_num_threads(c.train.threads)
        if c.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.runs = [RunDir(x.output_dir, self.dist.is_main) for x in self.cfgs]
        self.students: list[Student] = []
        self.failed: list[str] = []
        self._signal: int | None = None
        self._stop_after_epoch = False
        try:
            for run in self.runs:
                if run.is_main:
                    run.check_writable()
                    run.lock()
                    run.claim(resume, overwrite)
            self._setup_logging()
            self.loaders = build_loaders(c, self.device, self.dist.rank, self.dist.world_size)
            if self.loaders.num_classes != c.model.num_classes:
                raise ValueError(f"model.num_classes={c.model.num_classes} but the dataset has "
                                 f"{self.loaders.num_classes} classes")
            self.teacher, self.teacher_outputs = self._build_teacher()
            self.students = [Student(x, run, self.device, self.dist, self.setup) for x, run in zip(self.cfgs, self.runs)]
            self.start_epoch, self.start_step = self._resume(allow_changes) if resume else (0, 0)
            for s in self.students:
                s.run.start(dump_config(s.cfg), s.state.history)
                s.run.open_tensorboard(s.cfg.train.tensorboard, self.start_epoch + 1, s.state.global_step + 1)
            self.active = list(self.students)
            if faults is not None:
                faults.install(self)
        except BaseException:
            self.close()
            for run in self.runs:  # nothing trained: bad input leaves nothing behind
                run.discard()
            raise

    # ------------------------------------------------------------------ setup
    def _setup_logging(self) -> None:
        """Each run logs to its own ``train.log`` (and the console, prefixed by the run directory
        in a group); messages of the shared parts (the ``nkd`` logger) go to every run's log."""
        log.setLevel(logging.INFO)
        log.handlers.clear()
        log.propagate = False
        many = len(self.runs) > 1
        for run, cfg in zip(self.runs, self.cfgs):
            console = None
            if run.is_main and cfg.train.console:
                console = logging.StreamHandler(sys.stdout)
                tag = f" [{run.path}]" if many else ""
                console.setFormatter(logging.Formatter(f"%(asctime)s{tag} %(message)s", "%H:%M:%S"))
            run.setup_logging(console)
            if run.file_handler is not None:
                log.addHandler(run.file_handler)
        if self.dist.is_main and self.cfg.train.console:
            shared = logging.StreamHandler(sys.stdout)
            shared.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            log.addHandler(shared)
        if not log.handlers:
            log.addHandler(logging.NullHandler())

    def _build_teacher(self) -> tuple[Teacher | None, tuple[str, ...]]:
        """The frozen teacher, once for the group (built outside the students' random streams), and
        what it outputs: the union of what the group's methods read from it (logits, features).
        ``self.setup`` tells the methods the input shape and the (uncompiled) teacher model."""
        self.setup = Setup(input_shape=tuple(self.loaders.input_shape), train_labels=self.loaders.train_labels)
        if not any(METHODS[x.method.name].needs_teacher() for x in self.cfgs):
            return None, ()
        tc = next(x.teacher for x in self.cfgs if METHODS[x.method.name].needs_teacher())
        if tc.checkpoint:
            check_teacher_is_final(tc.checkpoint)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)  # a teacher without a checkpoint is initialized from the seed
            model = create_model(tc.name, tc.num_classes, checkpoint=tc.checkpoint, **tc.kwargs)
        mf = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        teacher = Teacher(model).to(self.device, memory_format=mf)
        self.setup = dataclasses.replace(self.setup, teacher=model)
        wanted = set()
        for x in self.cfgs:
            wanted.update(METHODS[x.method.name].teacher_refs(method_params(x.method.name, x.method.params, []), model,
                                                              self.setup.input_shape))
        if self.cfg.train.compile:
            teacher.model = torch.compile(teacher.model, mode=self.cfg.train.compile_mode)
        return teacher, tuple(sorted(wanted))

    def _resume(self, allow_changes: bool) -> tuple[int, int]:
        """Load every student's newest usable checkpoint; all must stand at the same position
        (a student ahead — killed between two students' saves — steps back to its ``prev.pt``)."""
        options = []
        for s in self.students:
            found = read_checkpoints(s.run.ckpt_dir, s.log)
            if not found:
                s.log.info("no checkpoint in %s: starting from scratch", s.run.ckpt_dir)
            options.append(found)
        if not any(options):
            return 0, 0

        position = checkpoint_position
        target = min(position(found[0][1]) if found else (0, 0) for found in options)
        steps = self.steps_per_epoch()
        chosen = []
        for found in options:
            match = next(((p, ck) for p, ck in found if position(ck) == target), None)
            if match is None and (found or target != (0, 0)):
                where = "; ".join(f"{x.run.path}: {describe_position(*position(f[0][1])) if f else 'no checkpoint'}"
                                  for x, f in zip(self.students, options))
                raise ValueError(f"cannot resume the group: its students stand at different positions ({where}); "
                                 "resume them separately (nkd train CONFIG --resume) or start again with --overwrite")
            chosen.append(match)
        for s, match in zip(self.students, chosen):
            if match is None:
                continue
            path, ck = match
            changes = check_compatible(path, ck, s.cfg.to_dict(), allow_changes)
            partial = InEpoch.read(ck.get("partial"))
            if partial is not None and partial.steps not in (None, steps):
                raise ValueError(f"cannot resume from {path}: it was saved inside an epoch of {partial.steps} "
                                 f"steps and the config now gives {steps} steps per epoch; resume with the original "
                                 "data settings to finish that epoch first")
            s.load(path, ck, changes)
            restore_best(s.run.ckpt_dir, path, ck, s.log)
            restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
            why = f" (torchrun restart {restart})" if restart else ""
            s.log.info("resumed from %s %s, of %d epochs; global step %d%s", path,
                       describe_position(*target, steps), s.cfg.schedule.epochs, s.state.global_step, why)
        return target

    # ------------------------------------------------------------------ single-run conveniences
    @property
    def trainable(self) -> nn.Module:
        return self.students[0].trainable

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.students[0].optimizer

    @property
    def method(self):
        return self.students[0].method

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close logs and event files, release the run directories' locks, and give back the
        process-wide settings the trainer changed (thread count, deterministic mode, the ``nkd``
        logger's level, handlers and propagation). Idempotent."""
        for run in self.runs:
            run.close()
        restore, self._restore = getattr(self, "_restore", None), None
        if restore is not None:
            threads, det, warn_only, level, handlers, propagate = restore
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(det, warn_only=warn_only)
            log.setLevel(level)
            log.handlers[:] = handlers
            log.propagate = propagate

    # ------------------------------------------------------------------ loop
    def steps_per_epoch(self) -> int:
        n = len(self.loaders.train)
        cap = self.cfg.train.max_steps_per_epoch
        return min(n, cap) if cap else n

    def _step_seed(self, epoch: int, step: int, stream: int = 0) -> int:
        """A seed of the step's random draws: a function of (seed, epoch, step, rank, stream) only."""
        key = ((self.cfg.seed * 1_000_003 + epoch) * 1_000_033 + step) * 131 + self.dist.rank
        return (key + stream * 0x9E3779B97F4A7C15) % 2**63

    def _mix_generator(self, epoch: int, step: int) -> torch.Generator:
        """MixUp/CutMix randomness of a folder-loader batch: a function of (seed, epoch, step, rank)."""
        return torch.Generator().manual_seed(self._step_seed(epoch, step))

    def train_epoch(self, epoch: int) -> dict[Student, dict[str, Any]]:
        """One epoch of every active student; returns each one's epoch row (mean losses, lr, img/s)."""
        cfg = self.cfg
        steps = self.steps_per_epoch()
        start = self.start_step if epoch == self.start_epoch else 0
        self.loaders.set_epoch(epoch)
        for s in self.active:
            s.begin_epoch(epoch, start)
        bar = self._progress_bar(epoch, steps, start)
        every = cfg.train.checkpoint_every_steps
        t0 = time.perf_counter()
        with_index = any(s.method.needs_index for s in self.active)
        for i, batch in enumerate(self.loaders.train_batches(start, with_index=with_index), start=start):
            if i >= steps:
                break
            x = batch[0].to(self.device, non_blocking=True)
            y = batch[1].to(self.device, non_blocking=True)
            sample = Sample(batch[2].to(self.device), self._step_seed(epoch, i, stream=1)) if with_index else None
            if self.loaders.mix is not None:
                x, y = self.loaders.mix(x, y, self._mix_generator(epoch, i))
            teacher = None
            if self.teacher is not None:
                with self.students[0].autocast():
                    teacher = self.teacher(x, self.teacher_outputs)
            for s in self.active:
                s.train_step(x, y, teacher, epoch + i / steps, check_labels=i == start, sample=sample)
            last = i == steps - 1
            boundary = (i + 1) % cfg.train.log_every == 0 or last
            periodic = bool(every) and (i + 1) % every == 0 and not last
            if boundary or periodic:  # before any save: nothing non-finite is kept
                self._check_finite(epoch)
            stop = self._stop_agreed() if boundary or not self.dist.enabled else False
            if boundary:
                self._report_progress(bar, epoch, i, steps, time.perf_counter() - t0)
            if stop and last:
                self._stop_after_epoch = True  # fit() saves the epoch, then stops
            elif stop:
                for s in self.active:
                    s.save_inside_epoch(epoch, i + 1, steps)
                raise StopRequested(self._stopped_message(describe_position(epoch, i + 1, steps)))
            elif periodic:
                for s in self.active:
                    s.save_inside_epoch(epoch, i + 1, steps)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self._check_finite(epoch)
        elapsed = time.perf_counter() - t0
        return {s: s.epoch_row(epoch, elapsed) for s in self.active}

    def _check_finite(self, epoch: int) -> None:
        for s in list(self.active):
            try:
                s.check_finite(epoch)
            except NonFiniteError as e:
                self._fail(s, e)

    def _fail(self, s: Student, e: NonFiniteError) -> None:
        """One run stops: alone, that is the whole job; in a group, the others go on."""
        s.log.info("stopped: %s", e)
        if self.single:
            raise e
        self.active.remove(s)
        self.failed.append(str(e))
        if not self.active:
            raise GroupError("every student of the group stopped: " + " | ".join(self.failed))

    def _progress_bar(self, epoch: int, steps: int, start: int):
        """A tqdm bar on a terminal only; elsewhere a plain log line every ``log_every`` steps."""
        if not (self.dist.is_main and self.cfg.train.progress and self.cfg.train.console and sys.stdout.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{self.cfg.schedule.epochs}", leave=False,
                    dynamic_ncols=True, file=sys.stdout)

    def _report_progress(self, bar, epoch: int, i: int, steps: int, elapsed: float) -> None:
        if not self.dist.is_main:
            return
        losses = []
        for s in self.active:
            loss = float(s.last_total) if s.last_total is not None else float("nan")
            losses.append(loss)
            rate = (s.seen - s.restored) * self.dist.world_size / max(elapsed, 1e-9)
            s.run.record_step(s.state.global_step, {"loss": loss, "lr": s.lr})
            if bar is None:
                s.log.info("epoch %d/%d step %d/%d | loss %.4f | lr %.4g | %.0f img/s", epoch + 1,
                           s.cfg.schedule.epochs, i + 1, steps, loss, s.lr, rate)
        if bar is not None:
            bar.set_postfix(loss="/".join(f"{v:.3f}" for v in losses), lr=f"{self.active[0].lr:.4g}")

    def _stop_agreed(self) -> bool:
        """Whether any rank got a stop signal (a collective under DDP, at log_every boundaries;
        a single process checks after every step)."""
        if not self.dist.enabled:
            return self._signal is not None
        flag = torch.tensor([0 if self._signal is None else 1], device=self.device)
        return bool(all_reduce_max(flag, self.dist))

    def _stopped_message(self, where: str) -> str:
        name = signal.Signals(self._signal).name if self._signal else "a stop signal on another rank"
        saved = ", ".join(str(s.run.ckpt_dir / "last.pt") for s in self.active)
        step = self.active[0].state.global_step if self.active else 0
        msg = f"stopped on {name} {where}, global step {step}; saved {saved} — continue with --resume"
        for s in self.active:  # every run's own train.log says why it ended (lockstep students included)
            s.log.info("%s", msg)
        return msg

    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        s = self.students[0]
        return evaluate_model(model or s.trainable.student, self.loaders.eval, self.device, s.amp_dtype, self.dist)

    def fit(self) -> dict[str, Any] | list[dict[str, Any]]:
        """Train to the last epoch; the summary (a list of them for a group). Releases the run
        directories when it returns or raises."""
        try:
            self._log_start()
            epochs = self.cfg.schedule.epochs
            with self._stop_signals():
                for epoch in range(self.start_epoch, epochs):
                    self._fit_epoch(epoch)
                    if self._stop_after_epoch and epoch + 1 < epochs:
                        raise StopRequested(self._stopped_message(f"at the end of epoch {epoch + 1}"))
            summaries = [self._finish(s) for s in self.active]
            if self.failed:
                raise GroupError(f"{len(self.failed)} of {len(self.students)} students stopped (the others finished): "
                                 + " | ".join(self.failed))
            return summaries[0] if self.single else summaries
        finally:
            self.close()

    def _log_start(self) -> None:
        c = self.cfg
        note = busy_machine_note(c.train.threads, torch.get_num_threads())
        if note:
            for s in self.students:
                s.log.info("%s", note)
        for s in self.students:
            s.log.info("run %s | method %s | student %s%s | %d epochs x %d steps | device %s x %d | %d CPU threads "
                       "(train.threads or OMP_NUM_THREADS to change)%s", s.run.path, s.cfg.method.name,
                       s.cfg.model.name, f" | teacher {s.cfg.teacher.name}" if self.teacher is not None
                       and s.cfg.teacher else "", c.schedule.epochs, self.steps_per_epoch(), self.device,
                       self.dist.world_size, torch.get_num_threads(),
                       f" | lockstep group of {len(self.students)}" if len(self.students) > 1 else "")

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """SIGTERM / SIGUSR1 set a flag instead of killing the run."""
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
        rows = self.train_epoch(epoch)
        for s, train_row in rows.items():
            cfg = s.cfg
            row: dict[str, Any] = {"epoch": epoch + 1, **train_row}
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.schedule.epochs:
                row.update(evaluate_model(s.trainable.student, self.loaders.eval, self.device, s.amp_dtype, self.dist))
                if s.ema is not None:
                    ema = evaluate_model(s.ema.module, self.loaders.eval, self.device, s.amp_dtype, self.dist)
                    row.update({f"ema_{k}": v for k, v in ema.items()})
            st = s.state
            is_best = "top1" in row and row["top1"] > st.best["top1"]
            if is_best:
                st.best = {"top1": row["top1"], "top5": row["top5"], "epoch": epoch + 1}
            row["best_top1"] = st.best["top1"]
            row["global_step"] = st.global_step
            if st.skipped_steps:
                row["skipped_steps"] = st.skipped_steps
            st.history.append(row)
            st.epoch = epoch
            try:
                s.save(is_best)
            except NonFiniteError as e:
                self._fail(s, e)
                continue
            s.run.record_epoch(row)
            acc = (f" | top1 {row['top1']:.2f} top5 {row['top5']:.2f} (best {row['best_top1']:.2f})"
                   if "top1" in row else "")
            s.log.info("epoch %d | loss %.4f | lr %.4g at its start | %.0f img/s%s", row["epoch"], row["loss"], row["lr"],
                       row["img_per_s"], acc)
        barrier(self.dist)

    def _finish(self, s: Student) -> dict[str, Any]:
        summary = s.summary(self.dist.world_size)
        s.run.write_summary(summary)
        s.log.info("done: best top1 %.2f (epoch %s), last top1 %.2f", summary["best_top1"] or 0,
                   summary["best_epoch"], summary["last_top1"] or 0)
        return summary


def busy_machine_note(configured: int | None, threads: int, load: float | None = None,
                      cores: int | None = None) -> str | None:
    """A line for the log when this run takes the default thread count (every core) on a machine
    already busier than its cores (1-minute load average): several runs with all threads each run
    far slower than with one thread each (what ``nkd sweep`` picks). None otherwise."""
    if configured or os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            return None
    if load <= cores or threads <= 1:
        return None
    return (f"the machine is busy (load {load:.1f} on {cores} cores) and this run uses {threads} CPU threads: runs "
            "sharing cores train much faster with fewer threads each — set train.threads (e.g. 1) or OMP_NUM_THREADS")


ALLOW_LIVE_TEACHER = "NKD_ALLOW_LIVE_TEACHER"


def check_teacher_is_final(checkpoint: str) -> None:
    """Refuse a ``teacher.checkpoint`` of a run that is still training (its ``best.pt`` /
    ``last.pt`` will still change): a ValueError naming the owner, or — with
    ``NKD_ALLOW_LIVE_TEACHER=1`` — a line in the log."""
    from .rundir import live_run_owning

    owner = live_run_owning(checkpoint)
    if owner is None:
        return
    msg = (f"teacher.checkpoint {checkpoint} belongs to a run that is still training ({owner}): the teacher "
           "would be a snapshot that run replaces later")
    if os.environ.get(ALLOW_LIVE_TEACHER) == "1":
        log.warning("%s; using it anyway (%s=1)", msg, ALLOW_LIVE_TEACHER)
        return
    raise ValueError(f"{msg}. Wait for it to finish, copy the file, or set {ALLOW_LIVE_TEACHER}=1 to use it as it is now")


def train_together(cfgs: Sequence[Config], resume: bool = False, overwrite: bool = False,
                   allow_changes: bool = False, faults: Faults | None = None) -> list[dict[str, Any]]:
    """Train ``cfgs`` as one lockstep group (one data pipeline, one teacher forward per batch);
    returns each run's summary. Raises ``ValueError`` naming the differing keys when they cannot
    share (see :func:`shared_settings`)."""
    return Trainer(list(cfgs), resume=resume, overwrite=overwrite, allow_changes=allow_changes, faults=faults).fit()
