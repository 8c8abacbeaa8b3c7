"""Aggregate finished runs into a table (mean ± std over seeds; best and last epoch) and figures.

A run is any directory holding ``summary.json`` and ``metrics.jsonl`` (what the Trainer writes).
Runs are grouped by label = method + student (+ teacher) + method parameters; seeds are the
group's members. Parameters appear in a label only where runs of the same method and models
differ in them (a hyper-parameter sweep), e.g. ``nkd resnet20 ← resnet56 (temperature=1, gamma=1.5)``.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

METHOD_ORDER = ["ce", "kd", "dkd", "nkd", "ls", "zipf_ls", "tfkd", "uskd"]


@dataclass
class Group:
    label: str
    method: str
    runs: list[dict] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float]:
        vals = [r[key] for r in self.runs if r.get(key) is not None]
        if not vals:
            return math.nan, math.nan
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def find_runs(paths: list[str | Path]) -> list[Path]:
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"run directory not found: {p}")
        runs += sorted(q.parent for q in p.rglob("summary.json"))
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return runs


def label_of(summary: dict) -> str:
    base = f"{summary['method']} {summary['student']}"
    return f"{base} ← {summary['teacher']}" if summary.get("teacher") else base


def _differing(params: list[dict]) -> list[str]:
    keys = sorted({k for p in params for k in p})
    return [k for k in keys if len({json.dumps(p.get(k)) for p in params}) > 1]


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def collect(paths: list[str | Path]) -> list[Group]:
    runs = [(run, json.loads((run / "summary.json").read_text())) for run in find_runs(paths)]
    by_base: dict[str, list[dict]] = {}
    for _, s in runs:
        by_base.setdefault(label_of(s), []).append(s.get("method_params") or {})
    shown = {base: _differing(ps) for base, ps in by_base.items()}
    groups: dict[str, Group] = {}
    for run, s in runs:
        base, params = label_of(s), s.get("method_params") or {}
        keys = shown[base]
        label = f"{base} ({', '.join(f'{k}={_fmt(params.get(k))}' for k in keys)})" if keys else base
        g = groups.setdefault(label, Group(label, s["method"]))
        g.runs.append({**s, "dir": str(run)})
        curve = [r["top1"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "top1" in r]
        g.curves.append(curve)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(groups.values(), key=lambda g: (order.get(g.method, len(order)), g.label))


def table(groups: list[Group]) -> str:
    lines = ["| run | seeds | best top-1 (mean ± std) | last top-1 (mean ± std) |", "|---|---|---|---|"]
    for g in groups:
        bm, bs = g.stat("best_top1")
        lm, ls = g.stat("last_top1")
        lines.append(f"| {g.label} | {len(g.runs)} | {bm:.2f} ± {bs:.2f} | {lm:.2f} ± {ls:.2f} |")
    return "\n".join(lines)


def figures(groups: list[Group], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups)), 4))
    xs = range(len(groups))
    for key, off, name in (("best_top1", -0.2, "best epoch"), ("last_top1", 0.2, "last epoch")):
        means = [g.stat(key)[0] for g in groups]
        stds = [g.stat(key)[1] for g in groups]
        ax.bar([x + off for x in xs], means, width=0.4, yerr=stds, capsize=3, label=name)
    lo = min(g.stat("last_top1")[0] - 2 * g.stat("last_top1")[1] for g in groups)
    ax.set_ylim(max(0, lo - 2), 100)
    ax.set_xticks(list(xs), [g.label for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("accuracy per method (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    paths.append(out / "accuracy.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for g in groups:
        n = min(len(c) for c in g.curves)
        if n == 0:
            continue
        mean = [statistics.fmean(c[i] for c in g.curves) for i in range(n)]
        ax.plot(range(1, n + 1), mean, label=g.label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("test accuracy per epoch (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_report(paths: list[str | Path], out: str | Path, title: str = "nkd report", preamble: str = "") -> str:
    """Write ``out/report.md`` (+ ``accuracy.png``, ``curves.png``); return the table."""
    groups = collect(paths)
    out = Path(out)
    figs = figures(groups, out)
    tab = table(groups)
    md = [f"# {title}", "", preamble, "", tab, "",
          "best = best test top-1 over epochs; last = test top-1 after the final epoch.", ""]
    md += [f"![{p.stem}]({p.name})" for p in figs]
    md += ["", "Runs:", ""] + [f"- `{r['dir']}` (seed {r['seed']})" for g in groups for r in g.runs]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return tab
