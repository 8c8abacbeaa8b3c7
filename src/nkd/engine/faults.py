"""Fault injection for the fault-tolerance tests (and for checking a deployment's restarts).

Read from the environment, off unless set; they never change a normal run:

* ``NKD_FAULT_NAN_STEPS=3,7`` — the first loss term is multiplied by NaN at these batches (0-based,
  counted over the run, skipped ones included);
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

import os
import signal
import time
from pathlib import Path


def nan_steps() -> set[int]:
    raw = os.environ.get("NKD_FAULT_NAN_STEPS", "")
    return {int(s) for s in raw.split(",") if s.strip()}


def slow_save() -> None:
    delay = float(os.environ.get("NKD_FAULT_SLOW_SAVE", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def maybe_kill(rank: int, epoch: int) -> None:
    want_rank = os.environ.get("NKD_FAULT_KILL_RANK")
    want_epoch = os.environ.get("NKD_FAULT_KILL_EPOCH")
    once = os.environ.get("NKD_FAULT_ONCE_FILE")
    if want_rank is None or want_epoch is None or not once:
        return
    if int(want_rank) == rank and int(want_epoch) == epoch + 1:
        _kill_self(f"killed rank {rank} at epoch {epoch + 1}", once, signal.SIGKILL)


def maybe_kill_at_step(rank: int, global_step: int) -> None:
    want = os.environ.get("NKD_FAULT_KILL_STEP")
    if want is None or int(want) != global_step or int(os.environ.get("NKD_FAULT_KILL_RANK", "0")) != rank:
        return
    sig = getattr(signal, "SIG" + os.environ.get("NKD_FAULT_KILL_SIGNAL", "KILL"))
    _kill_self(f"killed rank {rank} before global step {global_step}", os.environ.get("NKD_FAULT_ONCE_FILE"), sig)


def _kill_self(note: str, once: str | None, sig: int) -> None:
    """Send ``sig`` to this process; with ``once``, only if that file does not exist yet (it is
    written first, holding ``note``)."""
    if once:
        if Path(once).exists():
            return
        Path(once).write_text(note + "\n")
    os.kill(os.getpid(), sig)
