"""nkd sweep / report / demo: real runs in real processes, real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import write_config
from nkd.cli import main as cli_main
from nkd.report import collect, table

pytest.importorskip("matplotlib")


def test_sweep_runs_each_seed_and_reports_mean_std(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "sw"), schedule={"name": "cosine", "epochs": 1})
    # an override may follow the options, as with nkd train
    assert cli_main(["sweep", cfg, "--seeds", "0,1", "--workers", "2", "schedule.epochs=2"]) == 0
    out = capsys.readouterr().out
    for s in (0, 1):
        summary = json.loads((tmp_path / "sw" / f"seed{s}" / "summary.json").read_text())
        assert summary["seed"] == s and summary["epochs"] == 2
    assert "| ce resnet8 | 2 |" in out
    report = (tmp_path / "sw" / "report.md").read_text()
    assert "best top-1" in report and "last top-1" in report
    assert (tmp_path / "sw" / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "sw" / "curves.png").stat().st_size > 1000
    # mean ± std in the table is computed from the runs' own summaries
    groups = collect([tmp_path / "sw"])
    vals = [json.loads((tmp_path / "sw" / f"seed{s}" / "summary.json").read_text())["best_top1"] for s in (0, 1)]
    mean = sum(vals) / 2
    assert f"{mean:.2f} ±" in table(groups)


def test_report_groups_several_methods(tmp_path, capsys):
    for method, seed in (("ce", 0), ("ls", 0), ("ls", 1)):
        cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "runs" / f"{method}{seed}"), seed=seed,
                           method={"name": method}, schedule={"name": "constant", "epochs": 1})
        assert cli_main(["train", cfg]) == 0
    capsys.readouterr()
    assert cli_main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| ce resnet8 | 1 |" in out and "| ls resnet8 | 2 |" in out
    assert (tmp_path / "rep" / "report.md").is_file()
    assert cli_main(["report", str(tmp_path / "nothing")]) == 2


def test_report_splits_a_hyper_parameter_sweep(tmp_path, capsys):
    """Runs of one method that differ in a parameter are separate rows, labelled by that parameter
    only; seeds with the same parameters stay one group. The summary records the resolved parameters."""
    for eps, seed in ((0.1, 0), (0.1, 1), (0.3, 0)):
        cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "runs" / f"ls{eps}_{seed}"), seed=seed,
                           method={"name": "ls", "params": {"epsilon": eps}}, schedule={"name": "constant", "epochs": 1})
        assert cli_main(["train", cfg]) == 0
    summary = json.loads((tmp_path / "runs" / "ls0.3_0" / "summary.json").read_text())
    assert summary["method_params"] == {"epsilon": 0.3}
    capsys.readouterr()
    assert cli_main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| ls resnet8 (epsilon=0.1) | 2 |" in out and "| ls resnet8 (epsilon=0.3) | 1 |" in out


def test_sweep_rerun_is_refused_unless_resume_or_overwrite(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", output_dir=str(tmp_path / "sw"), schedule={"name": "constant", "epochs": 1})
    assert cli_main(["sweep", cfg, "--seeds", "0,1", "--workers", "1"]) == 0
    last = (tmp_path / "sw" / "seed1" / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    assert cli_main(["sweep", cfg, "--seeds", "0,1", "--workers", "1"]) == 2  # before any run starts
    err = capsys.readouterr().err
    assert "seed0 already holds checkpoints" in err and "seed1 already holds checkpoints" in err
    assert (tmp_path / "sw" / "seed1" / "checkpoints" / "last.pt").read_bytes() == last
    assert cli_main(["sweep", cfg, "--seeds", "0,1", "--workers", "1", "--resume"]) == 0  # finished: re-reported
    assert (tmp_path / "sw" / "seed1" / "checkpoints" / "last.pt").read_bytes() == last
    assert "| ce resnet8 | 2 |" in capsys.readouterr().out


def test_sweep_rejects_bad_seeds_and_configs(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml")
    assert cli_main(["sweep", cfg, "--seeds", "a,b"]) == 2
    assert cli_main(["sweep", cfg, "optim.lr=0"]) == 2
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end_small(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--epochs", "2", "--seeds", "2", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    for label in ("ce resnet8", "kd resnet8 ← wrn_16_2", "dkd resnet8 ← wrn_16_2", "nkd resnet8 ← wrn_16_2",
                  "ls resnet8", "uskd resnet8", "ce wrn_16_2"):
        assert f"| {label} |" in text, label
    assert (out / "report.md").is_file() and (out / "accuracy.png").is_file() and (out / "curves.png").is_file()
    assert len(list(Path(out / "runs").rglob("summary.json"))) == 1 + 6 * 2
