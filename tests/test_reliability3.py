"""Reliability round 3 (issue 17): corrupt checkpoints, full disks, resume edge cases, bad input.

Real runs, real files, the real CLI; each test failed on the code before its fix.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import procs
from helpers import write_config
from nkd.cli import main as cli_main
from nkd.config import load_config
from nkd.engine import Trainer
from nkd.engine.checkpoint import load_checkpoint

KD = dict(method={"name": "nkd", "params": {}}, teacher={"name": "resnet8", "num_classes": 10})


def config(tmp_path: Path, name: str, epochs: int = 4, **extra) -> str:
    sections = {**KD, "schedule": {"name": "multistep", "epochs": epochs, "milestones": [min(2, epochs)]},
                "data": {"synthetic_samples": 64}, **extra}
    return write_config(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / name), **sections)


def weights(run: Path, name: str = "last.pt") -> dict:
    return load_checkpoint(run / "checkpoints" / name)["trainable"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def flip_a_bit(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor record of a torch zip checkpoint: the file
    stays a well-formed archive (torch.load reads it), only the record's CRC-32 no longer matches."""
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- 7. a flipped bit
def test_a_bit_flipped_last_pt_is_detected_and_the_run_resumes_from_prev(tmp_path):
    ref = config(tmp_path, "ref")
    Trainer(load_config(ref)).fit()
    cfg = config(tmp_path, "run")
    Trainer(load_config(cfg)).fit()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    flip_a_bit(last)
    torch.load(last, map_location="cpu", weights_only=True)  # torch itself reads it without a word
    assert cli_main(["train", cfg, "--resume"]) == 0  # falls back to prev.pt (after epoch 3), redoes epoch 4
    log = (tmp_path / "run" / "train.log").read_text()
    assert "is corrupt: the CRC-32 of its record" in log and "trying the previous checkpoint" in log
    assert same(weights(tmp_path / "run"), weights(tmp_path / "ref"))


def test_a_bit_flipped_teacher_checkpoint_is_refused(tmp_path, capsys):
    t = config(tmp_path, "t", epochs=1, method={"name": "ce"}, teacher=None)
    assert cli_main(["train", t]) == 0
    ck = tmp_path / "t" / "checkpoints" / "best.pt"
    flip_a_bit(ck)
    cfg = config(tmp_path, "s", epochs=1, teacher={"name": "resnet8", "num_classes": 10, "checkpoint": str(ck)})
    capsys.readouterr()
    assert cli_main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert str(ck) in err and "corrupt" in err and "CRC-32" in err
    assert not (tmp_path / "s" / "checkpoints" / "last.pt").exists()


# ----------------------------------------------------------------------------- 8. best.pt lost
def test_a_failed_best_pt_write_never_leaves_a_summary_naming_a_missing_best(tmp_path, capsys):
    """best.pt cannot be written after epoch 1 (here: a directory stands in its place, as a full disk
    would refuse it); after the cause is gone, --resume finishes and summary.json, best.pt and
    nkd export agree."""
    cfg = config(tmp_path, "run", epochs=1)
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    best.mkdir(parents=True)
    assert cli_main(["train", cfg]) == 1
    assert "cannot write checkpoint" in capsys.readouterr().err
    best.rmdir()
    assert cli_main(["train", cfg, "--resume"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert best.is_file() and load_checkpoint(best)["epoch"] + 1 == summary["best_epoch"] == 1
    assert cli_main(["export", str(tmp_path / "run")]) == 0


def test_resume_rewrites_a_best_pt_that_went_missing(tmp_path):
    cfg = config(tmp_path, "run", epochs=1)  # one epoch: it is the best
    Trainer(load_config(cfg)).fit()
    ck = tmp_path / "run" / "checkpoints"
    (ck / "best.pt").unlink()
    assert cli_main(["train", cfg, "--resume"]) == 0
    assert same(weights(tmp_path / "run", "best.pt"), weights(tmp_path / "run"))
    assert "rewrote" in (tmp_path / "run" / "train.log").read_text()


# ----------------------------------------------------------------------------- 9. a full disk at the start
def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, as a full disk gives ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_at_the_start_is_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    cfg = config(tmp_path, "run", epochs=1)
    res = procs.nkd("train", cfg, preexec_fn=_limit_file_size(1000))  # the lock fits, config.yaml does not
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Logging error" not in res.stderr and "Traceback" not in res.stderr
    assert f"cannot write {tmp_path / 'run' / 'config.yaml'}" in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2  # the error (and at most one line on the lost log)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 15. a missing dataset
def test_a_missing_dataset_creates_nothing_and_names_only_nkd_settings(tmp_path, capsys):
    root = tmp_path / "empty"
    root.mkdir()
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "out" / "run"), method={"name": "ce"},
                       model={"name": "resnet8", "num_classes": 100},
                       data={"name": "cifar100", "root": str(root), "download": False, "image_size": None})
    assert cli_main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert "cifar100 not found" in err and "data.download=true" in err
    assert "download=True" not in err  # torchvision's argument, not a setting of nkd
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert list(root.iterdir()) == []


