"""The run directory of one student: lock, logging, metrics, TensorBoard, config and summary.

Layout (``output_dir``), written by rank 0 only::

    .nkd.lock              who is using the directory (pid, host, start time); removed at exit
    config.yaml            the resolved config of the run (method parameters with defaults)
    metrics.jsonl          one JSON line per epoch (losses, lr, top-1/top-5, best so far, img/s)
    train.log              the log (epoch lines, a plain progress line every log_every steps)
    tb/                    TensorBoard: train/* and eval/* per epoch; tb/steps: train_step/* per log_every
    checkpoints/last.pt    full training state (atomic; prev.pt = the one before; best.pt)
    summary.json           best/last top-1 and top-5, data settings, method parameters, when training ends

**Lock.** A run directory is used by one run at a time: the lock file is created atomically
with its owner's pid, host and process start time. A second run in the same directory (two
commands started at once, or an ``--overwrite`` while the first trains) is refused naming the
owner. A lock left by a process that no longer runs on this host (``kill -9``, a torchrun
restart) is reported in the log and taken over; a lock held on another host cannot be checked
and is refused with the path to delete if that run is gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT_NAMES, used_run_dir_error

LOCK_NAME = ".nkd.lock"
_FORMAT = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")


class RunDirError(ValueError):
    """The run directory cannot be used (locked by another run, not writable, holds a run)."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (Linux), to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of stat: starttime


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    now = _proc_start(pid)
    return start is None or now is None or now == start


