"""benchmarks/lm_distill.py --quick: the LM demonstration runs end to end on the standard library
(tokenizer, teacher, CE/KD/NKD students over 3 seeds, report and curves)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

import procs

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "lm_distill.py"), "--quick", "--seeds", "0,1,2",
           "--out", str(out), "--cache", str(cache)]
    res = procs.run(cmd, capture_output=True)
    assert res.returncode == 0, res.stderr[-3000:]
    report = (out / "report.md").read_text()
    for row in ("| teacher (CE) | 1 |", "| ce student | 3 |", "| kd student | 3 |", "| nkd student | 3 |"):
        assert row in report
    assert (out / "curves.png").stat().st_size > 10_000
    results = json.loads((out / "results.json").read_text())
    vocab = results["setup"]["vocab"]
    teacher = results["teacher"]["history"]
    assert teacher[-1]["val_ppl"] < teacher[0]["val_ppl"] < vocab * 2  # the teacher learned something
    assert len(results["students"]) == 9
    for run in results["students"]:
        hist = run["history"]
        assert all(math.isfinite(h["val_ppl"]) and 0 <= h["val_acc"] <= 100 for h in hist)
        assert hist[-1]["val_ppl"] < vocab  # better than a uniform guess
    # the cached tokenizer, token arrays and teacher are reused by a second call
    assert len(list(cache.glob("teacher-*.pt"))) == 1 and len(list(cache.glob("tokenizer-*.json"))) == 1
