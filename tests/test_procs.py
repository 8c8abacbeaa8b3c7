"""The tests' process helpers (issue 17, item 6): a child that outlives its time, or a test that
fails, never leaves a process behind — the whole process group goes."""

from __future__ import annotations

import subprocess
import sys

import pytest

import procs

# a child that starts a grandchild (same process group) and both sleep; prints the grandchild's pid
TREE = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)']); "
        "print(c.pid, flush=True); time.sleep(3600)")


def test_run_kills_the_whole_group_on_timeout(tmp_path):
    out = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        with open(out, "w") as f:
            procs.run([sys.executable, "-c", TREE], stdout=f, timeout=3)  # the child sleeps an hour: always times out
    pid = int(procs.wait_until(lambda: out.read_text().strip(), "the grandchild's pid"))
    procs.wait_until(lambda: not procs.alive(pid), "the grandchild to be killed")


def test_a_started_process_tree_is_killed_when_the_test_ends():
    proc = procs.start([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    pid = int(proc.stdout.readline())
    assert procs.alive(pid)
    procs.kill_started()  # what conftest's autouse fixture does at the end of every test
    procs.wait_until(lambda: not procs.alive(pid), "the grandchild to be killed")
    assert proc.poll() is not None