# ----------------------------------------------------------------------------- 10. another optimizer on resume
@pytest.mark.parametrize("change", [["optim.name=adamw"], ["optim.no_decay_norm_bias=true"]])
def test_resume_with_another_optimizer_starts_it_fresh_and_says_so(tmp_path, capsys, change):
    cfg = config(tmp_path, "run", epochs=1)
    assert cli_main(["train", cfg]) == 0
    assert cli_main(["train", cfg, "--resume", "--allow-changes", "schedule.epochs=2", *change]) == 0
    assert "starts fresh" in (tmp_path / "run" / "train.log").read_text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "starts fresh" in summary["config_changes"][0]["optimizer"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- 11. keys added since
def test_a_checkpoint_from_before_a_key_existed_resumes_without_a_phantom_change(tmp_path, capsys):
    cfg = config(tmp_path, "run", epochs=1)
    assert cli_main(["train", cfg]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ck = load_checkpoint(last)
    old = yaml.safe_load(ck["config"])
    del old["optim"]["no_decay_norm_bias"]  # as a version before the key wrote it
    del old["method"]["params"]["temperature"]
    ck["config"] = yaml.safe_dump(old, sort_keys=False)
    torch.save(ck, last)
    assert cli_main(["train", cfg, "--resume"]) == 0, capsys.readouterr().err
    # a key added since, set to something else than what the old code did, is still a change
    assert cli_main(["train", cfg, "--resume", "optim.no_decay_norm_bias=true"]) == 2
    assert "optim.no_decay_norm_bias: False → True" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 12. another dataset folder
def test_resume_lists_a_changed_data_root(tmp_path, capsys):
    from helpers import make_cifar

    for name in ("a", "b"):
        make_cifar(tmp_path / name, "cifar10", seed=ord(name))
    cfg = config(tmp_path, "run", epochs=1, method={"name": "ce"}, teacher=None, model={"name": "resnet8", "num_classes": 10},
                 data={"name": "cifar10", "root": str(tmp_path / "a"), "verify_checksums": False,
                       "image_size": None})
    assert cli_main(["train", cfg]) == 0
    assert cli_main(["train", cfg, "--resume", f"data.root={tmp_path / 'a'}/"]) == 0  # the same folder
    capsys.readouterr()
    assert cli_main(["train", cfg, "--resume", f"data.root={tmp_path / 'b'}"]) == 2
    assert f"data.root: {str(tmp_path / 'a')!r} → {str(tmp_path / 'b')!r}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 13, 14. config and summary files
def _train_fails(tmp_path, capsys, text: bytes) -> str:
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text)
    assert cli_main(["train", str(cfg), f"output_dir={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()
    return capsys.readouterr().err


def test_a_config_that_is_not_utf8_is_a_clear_error(tmp_path, capsys):
    err = _train_fails(tmp_path, capsys, b"\xff\xfeseed: 0\n")
    assert "c.yaml: not UTF-8 text" in err and "Traceback" not in err


@pytest.mark.parametrize("text,key,where", [
    (b"seed: 0\ndata:\n  name: synthetic\nseed: 5\n", "'seed'", "lines 1 and 4"),
    (b"seed: 0\noptim:\n  lr: 0.1\n  momentum: 0.9\n  lr: 0.2\n", "'lr'", "lines 3 and 5"),
    (b"optim: {lr: 0.1, lr: 0.2}\n", "'lr'", "twice on line 1"),
])
def test_a_duplicate_yaml_key_is_refused_naming_the_key_and_lines(tmp_path, capsys, text, key, where):
    err = _train_fails(tmp_path, capsys, text)
    assert f"duplicate key {key} ({where})" in err


def test_yaml_merge_keys_may_still_override():
    from nkd.typed import load_yaml

    assert load_yaml("base: &b {lr: 0.1, wd: 1}\nrun:\n  <<: *b\n  lr: 0.2\n")["run"] == {"lr": 0.2, "wd": 1}


def test_report_of_a_summary_that_is_not_utf8_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_bytes(b'{"method": "\xff"}')
    assert cli_main(["report", str(run), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "summary.json: not UTF-8 text" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- 16. seed bounds
@pytest.mark.parametrize("override", ["seed=18446744073709551616", "seed=4294967296", "seed=-1",
                                      "data.subset_seed=4294967296"])
def test_a_seed_out_of_the_range_really_used_is_refused_naming_it(tmp_path, capsys, override):
    cfg = config(tmp_path, "run", epochs=1)
    assert cli_main(["train", cfg, override]) == 2
    err = capsys.readouterr().err
    assert f"{override.split('=')[0]}: must lie in [0, 4294967295]" in err
    assert not (tmp_path / "run").exists()
    assert cli_main(["sweep", cfg, "--seeds", "0,4294967296"]) == 2
    assert "seed: must lie in [0, 4294967295]" in capsys.readouterr().err


def test_the_largest_seed_trains(tmp_path):
    Trainer(load_config(config(tmp_path, "run", epochs=1), ["seed=4294967295"])).fit()


# ----------------------------------------------------------------------------- 17, 5. sweep arguments
def test_sweep_names_a_repeated_seed(tmp_path, capsys):
    cfg = config(tmp_path, "run", epochs=1)
    assert cli_main(["sweep", cfg, "--seeds", "0,1,0"]) == 2
    err = capsys.readouterr().err
    assert "--seeds names seed 0 more than once" in err and "listed twice" not in err
    assert not (tmp_path / "run").exists()


def test_sweep_takes_an_existing_file_whose_path_holds_an_equals_sign_as_a_config(tmp_path, capsys):
    folder = tmp_path / "lr=0.05"
    folder.mkdir()
    cfg = write_config(folder / "c.yaml", output_dir=str(tmp_path / "sw"), method={"name": "ce"},
                       schedule={"name": "constant", "epochs": 1})
    assert cli_main(["sweep", cfg, "--seeds", "0", "--workers", "1", "optim.lr=0.1"]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "sw" / "seed0" / "summary.json").read_text())["seed"] == 0
    assert "lr: 0.1" in (tmp_path / "sw" / "seed0" / "config.yaml").read_text()


# ----------------------------------------------------------------------------- 18, 19. export, eval, report
def test_export_and_report_outputs_that_cannot_be_written_are_clear_errors(tmp_path, capsys):
    cfg = config(tmp_path, "run", epochs=1)
    assert cli_main(["train", cfg]) == 0
    capsys.readouterr()
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "missing" / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"--out: folder not found: {tmp_path / 'missing'}" in err and "Traceback" not in err
    assert not (tmp_path / "missing").exists()
    existing = tmp_path / "file"
    existing.write_text("keep")
    assert cli_main(["report", str(tmp_path / "run"), "--out", str(existing)]) == 2
    assert f"--out: {existing} is a file" in capsys.readouterr().err
    assert existing.read_text() == "keep"


def test_a_run_trained_with_model_kwargs_can_be_evaluated_and_exported(tmp_path, capsys):
    cfg = config(tmp_path, "run", epochs=1, method={"name": "ce"}, teacher=None,
                 model={"name": "shufflev2", "num_classes": 10,
                        "kwargs": {"widths": [24, 48, 96, 128], "blocks": [1, 1, 1]}})
    assert cli_main(["train", cfg]) == 0
    assert cli_main(["export", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    out = tmp_path / "run" / "student.safetensors"
    capsys.readouterr()
    for ck in (tmp_path / "run" / "checkpoints" / "best.pt", out):
        assert cli_main(["eval", cfg, "--checkpoint", str(ck)]) == 0, capsys.readouterr().err
        assert '"top1"' in capsys.readouterr().out


# ----------------------------------------------------------------------------- 3. sweep --resume checks first
@pytest.mark.parametrize("share", [[], ["--share-teacher"]])
def test_sweep_resume_checks_every_run_before_anything_trains(tmp_path, capsys, share):
    a = config(tmp_path, "a", epochs=2, method={"name": "ce"}, teacher=None)
    b = config(tmp_path, "b", epochs=2, method={"name": "ce"}, teacher=None, optim={"lr": 0.05, "momentum": 0.8})
    assert cli_main(["sweep", a, b, "--seeds", "0,1", "--workers", "1", *share]) == 0
    for ck in tmp_path.glob("*/seed*/checkpoints"):  # every run one epoch short of its end
        (ck / "prev.pt").replace(ck / "last.pt")
    cfg = yaml.safe_load(Path(b).read_text())
    cfg["optim"]["lr"] = 0.2
    Path(b).write_text(yaml.safe_dump(cfg))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/seed*/checkpoints/last.pt")}
    capsys.readouterr()
    assert cli_main(["sweep", a, b, "--seeds", "0,1", "--workers", "1", "--resume", *share]) == 2
    err = capsys.readouterr().err
    assert "--resume refused for 2 runs" in err and "optim.lr: 0.05 → 0.2" in err
    for s in (0, 1):
        assert str(tmp_path / "b" / f"seed{s}" / "checkpoints" / "last.pt") in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/seed*/checkpoints/last.pt")} == before  # nothing trained


# ----------------------------------------------------------------------------- 4. a teacher still training
def test_a_teacher_checkpoint_of_a_run_still_training_is_refused_naming_it(tmp_path, capsys):
    t = config(tmp_path, "t", epochs=200, method={"name": "ce"}, teacher=None, train={"log_every": 1})
    best = tmp_path / "t" / "checkpoints" / "best.pt"
    cfg = config(tmp_path, "s", epochs=1, teacher={"name": "resnet8", "num_classes": 10, "checkpoint": str(best)})
    teacher = procs.start([sys.executable, "-m", "nkd", "train", t], env=procs.nkd_env(OMP_NUM_THREADS="1"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.wait_until(lambda: best.is_file() or teacher.poll() is not None, "the teacher's first best.pt")
    assert teacher.poll() is None, "the teacher run ended before the check"
    assert cli_main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert "belongs to a run that is still training" in err and f"pid {teacher.pid}" in err
    assert "NKD_ALLOW_LIVE_TEACHER=1" in err
    assert not (tmp_path / "s").exists()
    os.environ["NKD_ALLOW_LIVE_TEACHER"] = "1"
    try:
        assert cli_main(["train", cfg]) == 0
    finally:
        del os.environ["NKD_ALLOW_LIVE_TEACHER"]
    assert "still training" in (tmp_path / "s" / "train.log").read_text()
    procs.kill_started()
    assert cli_main(["train", cfg, "--overwrite"]) == 0  # the teacher's run is gone: its lock is stale


# ----------------------------------------------------------------------------- 21, 22. the report says what it holds
def test_report_records_the_machine_and_lists_unfinished_runs(tmp_path, capsys):
    done = config(tmp_path, "done", epochs=1, method={"name": "ce"}, teacher=None)
    assert cli_main(["train", done]) == 0
    cut = config(tmp_path, "cut", epochs=2, method={"name": "ce"}, teacher=None)
    assert cli_main(["train", cut]) == 0
    (tmp_path / "cut" / "summary.json").unlink()  # as after a stop before the last epoch
    capsys.readouterr()
    assert cli_main(["report", str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {tmp_path / 'cut'}: stopped before its last epoch" in err
    md = (tmp_path / "rep" / "report.md").read_text()
    from nkd.engine.step import cpu_model

    assert f"Machines: {cpu_model()}, " in md and "repeat bitwise" in md
    assert f"`{tmp_path / 'cut'}`: stopped before its last epoch" in md
    assert json.loads((tmp_path / "done" / "summary.json").read_text())["machine"]["cpu"] == cpu_model()


# ----------------------------------------------------------------------------- 24. export formats
def test_export_bytes_are_a_function_of_the_weights_and_an_mdistiller_file_loads_there(tmp_path, capsys):
    import hashlib

    from nkd.models import create_model

    cfg = config(tmp_path, "run", epochs=1, method={"name": "ce"}, teacher=None)
    assert cli_main(["train", cfg]) == 0
    digests = set()
    for i in range(4):  # safetensors wrote its metadata map in hash order: equal weights, other bytes
        out = tmp_path / f"s{i}.safetensors"
        assert procs.nkd("export", str(tmp_path / "run"), "--out", str(out)).returncode == 0
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert f.metadata()["model"] == "resnet8"
    pth = tmp_path / "student_model.pth"
    assert cli_main(["export", str(tmp_path / "run"), "--format", "mdistiller", "--out", str(pth)]) == 0
    model = create_model("resnet8", 10)
    model.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True)["model"])  # as mdistiller does
    capsys.readouterr()
    assert cli_main(["eval", cfg, "--checkpoint", str(pth)]) == 0


# ----------------------------------------------------------------------------- 23, 25. threads and workers
def test_sweep_says_when_it_caps_workers_at_the_cores(tmp_path, capsys):
    cfg = config(tmp_path, "run", epochs=1, method={"name": "ce"}, teacher=None)
    cores = os.cpu_count()
    assert cli_main(["sweep", cfg, "--seeds", "0", "--workers", str(cores + 1)]) == 0
    assert f"--workers {cores + 1} capped at {cores}" in capsys.readouterr().err


def test_a_single_run_on_a_busy_machine_says_to_use_fewer_threads(monkeypatch):
    from nkd.engine.trainer import busy_machine_note

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    note = busy_machine_note(None, 8, load=12.0, cores=8)
    assert note and "load 12.0 on 8 cores" in note and "train.threads" in note
    assert busy_machine_note(None, 8, load=3.0, cores=8) is None  # not busy
    assert busy_machine_note(2, 2, load=12.0, cores=8) is None  # threads chosen
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert busy_machine_note(None, 8, load=12.0, cores=8) is None


def test_a_teacherless_run_in_a_shared_sweep_is_noted_in_one_short_line(tmp_path, capsys):
    ce = config(tmp_path, "ce", epochs=1, method={"name": "ce"}, teacher=None)
    kd = config(tmp_path, "kd", epochs=1)
    assert cli_main(["sweep", ce, kd, "--seeds", "0", "--workers", "1", "--share-teacher"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "trains on its own" in x]
    assert f"nkd sweep: {tmp_path / 'ce' / 'seed0'} trains on its own: its method uses no teacher" in lines
    assert len(lines) == 2 and all("teacher.checkpoint" not in x for x in lines)


def test_the_epoch_line_labels_its_lr_as_the_epochs_first(tmp_path):
    cfg = config(tmp_path, "run", epochs=2, method={"name": "ce"}, teacher=None,
                 schedule={"name": "cosine", "epochs": 2}, train={"log_every": 1000})
    assert cli_main(["train", cfg]) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "epoch 1 | loss" in log and "| lr 0.05 at its start |" in log
    assert "epoch 1/2 step 4/4" in log  # log_every longer than an epoch: its last step is still reported


@pytest.mark.slow
def test_two_demo_runs_on_one_machine_give_the_same_table(tmp_path):
    """What the README promises on one machine (another CPU model: within noise)."""
    from nkd.demo import run_demo

    tables = [run_demo(tmp_path / f"d{i}", seeds=(0,), epochs=2, workers=2) for i in range(2)]
    assert tables[0] == tables[1]
    assert "Machines: " in (tmp_path / "d0" / "report.md").read_text()


def test_eval_of_an_exported_file_needs_no_config(tmp_path, capsys):
    cfg = config(tmp_path, "run", epochs=1, method={"name": "ce"}, teacher=None)
    assert cli_main(["train", cfg]) == 0
    out = tmp_path / "x.safetensors"
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli_main(["eval", cfg, "--checkpoint", str(out)]) == 0
    with_config = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_main(["eval", "--checkpoint", str(out)]) == 0
    without = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert without == with_config
    assert cli_main(["eval", "--checkpoint", str(out), "data.eval_batch_size=7"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top1"] == with_config["top1"]
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoints" / "best.pt")]) == 2
    assert "name the run's config" in capsys.readouterr().err
