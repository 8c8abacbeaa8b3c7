"""Misuse through the CLI: every mistake is a clear error (exit 2, one line per problem, nothing
written) — floats in any spelling, unknown models, bad method parameters, torn/foreign checkpoints
in every command, two runs in one directory, a resume that changes the run."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import procs
from helpers import write_config
from nkd.cli import main as cli_main
from nkd.config import load_config
from nkd.engine.checkpoint import load_checkpoint
from nkd.engine.rundir import LOCK_NAME


def quick(tmp_path: Path, name: str = "c", **sections) -> str:
    base = {"schedule": {"name": "constant", "epochs": 1}, "train": {"max_steps_per_epoch": 2}}
    return write_config(tmp_path / f"{name}.yaml", **{**base, **sections})


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + e.get("PYTHONPATH", "")
    return e


def errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line.strip() for line in err.splitlines() if line.strip().startswith("- ")]


# ----------------------------------------------------------------------------- 1. floats
def test_every_python_float_spelling_is_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 5e-2\n  weight_decay: 1.0e-4\n  momentum: .5\nschedule:\n  min_lr: 1E-5\n"
                    "  epochs: 2\n  milestones: [1]\nmodel: {name: resnet8, num_classes: 10}\n"
                    "data: {name: synthetic}\n")
    cfg = load_config(path, ["optim.lr=1e-3", "schedule.gamma=1_0e-2", "data.mixup=2E0"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.schedule.min_lr) == (1e-3, 1e-4, 0.5, 1e-5)
    assert (cfg.schedule.gamma, cfg.data.mixup) == (0.1, 2.0)
    assert load_config(path, ["optim.lr=1.0e8"]).optim.lr == 1e8
    assert isinstance(load_config(path, ["seed=3"]).seed, int)  # integers stay integers
    with pytest.raises(ValueError, match="optim.lr: must be finite"):
        load_config(path, ["optim.lr=inf"])


# ----------------------------------------------------------------------------- 2. models
def test_unknown_models_and_bad_kwargs_are_listed_with_the_rest_before_anything_is_created(tmp_path, capsys):
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"), teacher={"name": "wrn_99", "num_classes": 10},
                method={"name": "kd"})
    rc = cli_main(["train", cfg, "model.name=resnet9", "optim.lr=-1", "model.kwargs.foo=1"])
    lines = errors(capsys)
    assert rc == 2
    assert any(x.startswith("- model.kwargs: cannot build 'resnet9'") or x.startswith("- model.name: cannot build")
               for x in lines), lines
    assert any("resnet9" in x and "did you mean" in x for x in lines), lines
    assert any(x.startswith("- teacher.name: cannot build 'wrn_99'") for x in lines), lines
    assert any(x.startswith("- optim.lr: must be > 0") for x in lines), lines
    assert not (tmp_path / "run").exists()
    rc = cli_main(["train", cfg, "teacher.name=resnet8", "model.kwargs.foo=1"])
    lines = errors(capsys)
    assert rc == 2 and any(x.startswith("- model.kwargs: cannot build 'resnet8' with {'foo': 1}") for x in lines), lines
    pytest.importorskip("timm")
    rc = cli_main(["train", cfg, "teacher.name=resnet8", "model.name=timm/not_a_model"])
    lines = errors(capsys)
    assert rc == 2 and any(x.startswith("- model.name: cannot build 'timm/not_a_model'") for x in lines), lines
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 3. method parameters
@pytest.mark.parametrize("overrides,needle", [
    (["method.name=ls", "method.params.epsilon=1.0"], "method.params.epsilon: must lie in [0, 1), got 1.0"),
    (["method.name=tfkd", "method.params.correct_prob=1.5"], "method.params.correct_prob: must lie in (0, 1)"),
    (["method.name=tfkd", "method.params.alpha=2"], "method.params.alpha: must lie in [0, 1], got 2.0"),
    (["method.name=uskd", "method.params.rank=papr"], "method.params.rank: must be one of ('paper', 'official')"),
    (["method.name=nkd", "teacher={name: resnet8, num_classes: 10}", "method.params.gamma=-1"],
     "method.params.gamma: must be a finite number >= 0"),
    (["method.name=dkd", "teacher={name: resnet8, num_classes: 10}"], "method.params.warmup_epochs: the DKD ramp"),
])
def test_method_parameters_are_checked_at_config_time(tmp_path, capsys, overrides, needle):
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"))
    assert cli_main(["train", cfg, *overrides]) == 2
    lines = errors(capsys)
    assert any(needle in x for x in lines), lines
    assert not (tmp_path / "run").exists()


def test_the_runs_config_yaml_is_the_resolved_config(tmp_path):
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"), teacher={"name": "resnet8", "num_classes": 10},
                method={"name": "nkd", "params": {"gamma": 2}})
    assert cli_main(["train", cfg]) == 0
    import yaml

    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written["method"]["params"] == {"temperature": 1.0, "gamma": 2.0, "ce_weight": 1.0}


def test_schedule_contradictions_are_config_problems(tmp_path, capsys):
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"))
    assert cli_main(["train", cfg, "schedule.name=multistep", "schedule.epochs=15", "schedule.milestones=[150,180]",
                     "schedule.warmup_epochs=20"]) == 2
    lines = errors(capsys)
    assert any("schedule.milestones: [150, 180] lie beyond the last epoch" in x for x in lines), lines
    assert any("schedule.warmup_epochs: the warm-up (20.0 epochs) is longer than the run" in x for x in lines), lines
    assert cli_main(["train", cfg, "data.name=cifar1000"]) == 2
    lines = errors(capsys)
    assert len(lines) == 1 and lines[0].startswith("- data.name:"), lines  # no follow-on class-count error


def test_folder_class_count_is_checked_without_decoding(tmp_path, capsys):
    for split in ("train", "test"):
        for c in range(3):
            (tmp_path / "folder" / split / f"c{c}").mkdir(parents=True)
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"), data={"name": "image_folder_small",
                                                                   "root": str(tmp_path / "folder")})
    assert cli_main(["train", cfg]) == 2  # no image anywhere: only the directories were counted
    lines = errors(capsys)
    assert any("model.num_classes: 10 does not match the dataset's 3 classes" in x for x in lines), lines


# ----------------------------------------------------------------------------- 4/5/9. torn and foreign files
def _finished_run(tmp_path: Path) -> tuple[str, Path]:
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"), schedule={"name": "constant", "epochs": 2})
    assert cli_main(["train", cfg]) == 0
    return cfg, tmp_path / "run" / "checkpoints"


# a torn last.pt that falls back to prev.pt: tests/test_faults.py::test_a_torn_last_checkpoint_falls_back_to_the_previous_one


@pytest.mark.parametrize("damage", ["empty", "truncated", "pickle", "architecture"])
def test_eval_and_export_report_a_bad_checkpoint_like_train(tmp_path, capsys, damage):
    cfg, ck = _finished_run(tmp_path)
    best = ck / "best.pt"
    if damage == "empty":
        best.write_bytes(b"")
    elif damage == "truncated":
        best.write_bytes(best.read_bytes()[:2000])
    elif damage == "pickle":
        import argparse

        torch.save({"trainable": {}, "opt": argparse.Namespace(lr=1)}, best)
    else:
        torch.save(load_checkpoint(best) | {"trainable": {"student.fc.weight": torch.zeros(3, 3)}}, best)
    capsys.readouterr()
    assert cli_main(["eval", cfg, "--checkpoint", str(best)]) == 2
    e1 = capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "run")]) == 2
    e2 = capsys.readouterr().err
    for err in (e1, e2):
        assert "Traceback" not in err and err.startswith("nkd: error:") and "best.pt" in err, err
        if damage == "empty":
            assert "the file is empty" in err
    if damage == "architecture":
        assert "does not fit" in e1 or "missing keys" in e1


def test_export_writes_an_ordinary_file_mode(tmp_path, capsys):
    cfg, ck = _finished_run(tmp_path)
    assert cli_main(["export", str(tmp_path / "run")]) == 0
    mode = stat.S_IMODE((tmp_path / "run" / "student.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "run" / "metrics.jsonl").stat().st_mode)


# ----------------------------------------------------------------------------- 6. the run directory lock
def test_two_runs_in_one_directory_are_refused_and_the_first_is_untouched(tmp_path, capsys):
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"), schedule={"name": "constant", "epochs": 3},
                train={"max_steps_per_epoch": 2})
    first = procs.start([sys.executable, "-m", "nkd", "train", cfg], env={**env(), "NKD_FAULT_SLOW_SAVE": "3"},
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lock = tmp_path / "run" / LOCK_NAME
    procs.wait_until(lambda: lock.exists() or first.poll() is not None, "the first run to take its lock")
    assert lock.exists()
    assert cli_main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert f"pid {first.pid} on host {socket.gethostname()}" in err and "in use by another nkd run" in err
    assert cli_main(["train", cfg, "--overwrite"]) == 2  # never deletes a live run's files
    assert "in use by another nkd run" in capsys.readouterr().err
    assert first.wait() == 0, first.stderr.read()
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not lock.exists()  # released at the end


def test_a_stale_lock_is_reported_and_taken_over_one_from_another_host_refused(tmp_path, capsys):
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"))
    dead = procs.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    pid = int(dead.stdout)
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / LOCK_NAME
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "earlier"}))
    assert cli_main(["train", cfg]) == 0
    assert f"took over the stale lock of pid {pid}" in (tmp_path / "run" / "train.log").read_text()
    lock.write_text(json.dumps({"pid": 1, "host": "another-machine", "since": "earlier"}))
    assert cli_main(["train", cfg, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "another-machine" in err and f"delete {lock}" in err


# ----------------------------------------------------------------------------- 7. resume with another config
def test_resume_refuses_a_config_that_changes_the_run_unless_allowed(tmp_path, capsys):
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"), schedule={"name": "constant", "epochs": 2},
                data={"synthetic_samples": 64}, train={"checkpoint_every_steps": 2, "max_steps_per_epoch": None})
    assert cli_main(["train", cfg, "schedule.epochs=1"]) == 0
    before = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    assert cli_main(["train", cfg, "--resume", "data.batch_size=32", "seed=3", "optim.lr=0.1"]) == 2
    err = capsys.readouterr().err
    for change in ("data.batch_size: 16 → 32", "seed: 0 → 3", "optim.lr: 0.05 → 0.1", "schedule.epochs: 1 → 2"):
        assert change in err, err
    assert "--allow-changes" in err
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == before
    assert cli_main(["train", cfg, "--resume", "train.console=false"]) == 2  # harmless keys alone don't help
    assert cli_main(["train", cfg, "--resume", "--allow-changes"]) == 0  # extend to 2 epochs, recorded
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config_changes"][0]["changes"] == {"schedule.epochs": [1, 2]}
    assert summary["config_changes"][0]["at"] == "after epoch 1"


def test_resume_inside_an_epoch_with_another_batch_size_is_refused(tmp_path, capsys):
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"), schedule={"name": "constant", "epochs": 2},
                data={"synthetic_samples": 96}, train={"checkpoint_every_steps": 2, "max_steps_per_epoch": None})
    res = procs.run([sys.executable, "-m", "nkd", "train", cfg], env={**env(), "NKD_FAULT_KILL_STEP": "3"},
                    capture_output=True)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["partial"]["step"] == 2
    assert cli_main(["train", cfg, "--resume", "--allow-changes", "data.batch_size=8"]) == 2
    assert "saved inside an epoch of 6 steps and the config now gives 12 steps" in capsys.readouterr().err


# ----------------------------------------------------------------------------- logs
def test_logs_without_a_terminal_have_plain_lines_and_tensorboard_groups(tmp_path):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = quick(tmp_path, output_dir=str(tmp_path / "run"), train={"log_every": 1, "max_steps_per_epoch": 3,
                                                                   "tensorboard": True, "threads": 1})
    res = procs.run([sys.executable, "-m", "nkd", "train", cfg], env=env(), capture_output=True)
    assert res.returncode == 0, res.stderr
    for text in (res.stdout, res.stderr, (tmp_path / "run" / "train.log").read_text()):
        assert "\r" not in text
    assert "epoch 1/1 step 2/3 | loss" in res.stdout and "1 CPU threads" in res.stdout
    acc = ea.EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "eval/top1"} <= set(acc.Tags()["scalars"])
    steps = ea.EventAccumulator(str(tmp_path / "run" / "tb" / "steps"))
    steps.Reload()
    assert [e.step for e in steps.Scalars("train_step/loss")] == [1, 2, 3]
