"""Fault injection for the fault-tolerance tests (and for checking a deployment's restarts).

A :class:`Faults` object says what to break; it is handed to the trainer explicitly
(``Trainer(cfg, faults=Faults(nan_steps={3}))``), which calls :meth:`Faults.install` once after it
is built and hands :meth:`Faults.before_rename` to its checkpoint writes. Without one (the
default) nothing is installed and the training loop carries no fault code at all; nothing on
the training path reads the environment.

The command line builds one from ``NKD_FAULT_*`` variables, once, when it starts
(:meth:`Faults.from_env`; tests of real processes use them):

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

import dataclasses
import functools
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _kill_self(note: str, once: str | None, sig: int) -> None:
    """Send ``sig`` to this process; with ``once``, only if that file does not exist yet (it is
    written first, holding ``note``)."""
    if once:
        if Path(once).exists():
            return
        Path(once).write_text(note + "\n")
    os.kill(os.getpid(), sig)


@dataclasses.dataclass
class Faults:
    """What to break (module docstring); every field's default breaks nothing."""

    nan_steps: frozenset[int] = frozenset()
    slow_save: float = 0.0
    kill_rank: int = 0
    kill_epoch: int | None = None
    kill_step: int | None = None
    kill_signal: str = "KILL"
    once_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Faults | None:
        """The faults the ``NKD_FAULT_*`` variables of ``env`` (default ``os.environ``) ask for; ``None`` if none."""
        env = os.environ if env is None else env
        if not any(k.startswith("NKD_FAULT_") and v for k, v in env.items()):
            return None
        get = env.get
        return cls(
            nan_steps=frozenset(int(s) for s in get("NKD_FAULT_NAN_STEPS", "").split(",") if s.strip()),
            slow_save=float(get("NKD_FAULT_SLOW_SAVE", "0") or 0),
            kill_rank=int(get("NKD_FAULT_KILL_RANK", "0") or 0),
            kill_epoch=int(get("NKD_FAULT_KILL_EPOCH")) if get("NKD_FAULT_KILL_EPOCH") else None,
            kill_step=int(get("NKD_FAULT_KILL_STEP")) if get("NKD_FAULT_KILL_STEP") else None,
            kill_signal=get("NKD_FAULT_KILL_SIGNAL", "KILL") or "KILL",
            once_file=get("NKD_FAULT_ONCE_FILE") or None,
        )

    def before_rename(self) -> None:
        """Called by a checkpoint write between its temporary file and the rename."""
        if self.slow_save > 0:
            time.sleep(self.slow_save)

    def install(self, trainer: Any) -> None:
        """Wrap ``trainer`` and its students (once, after the trainer is built)."""
        rank = trainer.dist.rank
        for student in trainer.students:
            student.before_rename = self.before_rename
            if self.nan_steps:
                student.method.losses = _poison(student, student.method.losses, set(self.nan_steps))
        if self.kill_epoch is not None and self.once_file and self.kill_rank == rank:
            epoch, once, inner = self.kill_epoch, self.once_file, trainer.train_epoch

            @functools.wraps(inner)
            def train_epoch(e: int, *a, **k):
                if e + 1 == epoch:
                    _kill_self(f"killed rank {rank} at epoch {e + 1}", once, signal.SIGKILL)
                return inner(e, *a, **k)

            trainer.train_epoch = train_epoch
        if self.kill_step is not None and self.kill_rank == rank:
            at, once = self.kill_step, self.once_file
            sig = getattr(signal, "SIG" + self.kill_signal)
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
