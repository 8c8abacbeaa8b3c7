"""Faults and bad input in long runs: nothing lost, nothing silent (issue 6).

Real processes, real files, real signals. Fault injection uses the documented NKD_FAULT_*
environment variables (nkd.engine.faults) in child processes only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import procs
from helpers import write_config
from nkd.cli import main as cli_main
from nkd.config import load_config
from nkd.engine import Trainer
from nkd.engine.checkpoint import load_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"
KD = dict(method={"name": "nkd", "params": {}}, teacher={"name": "resnet8", "num_classes": 10})


def env(**extra) -> dict:
    e = dict(os.environ, **extra)  # same thread count as the in-process reference: bitwise equality
    e["PYTHONPATH"] = str(SRC) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def nkd(*args, extra_env=None, **kw) -> subprocess.CompletedProcess:
    return procs.run([sys.executable, "-m", "nkd", *args], env=env(**(extra_env or {})), capture_output=True, **kw)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights(run: Path, name: str = "last.pt") -> dict:
    return load_checkpoint(run / "checkpoints" / name)["trainable"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def config(tmp_path: Path, name: str, epochs: int = 4, **extra) -> str:
    sections = {**KD, "schedule": {"name": "multistep", "epochs": epochs, "milestones": [min(2, epochs)]},
                "data": {"synthetic_samples": 192}, **extra}
    return write_config(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), **sections)


@pytest.fixture
def reference(tmp_path):
    Trainer(load_config(config(tmp_path, "ref"))).fit()
    return weights(tmp_path / "ref")


# ----------------------------------------------------------------------------- 1. interruption
@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write(tmp_path, reference):
    cfg = config(tmp_path, "run")
    ck = tmp_path / "run" / "checkpoints"
    proc = procs.start([sys.executable, "-m", "nkd", "train", cfg], env=env(NKD_FAULT_SLOW_SAVE="3"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.wait_until(lambda: ((ck / "last.pt").is_file() and list(ck.glob("last.pt.tmp-*"))) or proc.poll() is not None,
                     "the 2nd checkpoint write to be in flight", every=0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(ck.glob("last.pt.tmp-*")), "the kill did not land during a write"
    assert load_checkpoint(ck / "last.pt")["epoch"] == 0  # the complete epoch-1 checkpoint, not the partial one
    assert cli_main(["train", cfg, "--resume"]) == 0
    assert same(weights(tmp_path / "run"), reference)


@pytest.mark.slow
@pytest.mark.parametrize("trial", [0, 1])
def test_kill_9_at_random_points_then_resume(tmp_path, reference, trial):
    cfg = config(tmp_path, "run")
    delay = random.Random(trial).uniform(2.0, 6.0)  # import + setup take ~2 s: lands mid-run
    proc = procs.start([sys.executable, "-m", "nkd", "train", cfg], env=env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cli_main(["train", cfg, "--resume"]) == 0
    assert same(weights(tmp_path / "run"), reference)


@pytest.mark.slow
def test_kill_9_inside_an_epoch_resumes_from_a_mid_epoch_checkpoint(tmp_path):
    """train.checkpoint_every_steps=4 with 12 steps per epoch: killed before global step 19 (epoch 2,
    its 8th step), the run resumes after step 4 of epoch 2 and ends bitwise where an uninterrupted
    run ends, with the same per-epoch losses in metrics.jsonl."""
    sections = dict(data={"synthetic_samples": 192, "batch_size": 16}, train={"checkpoint_every_steps": 4})
    Trainer(load_config(config(tmp_path, "ref", epochs=3, **sections))).fit()
    cfg = config(tmp_path, "run", epochs=3, **sections)
    res = nkd("train", cfg, extra_env={"NKD_FAULT_KILL_STEP": "19"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["partial"]["epoch"] == 1 and ck["partial"]["step"] == 4 and ck["global_step"] == 16 and ck["epoch"] == 0
    res = nkd("train", cfg, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "inside epoch 2 (after step 4 of its 12), of 3 epochs; global step 16" in res.stdout
    assert same(weights(tmp_path / "run"), weights(tmp_path / "ref"))
    rows = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("run", "ref")]
    assert [r["epoch"] for r in rows[0]] == [1, 2, 3]
    for a, b in zip(*rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["top1"] == b["top1"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["partial"] is None


@pytest.mark.slow
@pytest.mark.parametrize("step,where", [(17, "inside epoch 2 (after step 6 of its 12), global step 18"),
                                        (23, "at the end of epoch 2, global step 24")])
def test_sigterm_saves_at_the_next_step_and_resume_matches(tmp_path, step, where):
    """A scheduler's pre-emption signal (SIGTERM here; SIGUSR1 alike) arrives before global step
    ``step``: the run finishes that step, saves last.pt there, exits 143 naming the position, and
    --resume ends bitwise where an uninterrupted run ends."""
    sections = dict(train={"log_every": 1})
    Trainer(load_config(config(tmp_path, "ref", epochs=3, **sections))).fit()
    cfg = config(tmp_path, "run", epochs=3, **sections)
    res = nkd("train", cfg, extra_env={"NKD_FAULT_KILL_STEP": str(step), "NKD_FAULT_KILL_SIGNAL": "TERM"})
    assert res.returncode == 143, res.stderr[-2000:]
    assert f"stopped on SIGTERM {where}; saved" in res.stderr and "--resume" in res.stderr
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["global_step"] == step + 1
    res = nkd("train", cfg, "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert same(weights(tmp_path / "run"), weights(tmp_path / "ref"))
    assert epochs_logged(tmp_path / "run") == [1, 2, 3]


# ----------------------------------------------------------------------------- 2. corrupt / foreign checkpoints
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_torn_last_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, damage):
    # (one test for both torn forms: half a file after a disk fault, 0 bytes after a crash at open)
    cfg = config(tmp_path, "run")
    Trainer(load_config(cfg, ["schedule.epochs=4", "train.max_steps_per_epoch=1000"])).fit()
    ck = tmp_path / "run" / "checkpoints"
    assert load_checkpoint(ck / "prev.pt")["epoch"] == 2
    data = (ck / "last.pt").read_bytes()
    (ck / "last.pt").write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    (ck / f"last.pt.tmp-{2**22 + 7}").write_bytes(b"half a file")  # a dead writer's leftover
    # resumes after epoch 3 from prev.pt, redoes epoch 4
    assert cli_main(["train", cfg, "--resume", "schedule.epochs=4", "train.max_steps_per_epoch=1000"]) == 0
    assert same(weights(tmp_path / "run"), reference)
    assert epochs_logged(tmp_path / "run") == [1, 2, 3, 4]  # epoch 4 redone, listed once
    log = (tmp_path / "run" / "train.log").read_text()
    assert "resumed from" in log and "prev.pt" in log and "incomplete checkpoint write" in log
    assert not list(ck.glob("*.tmp-*"))
    if damage == "empty":
        assert "the file is empty (0 bytes; a torn write)" in log


def test_tensorboard_hides_the_epochs_a_resume_redoes(tmp_path):
    """After a fallback to prev.pt (epoch 3 of 4 redone), TensorBoard shows each epoch once, with the
    redone epoch's new value; --overwrite starts a clean event log."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = config(tmp_path, "run", train={"tensorboard": True})
    assert cli_main(["train", cfg]) == 0
    ck = tmp_path / "run" / "checkpoints"
    data = (ck / "last.pt").read_bytes()
    (ck / "last.pt").write_bytes(data[: len(data) // 2])
    assert cli_main(["train", cfg, "--resume", "optim.lr=0.2"]) == 2  # a changed run is refused ...
    assert cli_main(["train", cfg, "--resume", "--allow-changes", "optim.lr=0.2"]) == 0  # epochs 3-4 redone

    def scalars() -> list[tuple[int, float]]:
        acc = ea.EventAccumulator(str(tmp_path / "run" / "tb"))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars("train/loss")]

    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = scalars()
    assert [st for st, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([r["loss"] for r in metrics], rel=1e-6)
    assert cli_main(["train", cfg, "--overwrite", "schedule.epochs=2"]) == 0
    assert [st for st, _ in scalars()] == [1, 2]


def epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_second_fresh_start_never_replaces_a_runs_checkpoints(tmp_path, capsys):
    """A repeated command (or a restarted job launched without --resume) is refused instead of
    overwriting the run's checkpoints; --overwrite starts again on purpose, with a clean metrics.jsonl."""
    cfg = config(tmp_path, "run", epochs=2)
    assert cli_main(["train", cfg]) == 0
    ck = tmp_path / "run" / "checkpoints"
    before = {p.name: sha(p) for p in ck.glob("*.pt")}
    capsys.readouterr()
    assert cli_main(["train", cfg, "schedule.epochs=3"]) == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "--resume" in err and "--overwrite" in err
    assert {p.name: sha(p) for p in ck.glob("*.pt")} == before
    assert cli_main(["train", cfg, "--resume", "--overwrite"]) == 2
    assert "not allowed with argument --resume" in capsys.readouterr().err
    assert cli_main(["train", cfg, "--overwrite", "schedule.epochs=1", "schedule.milestones=[1]"]) == 0
    assert epochs_logged(tmp_path / "run") == [1]
    assert load_checkpoint(ck / "last.pt")["epoch"] == 0 and not (ck / "prev.pt").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 1
    assert cli_main(["train", cfg, "--resume", "schedule.epochs=1", "schedule.milestones=[1]"]) == 0  # finished
    assert epochs_logged(tmp_path / "run") == [1] and load_checkpoint(ck / "last.pt")["epoch"] == 0


def test_unreadable_checkpoints_are_clear_errors(tmp_path, capsys):
    cfg = config(tmp_path, "run", epochs=1)
    assert cli_main(["train", cfg]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    assert cli_main(["train", cfg, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "unreadable" in err
    # a file with arbitrary pickled objects is refused by weights_only loading
    torch.save({"trainable": {}, "opt": argparse.Namespace(lr=1)}, last)
    assert cli_main(["train", cfg, "--resume"]) == 2
    assert "weights_only" in capsys.readouterr().err


@pytest.mark.parametrize("change,match", [
    (["model.name=resnet14"], "model_name='resnet8'"),
    (["method.name=uskd", "teacher=null"], "method='nkd'"),
])
def test_foreign_checkpoint_is_refused_and_left_untouched(tmp_path, capsys, change, match):
    cfg = config(tmp_path, "run", epochs=1)
    assert cli_main(["train", cfg]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = sha(last)
    assert cli_main(["train", cfg, "--resume", *change]) == 2
    assert match in capsys.readouterr().err
    assert sha(last) == before


def test_wrong_teacher_checkpoint_lists_keys_and_shapes(tmp_path, capsys):
    cfg = config(tmp_path, "t", epochs=1, method={"name": "ce"}, teacher=None)
    assert cli_main(["train", cfg]) == 0
    teacher = tmp_path / "t" / "checkpoints" / "last.pt"
    kd = config(tmp_path, "kd", epochs=1, teacher={"name": "wrn_16_1", "num_classes": 10, "checkpoint": str(teacher)})
    assert cli_main(["train", kd]) == 2
    err = capsys.readouterr().err
    assert "missing keys" in err and "unexpected keys" in err
    kd = config(tmp_path, "kd2", epochs=1, teacher={"name": "resnet8", "num_classes": 100, "checkpoint": str(teacher)},
                model={"name": "resnet8", "num_classes": 100})
    assert cli_main(["train", kd]) == 2  # a 100-class teacher/student on a 10-class dataset
    assert "synthetic_classes" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 3. numerical faults
def test_nan_loss_stops_the_run_and_never_overwrites_a_good_checkpoint(tmp_path):
    cfg = config(tmp_path, "run")
    # 192 samples / batch 16 = 12 steps per epoch: step 15 lies in epoch 2
    res = nkd("train", cfg, extra_env={"NKD_FAULT_NAN_STEPS": "15"})
    assert res.returncode == 1, res.stderr
    assert "global step 15" in res.stderr and "loss_ce" in res.stderr
    assert "last good checkpoint" in res.stderr and "last.pt" in res.stderr
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ck["epoch"] == 0  # epoch 1's checkpoint, never replaced by the poisoned epoch 2
    assert all(v.isfinite().all() for v in ck["trainable"].values() if v.is_floating_point())


def test_nan_policy_skip_skips_the_step_and_finishes(tmp_path):
    cfg = config(tmp_path, "run", epochs=2)
    res = nkd("train", cfg, "train.nan_policy=skip", extra_env={"NKD_FAULT_NAN_STEPS": "3,15"})
    assert res.returncode == 0, res.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 2
    assert rows[-1]["global_step"] == 2 * 12 - 2
    assert "skipping step" in (tmp_path / "run" / "train.log").read_text()


# ----------------------------------------------------------------------------- 4. bad configs and CLI input
def test_every_config_problem_is_listed_before_training(tmp_path, capsys):
    cfg = config(tmp_path, "run")
    rc = cli_main(["train", cfg, "optim.lr=-0.1", "optim.momentom=0.9", "method.params.temperature=0",
                   "data.batch_size=sixteen", "teacher.num_classes=100", "teacher.checkpoint=/no/such/teacher.pth",
                   "model.num_classes=7", "train.checkpoint_every_steps=-5"])
    err = capsys.readouterr().err
    assert rc == 2
    for needle in ("optim.lr: must be > 0", "optim.momentom: unknown key (did you mean 'momentum'?)",
                   "method.params.temperature: must be a finite number > 0", "data.batch_size: expected int",
                   "teacher.num_classes: 100 differs from model.num_classes 7",
                   "teacher.checkpoint: file not found: /no/such/teacher.pth",
                   "model.num_classes: 7 does not match the dataset's 10 classes",
                   "train.checkpoint_every_steps: must be >= 0"):
        assert needle in err, needle
    assert not (tmp_path / "run").exists()  # nothing started


def test_missing_dataset_and_config_paths(tmp_path, capsys):
    cfg = config(tmp_path, "run", data={"name": "cifar10", "root": str(tmp_path / "nope")}, model={"name": "resnet8",
                                                                                                    "num_classes": 10})
    assert cli_main(["train", cfg]) == 2
    assert "data.root: path not found" in capsys.readouterr().err
    assert cli_main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert cli_main(["train", cfg, "novalue"]) == 2
    assert "expected key=value" in capsys.readouterr().err
    assert cli_main(["bogus"]) == 2


# ----------------------------------------------------------------------------- 5. resource faults
def test_unwritable_output_dir_is_reported_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = config(tmp_path, "run", epochs=1)
    assert cli_main(["train", cfg, f"output_dir={blocker / 'run'}"]) == 2
    assert "not writable" in capsys.readouterr().err


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    cfg = config(tmp_path, "run", epochs=2)
    assert nkd("train", cfg, "schedule.epochs=1", "schedule.milestones=[1]").returncode == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = sha(last)
    # extend the run to 2 epochs, with a "full disk" for big files
    res = nkd("train", cfg, "--resume", "--allow-changes", preexec_fn=_limit_file_size(64_000))
    assert res.returncode == 1, res.stderr
    assert "cannot write checkpoint" in res.stderr and "untouched" in res.stderr
    assert sha(last) == before
    assert not list(last.parent.glob("*.tmp-*"))
    assert nkd("train", cfg, "--resume", "--allow-changes").returncode == 0  # space back: the run completes
    assert load_checkpoint(last)["epoch"] == 1


def torchrun(cfg: str, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, "-m", "nkd", "train",
           cfg, "--resume"]
    return procs.run(cmd, env=env(OMP_NUM_THREADS="1", **(extra_env or {})), capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("store,where", [("shared", "epoch start"), ("fresh", "epoch start"), ("shared", "mid-epoch"),
                                         ("shared", "sigterm")])
def test_ddp_worker_killed_then_torchrun_restart_resumes(tmp_path, store, where):
    """Rank 1 is SIGKILLed; torchrun --max-restarts=1 restarts both workers, they resume from last.pt and
    finish with the weights and per-epoch losses of an uninterrupted 2-process run.
    ``shared``: torchrun lends its rendezvous store to the workers (torch's default), which keeps keys
    across restarts; ``fresh``: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, a new store per restart.
    ``epoch start``: killed as epoch 3 begins, resumed after epoch 2; ``mid-epoch``: checkpoints every
    2 steps, killed before global step 8 (epoch 3's last step), resumed after step 2 of epoch 3;
    ``sigterm``: rank 1 gets SIGTERM before global step 7, both ranks agree to stop after that step,
    rank 0 saves there, both exit 143, and the restart resumes after step 2 of epoch 3."""
    extra = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if store == "fresh" else {}
    train = {"max_steps_per_epoch": 3, **{"mid-epoch": {"checkpoint_every_steps": 2}, "sigterm": {"log_every": 1}}.get(where, {})}
    sections = dict(data={"synthetic_samples": 64, "batch_size": 8}, train=train)
    ref = torchrun(config(tmp_path, "ref", **sections), extra_env=extra)
    assert ref.returncode == 0, ref.stderr[-3000:]
    once = tmp_path / "killed-once"
    kill = {"NKD_FAULT_KILL_RANK": "1", "NKD_FAULT_ONCE_FILE": str(once),
            **{"mid-epoch": {"NKD_FAULT_KILL_STEP": "8"}, "epoch start": {"NKD_FAULT_KILL_EPOCH": "3"},
               "sigterm": {"NKD_FAULT_KILL_STEP": "7", "NKD_FAULT_KILL_SIGNAL": "TERM"}}[where]}
    res = torchrun(config(tmp_path, "run", **sections), "--max-restarts=1", extra_env={**extra, **kill})
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    if where == "mid-epoch":
        assert once.read_text() == "killed rank 1 before global step 8\n"
        assert "inside epoch 3 (after step 2 of its 3), of 4 epochs; global step 8 (torchrun restart 1)" in log
    elif where == "sigterm":
        assert once.read_text() == "killed rank 1 before global step 7\n"
        assert "stopped on a stop signal on another rank inside epoch 3 (after step 2 of its 3), global step 8" in log
        assert "stopped on SIGTERM inside epoch 3 (after step 2 of its 3), global step 8" in log
        assert "inside epoch 3 (after step 2 of its 3), of 4 epochs; global step 8 (torchrun restart 1)" in log
    else:
        assert once.read_text() == "killed rank 1 at epoch 3\n"
        assert "after epoch 2, of 4 epochs; global step 6 (torchrun restart 1)" in log
    assert same(weights(tmp_path / "run"), weights(tmp_path / "ref"))
    assert epochs_logged(tmp_path / "run") == [1, 2, 3, 4]
    rows = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("run", "ref")]
    for a, b in zip(*rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_each_torchrun_attempt_gets_its_own_store_keys(monkeypatch):
    """Deterministic core of the restart fix: keys written in attempt 0 of a shared agent store (e.g. a
    dead rank's gloo address) are invisible to attempt 1."""
    import torch.distributed as dist

    from nkd.engine.distributed import restart_safe_store

    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    for k, v in {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port),
                 "TORCHELASTIC_RUN_ID": "job", "GROUP_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = restart_safe_store(2)
    first.set("default_pg/0//cpu//rank_0", "dead address")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = restart_safe_store(2)
    assert not second.check(["default_pg/0//cpu//rank_0"])
    assert first.check(["default_pg/0//cpu//rank_0"])
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # several nodes count restarts apart: say how to be safe
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    with pytest.warns(RuntimeWarning, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        restart_safe_store(2)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert restart_safe_store(2) is None  # torch's own env:// path when the store is not shared
