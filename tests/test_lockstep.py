"""Lockstep students (one data pipeline, one teacher forward per batch): bitwise equal to separate
runs, also after kill -9 + --resume; bad groups refused; one diverging student stops alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import procs
from helpers import write_config
from nkd.cli import main as cli_main
from nkd.config import load_config
from nkd.engine import GroupError, Trainer, train_together
from nkd.engine.checkpoint import load_checkpoint
from nkd.engine.trainer import group_problems

TEACHER = {"name": "resnet8", "num_classes": 10}
STUDENTS = {  # three methods, two architectures; the wrn uses dropout, so its random stream matters
    "kd": {"method": {"name": "kd"}, "model": {"name": "resnet8", "num_classes": 10}},
    "dkd": {"method": {"name": "dkd", "params": {"warmup_epochs": 1}},
            "model": {"name": "wrn_16_1", "num_classes": 10, "kwargs": {"drop_rate": 0.3}}},
    "nkd": {"method": {"name": "nkd"}, "model": {"name": "resnet8", "num_classes": 10},
            "optim": {"lr": 0.1}, "train": {"ema_decay": 0.9}},
}


def configs(tmp_path: Path, prefix: str, epochs: int = 3, **common) -> list[str]:
    out = []
    for name, extra in STUDENTS.items():
        sections = {"teacher": TEACHER, "schedule": {"name": "cosine", "epochs": epochs},
                    "data": {"synthetic_samples": 64}, **extra, **common}
        out.append(write_config(tmp_path / f"{prefix}_{name}.yaml", output_dir=str(tmp_path / prefix / name), **sections))
    return out


def weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["trainable"]


def assert_bitwise(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (a, k)
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in ma] == [r["epoch"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == rb["loss"] and ra["top1"] == rb["top1"], (a, ra, rb)


@pytest.fixture(scope="module")
def separate(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("separate")
    for path in configs(tmp, "sep"):
        Trainer(load_config(path)).fit()
    return tmp / "sep"


@pytest.mark.slow
def test_lockstep_students_equal_their_separate_runs_bitwise(tmp_path, separate):
    cfgs = [load_config(p) for p in configs(tmp_path, "grp")]
    summaries = train_together(cfgs)
    assert [s["method"] for s in summaries] == ["kd", "dkd", "nkd"]
    for name in STUDENTS:
        assert_bitwise(tmp_path / "grp" / name, separate / name)
        assert (tmp_path / "grp" / name / "summary.json").is_file()
    log = (tmp_path / "grp" / "kd" / "train.log").read_text()
    assert "lockstep group of 3" in log and "kd" in log and "dkd |" not in log  # each run logs to its own file


def _nkd(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + e.get("PYTHONPATH", "")
    e.update(env or {})
    return procs.run([sys.executable, "-m", "nkd", *args], env=e, capture_output=True)


@pytest.mark.slow
def test_kill_9_of_the_shared_job_then_resume_matches_separate_runs(tmp_path, separate):
    """The shared job is SIGKILLed as epoch 3 starts; one student is then set back one epoch (as if the
    kill had come between two students' saves). --resume steps the others back to their prev.pt so the
    group stands at one position again, and every student ends bitwise where its separate run ends."""
    paths = configs(tmp_path, "grp")
    once = tmp_path / "killed"
    res = _nkd("sweep", *paths, "--seeds", "0", "--share-teacher", "--workers", "1",
               env={"NKD_FAULT_KILL_EPOCH": "3", "NKD_FAULT_ONCE_FILE": str(once)})
    assert res.returncode == -9, res.stderr[-2000:]
    runs = [tmp_path / "grp" / name / "seed0" for name in STUDENTS]
    assert all(load_checkpoint(r / "checkpoints" / "last.pt")["epoch"] == 1 for r in runs)
    lagging = runs[1] / "checkpoints"
    shutil.copy(lagging / "prev.pt", lagging / "last.pt")  # dkd: after epoch 1 only
    res = _nkd("sweep", *paths, "--seeds", "0", "--share-teacher", "--workers", "1", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    for name, run in zip(STUDENTS, runs):
        w, ref = weights(run), weights(separate / name)
        for k in ref:
            assert torch.equal(w[k], ref[k]), (name, k)
        assert "resumed from" in (run / "train.log").read_text()
        assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "| kd resnet8 ← resnet8 | 1 |" in res.stdout  # the report over the three runs


def test_students_at_different_positions_are_refused(tmp_path):
    paths = configs(tmp_path, "grp", epochs=2, train={"max_steps_per_epoch": 1})
    train_together([load_config(p) for p in paths])
    for f in (tmp_path / "grp" / "kd" / "checkpoints").glob("*.pt"):
        f.unlink()  # kd has nothing to resume from; the others stand after epoch 2
    with pytest.raises(ValueError, match="different positions"):
        train_together([load_config(p) for p in paths], resume=True)


def test_configs_that_cannot_share_are_refused_naming_the_keys(tmp_path):
    a, b, c = (load_config(p) for p in configs(tmp_path, "grp"))
    b.data.batch_size = 32
    c.teacher.name = "resnet14"
    problems = group_problems([a, b, c])
    assert any("data.batch_size: 16 vs 32" in p for p in problems)
    assert any("teacher.name: 'resnet8' vs 'resnet14'" in p for p in problems)
    c.teacher.name, c.output_dir = "resnet8", a.output_dir
    assert any("both write output_dir" in p for p in group_problems([a, c]))
    with pytest.raises(ValueError, match="cannot train in lockstep"):
        train_together([a, b])
    assert not (tmp_path / "grp").exists()  # refused before anything was created


def test_a_diverging_student_stops_alone_naming_its_run(tmp_path):
    paths = configs(tmp_path, "grp", epochs=2, train={"max_steps_per_epoch": 2})
    cfgs = [load_config(p) for p in paths]
    cfgs[0] = load_config(paths[0], ["optim.lr=1e30"])  # kd diverges
    with pytest.raises(GroupError, match="grp/kd: non-finite"):
        train_together(cfgs)
    assert not (tmp_path / "grp" / "kd" / "summary.json").exists()
    assert "stopped" in (tmp_path / "grp" / "kd" / "train.log").read_text()
    for name in ("dkd", "nkd"):  # the others finished untouched
        assert json.loads((tmp_path / "grp" / name / "summary.json").read_text())["epochs"] == 2


def test_sweep_share_teacher_groups_runs_and_reports_pairs(tmp_path, capsys):
    """Two methods share one process per seed; a config with another teacher trains alone and the
    sweep says which keys kept it out; the report pairs seeds."""
    base = {"teacher": TEACHER, "schedule": {"name": "cosine", "epochs": 1}, "data": {"synthetic_samples": 48},
            "train": {"max_steps_per_epoch": 2}}
    a = write_config(tmp_path / "a.yaml", output_dir=str(tmp_path / "kd"), method={"name": "kd"}, **base)
    b = write_config(tmp_path / "b.yaml", output_dir=str(tmp_path / "nkd"), method={"name": "nkd"}, **base)
    c = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "nkd_t14"), method={"name": "nkd"},
                     **{**base, "teacher": {"name": "resnet14", "num_classes": 10}})
    assert cli_main(["sweep", a, b, c, "--seeds", "0,1", "--share-teacher", "--workers", "1",
                     "--report-dir", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "nkd_t14/seed0 trains on its own" in out and "teacher.name ('resnet8' vs 'resnet14')" in out
    for d in ("kd", "nkd", "nkd_t14"):
        for s in (0, 1):
            assert (tmp_path / d / f"seed{s}" / "summary.json").is_file()
    log = (tmp_path / "kd" / "seed0" / "train.log").read_text()
    assert "lockstep group of 2" in log
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report  # the paired table's numbers are machine-readable too
    assert cli_main(["sweep", a, a, "--seeds", "0"]) == 2  # the same run twice is refused before anything runs
