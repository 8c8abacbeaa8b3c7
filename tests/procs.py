"""Child processes of the tests: each in its own session, its whole process group killed when
the test is done with it — on success, failure or timeout — so no test leaves a process
behind (a sweep's workers, torchrun's ranks included).

No test fails because a machine is slow: the only limit is ``NKD_TEST_PROCESS_LIMIT`` (seconds,
default 4 hours), a guard against a hang, not a speed requirement; waiting loops poll for the
event they wait for.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LIMIT = float(os.environ.get("NKD_TEST_PROCESS_LIMIT", str(4 * 3600)))
SRC = Path(__file__).resolve().parents[1] / "src"


def nkd_env(**extra: str) -> dict:
    """The environment for a child ``python -m nkd``: this checkout's sources first."""
    e = dict(os.environ, **extra)
    e["PYTHONPATH"] = str(SRC) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (its session: every process it started that did not
    leave it) and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@contextlib.contextmanager
def spawn(cmd: list[str], *, capture_output: bool = False, **kw) -> Iterator[subprocess.Popen]:
    """``Popen(cmd)`` in a new session; its process group is killed when the block ends."""
    if capture_output:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        yield proc
    finally:
        kill_group(proc)


_started: list[subprocess.Popen] = []


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """``Popen(cmd)`` in a new session, its process group killed at the end of the test at the
    latest (``tests/conftest.py``)."""
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    _started.append(proc)
    return proc


def kill_started() -> None:
    """Kill the process group of every process :func:`start` started (the end of a test)."""
    while _started:
        kill_group(_started.pop())


def run(cmd: list[str], *, timeout: float | None = None, input: str | None = None, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` with the process group killed on any exit (a timeout included)."""
    kw.setdefault("text", True)
    with spawn(cmd, stdin=subprocess.PIPE if input is not None else None, **kw) as proc:
        out, err = proc.communicate(input, timeout=timeout or LIMIT)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def nkd(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """``python -m nkd ARGS`` (output captured) in its own process group."""
    return run([sys.executable, "-m", "nkd", *args], env=env or nkd_env(), capture_output=True, **kw)


def wait_until(done: Callable[[], object], what: str, every: float = 0.1) -> object:
    """Poll ``done()`` until it is truthy (no deadline but :data:`LIMIT`)."""
    end = time.monotonic() + LIMIT
    while True:
        value = done()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what} after {LIMIT:.0f} s")
        time.sleep(every)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
