"""Fault injection for the fault-tolerance tests (and for checking a deployment's restarts).

Read from the environment when a trainer is built; when none is set, nothing is installed and
the training loop carries no fault code at all. When set, :func:`install` wraps the trainer's
and students' methods once:

* ``NKD_FAULT_NAN_STEPS=3,7`` — the first loss term is multiplied by NaN at these batches (0-based,
  counted over the run, skipped ones included), for every student;
* ``NKD_FAULT_SLOW_SAVE=2.0`` — sleep this many seconds between writing a checkpoint's
  temporary file and renaming it (a window to kill the process mid-write);
* ``NKD_FAULT_KILL_RANK=1`` + ``NKD_FAULT_KILL_EPOCH=2`` + ``NKD_FAULT_ONCE_FILE=PATH`` — that rank
  kills itself with SIGKILL at the start of that (1-based) epoch, once: only while ``PATH`` does
  not exist (it is created first), so a restarted job runs through;
* ``NKD_FAULT_KILL_STEP=9`` — rank ``NKD_FAULT_KILL_RANK`` (default 0) sends itself SIGKILL (or the
  signal named by ``NKD_FAULT_KILL_SIGNAL``, e.g. ``TERM``) just before global step 9 (0-based) runs;
  once per ``NKD_FAULT_ONCE_FILE`` if that is set.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from pathlib import Path
from typing import Any

ENV = ("NKD_FAULT_NAN_STEPS", "NKD_FAULT_KILL_EPOCH", "NKD_FAULT_KILL_STEP")


def slow_save() -> None:
    delay = float(os.environ.get("NKD_FAULT_SLOW_SAVE", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _kill_self(note: str, once: str | None, sig: int) -> None:
    """Send ``sig`` to this process; with ``once``, only if that file does not exist yet (it is
    written first, holding ``note``)."""
    if once:
        if Path(once).exists():
            return
        Path(once).write_text(note + "\n")
    os.kill(os.getpid(), sig)


def install(trainer: Any) -> None:
    """Wrap ``trainer`` and its students per the ``NKD_FAULT_*`` variables (no-op when unset)."""
    env = os.environ
    if not any(env.get(k) for k in ENV):
        return
    rank = trainer.dist.rank
    want_rank = int(env.get("NKD_FAULT_KILL_RANK", "0"))
    once = env.get("NKD_FAULT_ONCE_FILE")
    if env.get("NKD_FAULT_NAN_STEPS"):
        steps = {int(s) for s in env["NKD_FAULT_NAN_STEPS"].split(",") if s.strip()}
        for student in trainer.students:
            student.method.losses = _poison(student, student.method.losses, steps)
    if env.get("NKD_FAULT_KILL_EPOCH") and once and want_rank == rank:
        epoch = int(env["NKD_FAULT_KILL_EPOCH"])
        inner = trainer.train_epoch

        @functools.wraps(inner)
        def train_epoch(e: int, *a, **k):
            if e + 1 == epoch:
                _kill_self(f"killed rank {rank} at epoch {e + 1}", once, signal.SIGKILL)
            return inner(e, *a, **k)

        trainer.train_epoch = train_epoch
    if env.get("NKD_FAULT_KILL_STEP") and want_rank == rank:
        at = int(env["NKD_FAULT_KILL_STEP"])
        sig = getattr(signal, "SIG" + env.get("NKD_FAULT_KILL_SIGNAL", "KILL"))
        student = trainer.students[0]
        inner_step = student.train_step

        @functools.wraps(inner_step)
        def train_step(*a, **k):
            if student.state.global_step == at:
                _kill_self(f"killed rank {rank} before global step {at}", once, sig)
            return inner_step(*a, **k)

        student.train_step = train_step


def _poison(student: Any, losses_fn, steps: set[int]):
    @functools.wraps(losses_fn)
    def losses(*a, **k):
        out = losses_fn(*a, **k)
        if student.state.global_step + student.state.skipped_steps in steps:
            first = next(k for k in out if k.startswith("loss_"))
            out[first] = out[first] * float("nan")
        return out

    return losses