class RunDir:
    """One run directory (see the module docstring). ``is_main``: only rank 0 writes."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.is_main = is_main
        self.locked = False
        self.log = logging.getLogger(f"nkd.run.{id(self)}")
        self.log.propagate = False
        self.file_handler: logging.Handler | None = None
        self.tb = self.tb_steps = None
        self._notes: list[str] = []  # messages from before logging was set up
        self._made: Path | None = None  # the topmost folder this run created (None: output_dir existed)
        self._new_files: list[Path] = []  # files this run created in an existing output_dir

    # ------------------------------------------------------------------ claim
    def check_writable(self) -> None:
        probe = self.path / f".write-test-{os.getpid()}"
        for p in (self.path, *self.path.parents):
            if p.exists():
                break
            self._made = p
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"output_dir: {self.path} is not writable ({e.strerror or e})") from e

    def lock(self) -> None:
        """Take the directory's lock (see the module docstring) or raise :class:`RunDirError`."""
        if not self.is_main:
            return
        lock = self.path / LOCK_NAME
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        tmp = self.path / f"{LOCK_NAME}.tmp-{os.getpid()}"
        try:
            tmp.write_text(json.dumps(me))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise RunDirError(f"output_dir: cannot write the lock {lock} ({e.strerror or e})") from e
        try:
            for _ in range(3):
                try:
                    os.link(tmp, lock)  # atomic: fails if a lock exists, never leaves a half-written one
                    self.locked = True
                    return
                except FileExistsError:
                    self._handle_existing(lock)
            raise RunDirError(f"output_dir {self.path}: could not take the lock {lock}")
        finally:
            tmp.unlink(missing_ok=True)

    def _handle_existing(self, lock: Path) -> None:
        try:
            owner = json.loads(lock.read_text())
        except (OSError, ValueError):
            owner = {}
        pid, host = owner.get("pid"), owner.get("host")
        who = f"pid {pid} on host {host}, started {owner.get('since', '?')}"
        if host != socket.gethostname() or not isinstance(pid, int):
            raise RunDirError(f"output_dir {self.path} is locked by another nkd run ({who}); nkd cannot check a "
                              f"process on another host: if that run is gone, delete {lock}")
        if _alive(pid, owner.get("start")):
            raise RunDirError(f"output_dir {self.path} is in use by another nkd run ({who}: "
                              f"{owner.get('command', '')!r}); wait for it, stop it, or choose another output_dir")
        stale = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(lock, stale)  # only one of several racing takers succeeds
        except FileNotFoundError:
            return
        stale.unlink(missing_ok=True)
        self._notes.append(f"took over the stale lock of {who} (that process no longer runs)")

    def unlock(self) -> None:
        if not self.locked:
            return
        lock = self.path / LOCK_NAME
        try:
            if json.loads(lock.read_text()).get("pid") == os.getpid():
                lock.unlink()
        except (OSError, ValueError):
            pass
        self.locked = False

    def claim(self, resume: bool, overwrite: bool) -> None:
        """A fresh start (no ``resume``) in a directory holding checkpoints is refused unless
        ``overwrite``, which deletes them (and the old event log) first. Stale temporary
        checkpoint files of dead writers are removed (the lock is held: nobody else writes)."""
        if not self.is_main:
            return
        for tmp in sorted(self.ckpt_dir.glob("*.tmp-*")) if self.ckpt_dir.is_dir() else []:
            tmp.unlink(missing_ok=True)
            self._notes.append(f"removed {tmp}, an incomplete checkpoint write of a process that no longer runs")
        if resume:
            return
        problem = used_run_dir_error(self.path)
        if problem is not None and not overwrite:
            raise RunDirError(problem)
        if problem is not None:
            for name in CHECKPOINT_NAMES:
                (self.ckpt_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / "tb", ignore_errors=True)
            self._notes.append("--overwrite: deleted the previous checkpoints and event logs")

    # ------------------------------------------------------------------ logging
    def setup_logging(self, console: logging.Handler | None) -> logging.Logger:
        """The run's logger: ``train.log`` (append) and, if given, the console handler."""
        self.log.setLevel(logging.INFO)
        self.log.handlers.clear()
        if not self.is_main:
            self.log.addHandler(logging.NullHandler())
            return self.log
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "train.log").exists():
            self._new_files.append(self.path / "train.log")
        self.file_handler = _LogFile(self.path / "train.log")
        self.file_handler.setFormatter(_FORMAT)
        self.log.addHandler(self.file_handler)
        if console is not None:
            self.log.addHandler(console)
        for note in self._notes:
            self.log.info(note)
        self._notes.clear()
        return self.log

    # ------------------------------------------------------------------ files
    def start(self, config_text: str, history: list[dict[str, Any]]) -> None:
        """config.yaml; metrics.jsonl = the epochs of this run's state (the checkpoint's history on
        resume, so epochs redone after a fallback are listed once); no stale summary."""
        if not self.is_main:
            return
        for name, text in (("config.yaml", config_text), ("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))):
            path = self.path / name
            if not path.exists():
                self._new_files.append(path)
            try:
                path.write_text(text)
            except OSError as e:
                raise RunDirError(f"output_dir: cannot write {path} ({e.strerror or e})") from e
        (self.path / "summary.json").unlink(missing_ok=True)

    def open_tensorboard(self, enabled: bool, next_epoch: int, next_step: int) -> None:
        """Writers for epoch scalars (``tb/``) and step scalars (``tb/steps``); events of epochs and
        steps a resume is about to redo are hidden (``purge_step``)."""
        if not (self.is_main and enabled):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log.info("tensorboard not installed: event files disabled (pip install 'nkd[train]')")
            return
        self.tb = SummaryWriter(str(self.path / "tb"), purge_step=next_epoch)
        self.tb_steps = SummaryWriter(str(self.path / "tb" / "steps"), purge_step=next_step)

    def record_epoch(self, row: dict[str, Any]) -> None:
        """Append the epoch's row to metrics.jsonl and TensorBoard (``eval/*`` for evaluation
        numbers, ``train/*`` for the rest)."""
        if not self.is_main:
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "global_step"):
                    group = "eval" if k in EVAL_KEYS or k.startswith("ema_") else "train"
                    self.tb.add_scalar(f"{group}/{k}", v, row["epoch"])
            self.tb.flush()

    def record_step(self, step: int, values: dict[str, float]) -> None:
        if self.tb_steps is not None:
            for k, v in values.items():
                self.tb_steps.add_scalar(f"train_step/{k}", v, step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if self.is_main:
            (self.path / "summary.json").write_text(json.dumps(summary, indent=2))

    def close(self) -> None:
        for w in (self.tb, self.tb_steps):
            if w is not None:
                w.close()
        self.tb = self.tb_steps = None
        if self.file_handler is not None:
            self.log.removeHandler(self.file_handler)
            self.file_handler.close()
            self.file_handler = None
        self.unlock()


    def discard(self) -> None:
        """Setup failed before anything trained: remove what this run created (the folders it made,
        or the files it added to an existing ``output_dir``), so bad input leaves nothing behind.
        Call after :meth:`close`."""
        if not self.is_main:
            return
        if self._made is not None:  # the run's own folder; the parents it made only while empty (a
            shutil.rmtree(self.path, ignore_errors=True)  # parallel run may have put its folder there since)
            for parent in self.path.parents:
                if not str(parent).startswith(str(self._made)):
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break
        else:
            for path in self._new_files:
                path.unlink(missing_ok=True)
        self._made, self._new_files = None, []


def live_run_owning(path: str | os.PathLike) -> str | None:
    """Who is still training the run a checkpoint file belongs to (``RUN/checkpoints/x.pt`` with
    ``RUN/.nkd.lock`` held by a live process on this host, not this one), or None."""
    ck = Path(path).resolve()
    lock = ck.parent.parent / LOCK_NAME
    if ck.parent.name != "checkpoints" or not lock.is_file():
        return None
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return None
    if owner.get("host") != socket.gethostname():
        return f"pid {pid} on host {owner.get('host')} (cannot be checked from here)"
    if not _alive(pid, owner.get("start")):
        return None
    return f"pid {pid} on host {owner.get('host')}, started {owner.get('since', '?')}: {owner.get('command', '')!r}"


class _LogFile(logging.FileHandler):
    """``train.log``: a write that fails (a full disk) is said once on stderr, naming the file,
    instead of logging's "--- Logging error ---" traceback for every line."""

    _told = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not self._told:
            self._told = True
            err = sys.exc_info()[1]
            print(f"nkd: cannot write {self.baseFilename} ({getattr(err, 'strerror', None) or err}); "
                  "its log lines are lost", file=sys.stderr)


EVAL_KEYS = ("top1", "top5", "eval_loss", "eval_samples", "best_top1")
