"""A sweep owns its workers (issue 17, items 1 and 2): real processes, real signals, real kills.

A killed or SIGTERMed ``nkd sweep`` takes its workers with it (each finishes its step, saves
``last.pt``, logs why it stopped and releases its lock), and ``--resume`` takes over; a killed
worker stops only its own run, the sweep names it and reports the finished ones.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_config
from procs import alive, nkd, nkd_env, spawn, wait_until

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, epochs: int) -> str:
    return write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "sw"),
                        data={"synthetic_samples": 32, "batch_size": 16, "eval_batch_size": 64},
                        schedule={"name": "constant", "epochs": epochs}, train={"log_every": 1})


def _training(run: Path) -> int | None:
    """The pid of the worker training ``run`` once it is past its first epoch (else None)."""
    log, lock = run / "train.log", run / ".nkd.lock"
    try:
        if "epoch 1 |" in log.read_text():
            return json.loads(lock.read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None
    return None


def _sweep(cfg: str, *args: str, **env: str):
    return spawn([sys.executable, "-m", "nkd", "sweep", cfg, "--workers", "2", *args],
                 env=nkd_env(OMP_NUM_THREADS="1", **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stopped_cleanly(run: Path) -> None:
    assert not (run / ".nkd.lock").exists()
    assert (run / "checkpoints" / "last.pt").is_file()
    assert "stopped on SIGTERM" in (run / "train.log").read_text()


def test_kill_9_of_a_sweep_stops_its_workers_and_resume_takes_over(tmp_path):
    cfg = _config(tmp_path, epochs=400)
    runs = [tmp_path / "sw" / f"seed{s}" for s in (0, 1)]
    with _sweep(cfg, "--seeds", "0,1") as sweep:
        pids = [wait_until(lambda r=r: _training(r), f"{r} to train") for r in runs]
        sweep.kill()
        sweep.wait()
        for pid, run in zip(pids, runs):  # no deadline: a worker stops by itself (or, orphaned, trains to the end)
            wait_until(lambda pid=pid, run=run: not alive(pid) or (run / "summary.json").exists(),
                       f"worker {pid} to stop after the sweep was killed")
    for run in runs:
        _stopped_cleanly(run)


def test_sigterm_of_a_sweep_stops_its_workers_starts_nothing_queued_and_resume_finishes(tmp_path):
    cfg = _config(tmp_path, epochs=60)
    runs = [tmp_path / "sw" / f"seed{s}" for s in (0, 1, 2)]
    # each save sleeps 1 s: a run lasts over a minute, so both still train however slowly the other starts
    with _sweep(cfg, "--seeds", "0,1,2", NKD_FAULT_SLOW_SAVE="1") as sweep:
        [wait_until(lambda r=r: _training(r), f"{r} to train") for r in runs[:2]]
        sweep.send_signal(signal.SIGTERM)
        out, err = sweep.communicate()
    assert sweep.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "stopped on SIGTERM" in err and "--resume" in err
    assert f"1 not started: {runs[2]}" in err
    for run in runs[:2]:
        assert str(run) in err
        _stopped_cleanly(run)
    assert not (runs[2] / "checkpoints").exists()  # the queued run did not start
    res = nkd("sweep", cfg, "--seeds", "0,1,2", "--workers", "2", "--resume", env=nkd_env(OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert all((r / "summary.json").is_file() for r in runs)
    assert (tmp_path / "sw" / "report.md").is_file()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_worker_stops_only_its_run_and_the_sweep_reports_the_rest(tmp_path, sig):
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "sw"),
                       data={"synthetic_samples": 32, "batch_size": 16, "eval_batch_size": 64},
                       schedule={"name": "constant", "epochs": 400}, train={"log_every": 1})
    long_run = tmp_path / "sw" / "seed0"  # killed while it trains; the other config's run finishes
    cfg1 = write_config(tmp_path / "d.yaml", output_dir=str(tmp_path / "sw1"),
                        data={"synthetic_samples": 32, "batch_size": 16, "eval_batch_size": 64},
                        schedule={"name": "constant", "epochs": 3}, train={"log_every": 1})
    short_run = tmp_path / "sw1" / "seed0"
    with spawn([sys.executable, "-m", "nkd", "sweep", cfg, cfg1, "--seeds", "0", "--workers", "2",
                "--report-dir", str(tmp_path / "rep")], env=nkd_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
               stderr=subprocess.PIPE, text=True) as sweep:
        pid = wait_until(lambda: _training(long_run), "seed 0 to train")
        os.kill(pid, sig)
        out, err = sweep.communicate()
    assert sweep.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "BrokenProcessPool" not in err
    assert str(long_run) in err and "--resume" in err
    assert ("killed by SIGKILL" if sig == signal.SIGKILL else "stopped on SIGTERM") in err
    assert (short_run / "summary.json").is_file()
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "1 of 2 runs finished" in report
