"""nkd report: comparison tables over real run directories (summary.json + metrics.jsonl on disk).

Each test is a complaint from the issues, written so that the report before this change fails it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from helpers import write_config
from nkd.cli import main as cli_main
from nkd.report import ReportError, accuracy_figure, collect, curves_figure, table, write_report

pytest.importorskip("matplotlib")

KD = {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
CIFAR10 = {"name": "cifar10", "root": "data", "train_subset": 4000, "image_size": 32, "num_classes": 10}
CIFAR100 = {"name": "cifar100", "root": "data", "train_subset": None, "image_size": 32, "num_classes": 100}
UNSET = object()


def make_run(root: Path, name: str, method: str = "ce", seed: int = 0, student: str = "resnet20", teacher=None,
             params=None, curve=(50.0,), data=UNSET, label=UNSET) -> Path:
    """A finished run as the Trainer leaves it: ``metrics.jsonl`` (one line per epoch) and ``summary.json``.
    ``data`` / ``label`` left out reproduce summaries written before those keys existed."""
    run = root / name
    run.mkdir(parents=True)
    rows = [{"epoch": e + 1, "loss": 1.0, "lr": 0.1, "top1": v, "top5": 99.0, "best_top1": max(curve[:e + 1])}
            for e, v in enumerate(curve)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(curve)
    summary = {"method": method, "method_params": params or {}, "student": student, "teacher": teacher, "seed": seed,
               "epochs": len(curve), "best_top1": best, "best_top5": 99.0, "best_epoch": curve.index(best) + 1,
               "last_top1": curve[-1], "last_top5": 99.0, "world_size": 1}
    if data is not UNSET:
        summary["data"] = data
    if label is not UNSET:
        summary["label"] = label
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def row_of(md: str, name: str) -> list[str]:
    rows = [line for line in md.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, (name, md)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def test_one_run_shows_n1_not_a_zero_std(tmp_path):
    make_run(tmp_path / "runs", "teacher", student="resnet56", curve=(60.0, 66.65), data=CIFAR10, label=None)
    for s, last in enumerate((57.0, 59.0)):
        make_run(tmp_path / "runs", f"ce{s}", seed=s, curve=(50.0, last), data=CIFAR10, label=None)
    md = write_report([tmp_path / "runs"], tmp_path / "rep")
    assert "± 0.00" not in md
    assert row_of(md, "ce resnet56")[1:4] == ["1", "66.65 (n=1)", "66.65 (n=1)"]
    assert row_of(md, "ce resnet20")[1:4] == ["2", "58.00 ± 1.41", "58.00 ± 1.41"]
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    teacher = next(r for r in rep["tables"][0]["rows"] if r["student"] == "resnet56")
    assert teacher["last_top1"] == {"mean": 66.65, "std": None, "n": 1, "values": [66.65]}


def test_two_datasets_are_split_never_averaged(tmp_path):
    """`nkd report runs/a runs/b` over two datasets gave `ce resnet20 | 2 | 53.63 ± 32.19`."""
    make_run(tmp_path / "a", "ce", curve=(76.38,), data=CIFAR10)
    make_run(tmp_path / "b", "ce", curve=(30.88,), data=CIFAR100)
    make_run(tmp_path / "b", "ce_full", curve=(40.0,), data={**CIFAR100, "train_subset": 5000})  # other data setting
    tables = collect([tmp_path / "a", tmp_path / "b"])
    assert [t.heading for t in tables] == ["cifar10 (root=data, train_subset=4000, image_size=32, num_classes=10)",
                                           "cifar100 (root=data, image_size=32, num_classes=100)",
                                           "cifar100 (root=data, train_subset=5000, image_size=32, num_classes=100)"]
    assert [[len(g.runs) for g in t.groups] for t in tables] == [[1], [1], [1]]
    md = table(tables)
    assert md.count("## cifar") == 3 and "53.63" not in md
    assert "76.38 (n=1)" in md and "30.88 (n=1)" in md


def test_old_summaries_without_data_are_one_table_with_a_note(tmp_path):
    make_run(tmp_path / "runs", "s0", seed=0, curve=(50.0,))
    make_run(tmp_path / "runs", "s1", seed=1, curve=(52.0,))
    make_run(tmp_path / "runs", "new", seed=0, curve=(70.0,), data=CIFAR10)
    md = write_report([tmp_path / "runs"], tmp_path / "rep")
    assert "## data settings not recorded" in md and "## cifar10" in md
    assert row_of(md.split("## data settings not recorded")[1], "ce resnet20")[1] == "2"
    assert "2 runs have no data settings in summary.json" in (tmp_path / "rep" / "report.md").read_text()


def test_paired_difference_to_the_reference_matches_hand_computation(tmp_path):
    """Per seed, row − reference over the seeds both ran; mean ± sample std (n = shared seeds)."""
    runs = tmp_path / "runs"
    for s, (best, last) in enumerate([(61.0, 60.0), (63.0, 62.0), (58.5, 58.0)]):
        make_run(runs, f"ce{s}", seed=s, curve=(best, last), data=CIFAR10)
    for s, (best, last) in enumerate([(62.0, 61.0), (66.0, 65.0), (60.0, 59.0), (71.0, 70.0)]):  # seed 3: unpaired
        make_run(runs, f"kd{s}", method="kd", teacher="resnet56", params=KD, seed=s, curve=(best, last), data=CIFAR10)
    make_run(runs, "ls9", method="ls", params={"epsilon": 0.1}, seed=9, curve=(40.0,), data=CIFAR10)
    md = write_report([runs], tmp_path / "rep")
    d_last, d_best = [1.0, 3.0, 1.0], [1.0, 3.0, 1.5]
    kd = row_of(md, "kd resnet20 ← resnet56")
    assert kd[4] == f"+{statistics.fmean(d_best):.2f} ± {statistics.stdev(d_best):.2f} (n=3)" == "+1.83 ± 1.04 (n=3)"
    assert kd[5] == "+1.67 ± 1.15 (n=3)"
    assert row_of(md, "ce resnet20")[4:6] == ["ref", "ref"]
    assert row_of(md, "ls resnet20")[4:6] == ["— (no shared seed)"] * 2
    row = next(r for r in json.loads((tmp_path / "rep" / "report.json").read_text())["tables"][0]["rows"]
               if r["method"] == "kd")
    assert row["paired_last_top1"]["values"] == d_last and row["paired_last_top1"]["seeds"] == [0, 1, 2]
    assert row["paired_last_top1"]["mean"] == pytest.approx(statistics.fmean(d_last))
    assert row["paired_last_top1"]["std"] == pytest.approx(statistics.stdev(d_last))
    assert row["paired_best_top1"]["values"] == d_best
    assert row["last_top1"]["mean"] == pytest.approx(statistics.fmean([61.0, 65.0, 59.0, 70.0]))


def test_hyper_parameters_train_subset_and_labelled_control_per_row(tmp_path):
    """The published KD recipe (CE weight 0.1) and its labelled control (CE weight 1.0) are separate rows,
    each with its resolved parameters and the train subset; the control is named by its label."""
    runs = tmp_path / "runs"
    ctrl = {**KD, "ce_weight": 1.0}
    for s in (0, 1):
        make_run(runs, f"kd{s}", method="kd", teacher="resnet56", params=KD, seed=s, curve=(60.0 + s,), data=CIFAR10,
                 label=None)
        make_run(runs, f"kdc{s}", method="kd", teacher="resnet56", params=ctrl, seed=s, curve=(62.0 + 2 * s,),
                 data=CIFAR10, label="kd, CE weight 1.0 (control)")
        make_run(runs, f"nkd{s}", method="nkd", teacher="resnet56", params={"temperature": 1.0, "gamma": 1.5}, seed=s,
                 curve=(61.0,), data=CIFAR10, label=None)
    md = table(collect([runs]))
    assert "| run | seeds | best top-1 | last top-1 | Δ best (paired) | Δ last (paired) | hyper-parameters | train subset |" \
        " epochs |" in md
    assert row_of(md, "kd resnet20 ← resnet56")[6:] == ["temperature=4, ce_weight=0.1, kd_weight=0.9", "4000", "1"]
    assert row_of(md, "kd, CE weight 1.0 (control)")[6:] == ["temperature=4, ce_weight=1, kd_weight=0.9", "4000", "1"]
    assert row_of(md, "nkd resnet20 ← resnet56")[6] == "temperature=1, gamma=1.5"
    # the control as reference separates the loss from the CE weighting
    md = table(collect([runs], baseline="control"))
    assert "Paired differences (Δ) are to **kd, CE weight 1.0 (control)**" in md
    assert row_of(md, "nkd resnet20 ← resnet56")[5] == "-2.00 ± 1.41 (n=2)"  # (61-62, 61-64)


def test_rows_that_share_a_name_show_what_differs(tmp_path):
    runs = tmp_path / "runs"
    for eps, seed in ((0.1, 0), (0.1, 1), (0.3, 0)):
        make_run(runs, f"ls{eps}_{seed}", method="ls", params={"epsilon": eps}, seed=seed, data=CIFAR10)
    make_run(runs, "ls_long", method="ls", params={"epsilon": 0.1}, seed=0, curve=(1.0, 2.0, 3.0), data=CIFAR10)
    names = [g.name for g in collect([runs])[0].groups]
    assert sorted(names) == ["ls resnet20 (epsilon=0.1, epochs=1)", "ls resnet20 (epsilon=0.1, epochs=3)",
                             "ls resnet20 (epsilon=0.3, epochs=1)"]


def test_baseline_must_match_exactly_one_row(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "ce", curve=(50.0,), data=CIFAR10)
    make_run(runs, "kd", method="kd", teacher="resnet56", params=KD, curve=(55.0,), data=CIFAR10)
    make_run(runs, "kdc", method="kd", teacher="resnet56", params={**KD, "ce_weight": 1.0}, curve=(57.0,), data=CIFAR10,
             label="kd resnet20 ← resnet56, control")
    out = tmp_path / "rep"
    assert cli_main(["report", str(runs), "--out", str(out), "--baseline", "kd resnet20 ← resnet56"]) == 0  # exact wins
    md = capsys.readouterr().out
    assert row_of(md, "kd resnet20 ← resnet56")[4] == "ref" and row_of(md, "ce resnet20")[5] == "-5.00 (n=1)"
    assert cli_main(["report", str(runs), "--out", str(out), "--baseline", "CONTROL"]) == 0  # substring, any case
    assert row_of(capsys.readouterr().out, "kd resnet20 ← resnet56, control")[4] == "ref"
    assert cli_main(["report", str(runs), "--out", str(out), "--baseline", "resnet56"]) == 2
    err = capsys.readouterr().err
    assert "--baseline 'resnet56' matches 2 rows" in err and "kd resnet20 ← resnet56, control" in err
    assert cli_main(["report", str(runs), "--out", str(out), "--baseline", "dkd"]) == 2
    assert "--baseline 'dkd' matches no row" in capsys.readouterr().err
    with pytest.raises(ReportError, match="matches no row"):
        collect([runs], baseline="uskd")


def test_baseline_matches_whole_words_so_kd_is_not_found_inside_nkd(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run(runs, "kd", method="kd", teacher="resnet56", params=KD, curve=(55.0,), data=CIFAR10)
    make_run(runs, "nkd", method="nkd", teacher="resnet56", curve=(58.0,), data=CIFAR10)
    assert cli_main(["report", str(runs), "--out", str(tmp_path / "rep"), "--baseline", "kd resnet20"]) == 0
    md = capsys.readouterr().out
    assert row_of(md, "kd resnet20 ← resnet56")[4] == "ref" and row_of(md, "nkd resnet20 ← resnet56")[4] == "+3.00 (n=1)"
    with pytest.raises(ReportError, match="matches no row"):
        collect([runs], baseline="resnet2")  # a part of a word is not a match


def test_methods_in_method_order_unknown_methods_last(tmp_path):
    runs = tmp_path / "runs"
    for m in ("zzz_new", "uskd", "nkd", "kd", "ce", "aaa_new"):
        make_run(runs, m, method=m, data=CIFAR10)
    assert [g.method for g in collect([runs])[0].groups] == ["ce", "kd", "nkd", "uskd", "aaa_new", "zzz_new"]


def test_accuracy_figure_no_zero_error_bars_axis_from_zero(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "teacher", student="resnet56", curve=(93.0,), data=CIFAR10)
    for s in (0, 1, 2):
        make_run(runs, f"kd{s}", method="kd", teacher="resnet56", params=KD, seed=s, curve=(92.0 + s,), data=CIFAR10)
    tables = collect([runs])
    fig = accuracy_figure(tables)
    ax, dax = fig.axes[:2]
    assert ax.get_ylim()[0] == 0.0
    bars = [c for c in ax.containers if type(c).__name__ == "BarContainer"]
    errs = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(bars) == 2 and [len(b) for b in bars] == [2, 2]  # best / last x (teacher, kd)
    # one error bar per key, at the kd row only (n=3); none at the one-run teacher
    segs = [e.lines[2][0].get_segments() for e in errs]
    assert len(errs) == 2 and [len(s) for s in segs] == [1, 1]
    kd_x = [g.method for g in tables[0].groups].index("kd")
    assert all(abs(s[0][0, 0] - kd_x) == pytest.approx(0.2) for s in segs)
    assert sorted(s[0][:, 1].tolist() for s in segs) == [[92.0, 94.0]] * 2  # mean 93 ± std 1
    assert dax.get_title().startswith("paired Δ to ce resnet56")


def test_curves_of_one_epoch_runs_are_drawn_with_markers_and_spread(tmp_path):
    """One epoch gave an empty curves.png: a line through one point without a marker draws nothing."""
    runs = tmp_path / "runs"
    for s, v in enumerate((50.0, 54.0)):
        make_run(runs, f"ce{s}", seed=s, curve=(v,), data=CIFAR10)
        make_run(runs, f"ls{s}", method="ls", params={"epsilon": 0.1}, seed=s, curve=(40.0 + s, 45.0, 47.0 + 3 * s),
                 data=CIFAR10)
    make_run(runs, "other", curve=(30.0,), data=CIFAR100)
    tables = collect([runs])
    fig = curves_figure(tables)
    assert len(fig.axes) == 2  # one subplot per dataset
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    one = lines["ce resnet20 (n=2)"]
    assert list(one.get_xdata()) == [1] and list(one.get_ydata()) == [52.0] and one.get_marker() not in (None, "None", "")
    assert list(lines["ls resnet20 (n=2)"].get_ydata()) == [40.5, 45.0, 48.5]
    bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    assert len(bands) == 1  # min–max band of the 3-epoch ls runs (epoch 2 has no spread, epochs 1, 3 do)
    errs = [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]
    assert len(errs) == 1  # min–max bar of the one-point ce series
    seg = errs[0].lines[2][0].get_segments()[0]
    assert sorted(seg[:, 1].tolist()) == [50.0, 54.0]
    write_report([runs], tmp_path / "rep")
    assert (tmp_path / "rep" / "curves.png").stat().st_size > 5000


@pytest.mark.slow  # 4 tiny trainings: ~15-35 s on the shared 2-core machine
def test_report_end_to_end_two_methods_trained_through_the_cli(tmp_path, capsys):
    """Two one-epoch sweeps (CE and LS, seeds 0 and 1) → `nkd report` with --baseline: the paired Δ in
    report.json is the per-seed difference of the runs' own summaries."""
    for method in ("ce", "ls"):
        cfg = write_config(tmp_path / f"{method}.yaml", output_dir=str(tmp_path / "sw" / method),
                           method={"name": method}, schedule={"name": "constant", "epochs": 1},
                           data={"synthetic_samples": 32, "num_workers": 0})
        assert cli_main(["sweep", cfg, "--seeds", "0,1", "--workers", "1"]) == 0
    capsys.readouterr()
    out = tmp_path / "rep"
    assert cli_main(["report", str(tmp_path / "sw"), "--out", str(out), "--baseline", "ls", "--title", "T"]) == 0
    md = capsys.readouterr().out
    assert row_of(md, "ls resnet8")[4] == "ref"
    last = {(m, s): json.loads((tmp_path / "sw" / m / f"seed{s}" / "summary.json").read_text())["last_top1"]
            for m in ("ce", "ls") for s in (0, 1)}
    rep = json.loads((out / "report.json").read_text())
    assert rep["title"] == "T" and len(rep["tables"]) == 1
    ce = next(r for r in rep["tables"][0]["rows"] if r["method"] == "ce")
    assert ce["n"] == 2 and ce["paired_last_top1"]["seeds"] == [0, 1]
    assert ce["paired_last_top1"]["values"] == pytest.approx([last["ce", s] - last["ls", s] for s in (0, 1)])
    assert (out / "accuracy.png").is_file() and (out / "curves.png").is_file()


def test_bad_summaries_are_a_clear_error(tmp_path, capsys):
    run = make_run(tmp_path / "runs", "nan", curve=(50.0,), data=CIFAR10)
    s = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**s, "last_top1": float("nan")}))
    assert cli_main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 2
    assert "last_top1 must be a finite number or null, got nan" in capsys.readouterr().err
    (run / "summary.json").write_text(json.dumps({k: v for k, v in s.items() if k != "method"}))
    with pytest.raises(ReportError, match="missing method"):
        collect([tmp_path / "runs"])
    assert not (tmp_path / "rep" / "report.md").exists()
