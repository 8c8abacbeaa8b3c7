"""Aggregate finished runs into comparison tables (one per dataset), ``report.json`` and figures.

A run is any directory holding ``summary.json`` (and ``metrics.jsonl``, one line per epoch), as
the Trainer writes them. Runs are grouped into **rows** by

    (data settings, method, student, teacher, method params, epochs, label)

and the runs of a row are its seeds. Rows are split into one **table per data setting** (the
summary's ``data`` dict: dataset name, root, train subset, image size, classes). A report that
spans several datasets or data settings is *split*, never refused and never averaged across:
each table has its own heading and its own reference row. Summaries written before nkd recorded
``data`` form one table of their own, with a note that their data settings are unknown.

A row is named by the run's ``label`` when it has one, else ``method student ← teacher``; rows
that would share a name get the settings they differ in appended, e.g.
``nkd resnet20 ← resnet56 (temperature=1, gamma=1.5)``. Rows follow :func:`method_order` — the
method registry's order: teacher methods, logit baselines, self-KD (unknown methods after), then name.

For a row with values :math:`x_1..x_n` over seeds the table shows :math:`\\bar x \\pm s`,
:math:`s` the sample standard deviation (:math:`n-1` in the denominator); a single run is shown
as ``x (n=1)``, never ``± 0.00``. The paired difference to the table's reference row :math:`r`
(the first row, or the one ``baseline`` names) is taken over the seeds :math:`S` both rows ran:

    d_s = x_s - r_s  (s ∈ S),   Δ = mean(d) ± std(d)  (n = |S|)

for the last-epoch and for the best-epoch test top-1. Pairing removes the seed-to-seed noise the
two rows share (same data order and initialisation), which unpaired means ± std do not. Several
runs of one seed in a row (e.g. repeated runs) are averaged per seed for the pairing, and noted.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def method_order() -> list[str]:
    """The method names in registration order (:data:`nkd.methods.METHODS`); imported lazily so that
    reading reports does not import torch until a table is built."""
    from .methods import METHODS

    return list(METHODS)
KEYS = ("best_top1", "last_top1")
LM_KEYS = ("perplexity",)  # language-model runs (nkd lm train): validation perplexity, lower is better


class ReportError(ValueError):
    """Runs or report options that cannot make a sound table (bad ``summary.json``, ``--baseline``)."""


# ----------------------------------------------------------------------------- statistics
@dataclass
class Stat:
    """Mean ± sample std of ``values``; ``std`` is None for fewer than two values."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def cell(self, sign: bool = False, show_n: bool = False) -> str:
        if not self.values:
            return "—"
        f = "+.2f" if sign else ".2f"
        if self.n == 1:
            return f"{self.mean:{f}} (n=1)"
        return f"{self.mean:{f}} ± {self.std:.2f}" + (f" (n={self.n})" if show_n else "")

    def to_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


@dataclass
class Paired(Stat):
    """Per-seed differences ``row - reference`` over the seeds both rows ran."""

    seeds: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "seeds": self.seeds}


# ----------------------------------------------------------------------------- runs and rows
@dataclass
class Group:
    """One row: the runs (seeds) that share data settings, method, models, params, epochs and label."""

    name: str
    method: str
    student: str
    teacher: str | None
    params: dict[str, Any]
    epochs: int | None
    label: str | None
    data: dict[str, Any] | None
    runs: list[dict] = field(default_factory=list)
    curves: list[list[tuple[int, float]]] = field(default_factory=list)  # per run: (epoch, test top-1)

    @property
    def base(self) -> str:
        if self.label:
            return self.label
        return f"{self.method} {self.student}" + (f" ← {self.teacher}" if self.teacher else "")

    def values(self, key: str) -> Stat:
        return Stat([float(r[key]) for r in self.runs if r.get(key) is not None])

    def stat(self, key: str) -> tuple[float, float]:
        """(mean, std) of ``key`` over the runs; NaN where undefined (no value; std of one run)."""
        s = self.values(key)
        return (math.nan if s.mean is None else s.mean), (math.nan if s.std is None else s.std)

    def per_seed(self, key: str) -> dict[int, float]:
        by: dict[int, list[float]] = {}
        for r in self.runs:
            if r.get(key) is not None:
                by.setdefault(r["seed"], []).append(float(r[key]))
        return {s: statistics.fmean(v) for s, v in sorted(by.items())}

    def paired(self, ref: Group, key: str) -> Paired:
        a, b = self.per_seed(key), ref.per_seed(key)
        seeds = sorted(set(a) & set(b))
        return Paired([a[s] - b[s] for s in seeds], seeds=seeds)

    @property
    def train_subset(self) -> int | None:
        return (self.data or {}).get("train_subset")


@dataclass
class Table:
    """The rows of one data setting; ``reference`` is the row the paired differences are taken to."""

    data: dict[str, Any] | None
    groups: list[Group]
    reference: Group

    @property
    def heading(self) -> str:
        return data_heading(self.data)


def _machine_text(m: Any) -> str:
    if not isinstance(m, dict):
        return "not recorded (runs of an older nkd)"
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ""
    return f"{m.get('cpu', '?')}, {m.get('threads', '?')} threads, torch {m.get('torch', '?')}{gpu}"


def skipped_runs(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """Run directories under ``paths`` that the report leaves out (no ``summary.json`` yet), each
    with why: still training (its lock held) or stopped before the end."""
    import json as _json

    out = []
    for p in map(Path, paths):
        if not p.exists():
            continue
        for cfg in sorted(p.rglob("config.yaml")):
            run = cfg.parent
            if (run / "summary.json").is_file() or not (run / "train.log").is_file():
                continue
            why = "stopped before its last epoch (no summary.json): continue it with --resume"
            lock = run / ".nkd.lock"
            if lock.is_file():
                try:
                    owner = _json.loads(lock.read_text())
                    why = f"still training (locked by pid {owner.get('pid')} on host {owner.get('host')})"
                except (OSError, ValueError):
                    why = "still training (locked)"
            out.append((run, why))
    return out


def find_runs(paths: list[str | Path]) -> list[Path]:
    runs: dict[Path, Path] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"run directory not found: {p}")
        for q in sorted(p.rglob("summary.json")):
            runs.setdefault(q.parent.resolve(), q.parent)  # overlapping arguments list a run once
    if not runs:
        raise FileNotFoundError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return list(runs.values())


def _load(run: Path) -> tuple[dict, list[tuple[int, float]]]:
    try:
        s = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ReportError(f"{run / 'summary.json'}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except json.JSONDecodeError as e:
        raise ReportError(f"{run / 'summary.json'}: not valid JSON ({e})") from e
    if not isinstance(s, dict):
        raise ReportError(f"{run / 'summary.json'}: expected a JSON object, got {type(s).__name__}")
    missing = [k for k in ("method", "student", "seed") if k not in s]
    if missing:
        raise ReportError(f"{run / 'summary.json'}: missing {', '.join(missing)} (not an nkd run summary?)")
    for k in KEYS + LM_KEYS:
        v = s.get(k)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
            raise ReportError(f"{run / 'summary.json'}: {k} must be a finite number or null, got {v!r}")
    curve = []
    metrics = run / "metrics.jsonl"
    if metrics.is_file():
        try:
            lines = metrics.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ReportError(f"{metrics}: not UTF-8 text (byte {e.start}: {e.reason})") from e
        for i, line in enumerate(lines):
            try:
                row = json.loads(line) if line.strip() else {}
            except json.JSONDecodeError as e:
                raise ReportError(f"{metrics}: line {i + 1} is not valid JSON ({e})") from e
            if row.get("top1") is not None:
                curve.append((int(row.get("epoch", i + 1)), float(row["top1"])))
    return s, curve


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def params_text(params: dict[str, Any]) -> str:
    """All resolved method parameters, in the method's own order: ``temperature=4, ce_weight=0.1``."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) or "—"


def data_heading(data: dict[str, Any] | None) -> str:
    if data is None:
        return "data settings not recorded"
    rest = [f"{k}={_fmt(v)}" for k, v in data.items() if k != "name" and v is not None]
    return f"{data.get('name', '?')}" + (f" ({', '.join(rest)})" if rest else "")


def _differing(descs: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for d in descs for k in d))
    return [k for k in keys if len({json.dumps(d.get(k), sort_keys=True) for d in descs}) > 1]


def _name_rows(groups: list[Group]) -> None:
    """Row name = label or ``method student ← teacher``, plus what tells apart rows that would share it."""
    buckets: dict[str, list[Group]] = {}
    for g in groups:
        buckets.setdefault(g.base, []).append(g)
    for base, gs in buckets.items():
        if len(gs) == 1:
            gs[0].name = base
            continue
        descs = [{**g.params, "epochs": g.epochs, "method": g.method, "student": g.student, "teacher": g.teacher,
                  "label": g.label} for g in gs]
        keys = _differing(descs)
        for g, d in zip(gs, descs):
            g.name = f"{base} ({', '.join(f'{k}={_fmt(d.get(k))}' for k in keys)})"
    seen: dict[str, int] = {}
    for g in groups:  # last resort, should the appended settings still coincide
        seen[g.name] = seen.get(g.name, 0) + 1
        if seen[g.name] > 1:
            g.name = f"{g.name} #{seen[g.name]}"


def _pick_reference(groups: list[Group], baseline: str | None, heading: str) -> Group:
    if baseline is None:
        return groups[0]
    exact = [g for g in groups if g.name == baseline or g.label == baseline]
    # otherwise whole words, any case: "kd resnet8x4" is in "kd resnet8x4 ← resnet32x4", not in "nkd resnet8x4 ..."
    words = re.compile(rf"(?<!\w){re.escape(baseline)}(?!\w)", re.IGNORECASE)
    hits = exact or [g for g in groups if words.search(g.name)]
    if len(hits) != 1:
        rows = "; ".join(g.name for g in (hits or groups))
        what = f"matches {len(hits)} rows" if hits else "matches no row"
        raise ReportError(f"--baseline {baseline!r} {what} of the table for {heading} (it must match exactly one; "
                          f"{'matching' if hits else 'rows'}: {rows})")
    return hits[0]


def collect(paths: list[str | Path], baseline: str | None = None) -> list[Table]:
    """Read the runs under ``paths`` into one :class:`Table` per data setting (see the module doc).

    ``baseline``: a row name or label, or a case-insensitive part of one made of whole words, that
    must match exactly one row of every table (an exact match wins over partial ones); it becomes the
    reference of the paired differences. Default: each table's first row. ReportError otherwise.
    """
    groups: dict[str, Group] = {}
    for run in find_runs(paths):
        s, curve = _load(run)
        data, params, label = s.get("data"), s.get("method_params") or {}, s.get("label") or None
        key = json.dumps([data, s["method"], s["student"], s.get("teacher"), params, s.get("epochs"), label], sort_keys=True)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group("", s["method"], s["student"], s.get("teacher"), params, s.get("epochs"), label, data)
        g.runs.append({**s, "dir": str(run)})
        g.curves.append(curve)
    order = {m: i for i, m in enumerate(method_order())}
    by_data: dict[str, list[Group]] = {}
    for g in groups.values():
        by_data.setdefault(json.dumps(g.data, sort_keys=True), []).append(g)
    tables = []
    for gs in by_data.values():
        _name_rows(gs)
        gs.sort(key=lambda g: (order.get(g.method, len(order)), g.method, g.name))
        tables.append(Table(gs[0].data, gs, _pick_reference(gs, baseline, data_heading(gs[0].data))))
    tables.sort(key=lambda t: (t.data is None, t.heading))
    return tables


# ----------------------------------------------------------------------------- markdown + json
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table_md(t: Table) -> str:
    subset = any(g.train_subset is not None for g in t.groups)
    lm = [k for k in LM_KEYS if any(r.get(k) is not None for g in t.groups for r in g.runs)]
    head = ["run", "seeds", "best top-1", "last top-1", "Δ best (paired)", "Δ last (paired)"]
    head += [x for k in lm for x in (k, f"Δ {k} (paired)")] + ["hyper-parameters"]
    head += ["train subset"] * subset + ["epochs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in t.groups:
        if g is t.reference:
            deltas = ["ref", "ref"]
        else:
            deltas = [g.paired(t.reference, k).cell(sign=True, show_n=True) for k in KEYS]
            deltas = [d if d != "—" else "— (no shared seed)" for d in deltas]
        extra = []
        for k in lm:
            d = "ref" if g is t.reference else g.paired(t.reference, k).cell(sign=True, show_n=True)
            extra += [g.values(k).cell(), d if d != "—" else "— (no shared seed)"]
        cells = [g.name, str(len(g.runs)), *(g.values(k).cell() for k in KEYS), *deltas, *extra, params_text(g.params)]
        cells += [_fmt(g.train_subset) if g.train_subset is not None else "all"] * subset
        cells += [_fmt(g.epochs) if g.epochs is not None else "?"]
        lines.append("| " + " | ".join(map(_cell, cells)) + " |")
    return "\n".join(lines)


def table(tables: list[Table]) -> str:
    """Markdown: one headed table per data setting."""
    parts = []
    for t in tables:
        parts += [f"## {t.heading}", "", f"Paired differences (Δ) are to **{_cell(t.reference.name)}**.", "", _table_md(t), ""]
    return "\n".join(parts).rstrip() + "\n"


def notes(tables: list[Table]) -> list[str]:
    out = []
    for t in tables:
        if t.data is None:
            out.append(f"{sum(len(g.runs) for g in t.groups)} runs have no data settings in summary.json (written "
                       "before nkd recorded them); they are grouped together and may mix datasets or training subsets.")
        for g in t.groups:
            seeds = [r["seed"] for r in g.runs]
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            if dup:
                out.append(f"{g.name} ({t.heading}) has several runs of seed(s) {dup}: they count as separate runs in "
                           "mean ± std and are averaged per seed for the paired difference.")
    return out


def report_json(tables: list[Table], title: str) -> dict[str, Any]:
    def row(t: Table, g: Group) -> dict[str, Any]:
        return {
            "name": g.name, "label": g.label, "method": g.method, "student": g.student, "teacher": g.teacher,
            "method_params": g.params, "epochs": g.epochs, "train_subset": g.train_subset,
            "seeds": [r["seed"] for r in g.runs], "n": len(g.runs), "reference": g is t.reference,
            **{k: g.values(k).to_json() for k in KEYS + LM_KEYS if k in KEYS or g.values(k).n},
            **{f"paired_{k}": None if g is t.reference else g.paired(t.reference, k).to_json() for k in KEYS},
            "runs": [r["dir"] for r in g.runs],
        }

    return {"format": "nkd-report-v1", "title": title, "notes": notes(tables),
            "tables": [{"data": t.data, "heading": t.heading, "reference": t.reference.name,
                        "rows": [row(t, g) for g in t.groups]} for t in tables]}


# ----------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_figure(tables: list[Table]):
    """Per table: bars of best / last top-1 (mean; error bar ±std only where n > 1) on an axis from 0,
    and beside them the paired Δ last top-1 to the reference (each seed a dot, mean ± std a bar).

    The accuracy axis starts at 0 because a bar's length is its value: an axis cut at 92 made
    0.5-point gaps look several-fold. Differences are read in the right-hand panel instead, which
    is centred on 0 and shows them paired over seeds.
    """
    plt = _pyplot()
    width = max(6.0, 0.9 * max(len(t.groups) for t in tables))
    fig, axes = plt.subplots(len(tables), 2, figsize=(2 * width, 4.2 * len(tables)), squeeze=False)
    for t, (ax, dax) in zip(tables, axes):
        xs = list(range(len(t.groups)))
        names = [g.name for g in t.groups]
        for key, off, what in (("best_top1", -0.2, "best epoch"), ("last_top1", 0.2, "last epoch")):
            stats = [g.values(key) for g in t.groups]
            bars = ax.bar([x + off for x in xs], [s.mean if s.mean is not None else 0.0 for s in stats], width=0.4,
                          label=what)
            ax.bar_label(bars, fmt="%.1f", label_type="center", fontsize=6, color="white")
            spread = [(x + off, s.mean, s.std) for x, s in zip(xs, stats) if s.std is not None]
            if spread:
                ax.errorbar([p[0] for p in spread], [p[1] for p in spread], yerr=[p[2] for p in spread], fmt="none",
                            ecolor="black", capsize=3, lw=1)
        ax.set_ylim(0, 110)  # 100-110: room for the legend above any bar
        ax.set_yticks(range(0, 101, 20))
        ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("test top-1 (%): mean, ±std where n > 1")
        ax.set_title(textwrap.fill(t.heading, 70), fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=2)

        dax.axhline(0.0, color="grey", lw=1)
        for x, g in zip(xs, t.groups):
            if g is t.reference:
                continue
            p = g.paired(t.reference, "last_top1")
            if not p.values:
                continue
            dax.scatter([x] * p.n, p.values, s=12, color="tab:blue", alpha=0.5)
            dax.errorbar([x], [p.mean], yerr=None if p.std is None else [p.std], fmt="D", color="black", capsize=4,
                         ms=5)
        dax.set_xticks(xs, [f"{n} (ref)" if g is t.reference else n for n, g in zip(names, t.groups)], rotation=30,
                       ha="right", fontsize=7)
        dax.set_xlim(-0.5, len(xs) - 0.5)
        dax.set_ylabel("Δ last top-1 (points)")
        dax.set_title(textwrap.fill(f"paired Δ to {t.reference.name}: dots = seeds, ◆ = mean ± std", 70), fontsize=9)
    fig.tight_layout()
    return fig


def curves_figure(tables: list[Table]):
    """Per table: test top-1 per evaluated epoch, mean over seeds with a min–max band (an error bar
    where a series has one point); markers where a series has few points, so a single point shows.
    At each epoch the statistics are over the runs that evaluated it."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(tables), 1, figsize=(8, 4.2 * len(tables)), squeeze=False)
    for t, (ax,) in zip(tables, axes):
        for g in t.groups:
            by: dict[int, list[float]] = {}
            for curve in g.curves:
                for e, v in curve:
                    by.setdefault(e, []).append(v)
            if not by:
                continue
            xs = sorted(by)
            mean = [statistics.fmean(by[e]) for e in xs]
            lo, hi = [min(by[e]) for e in xs], [max(by[e]) for e in xs]
            marker = "o" if len(xs) <= 30 else None
            (line,) = ax.plot(xs, mean, marker=marker, ms=5 if len(xs) == 1 else 3, label=f"{g.name} (n={len(g.runs)})")
            if len(xs) == 1:
                if hi[0] > lo[0]:
                    ax.errorbar(xs, mean, yerr=[[mean[0] - lo[0]], [hi[0] - mean[0]]], fmt="none",
                                ecolor=line.get_color(), capsize=4)
            elif any(h > low for h, low in zip(hi, lo)):
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(textwrap.fill(f"{t.heading}: mean over seeds, band = min–max", 90), fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figures(tables: list[Table], out: Path) -> list[Path]:
    """Write ``accuracy.png`` and ``curves.png`` (see :func:`accuracy_figure`, :func:`curves_figure`)."""
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in (("accuracy", accuracy_figure), ("curves", curves_figure)):
        fig = make(tables)
        paths.append(out / f"{name}.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def write_report(paths: list[str | Path], out: str | Path, title: str = "nkd report", preamble: str = "",
                 baseline: str | None = None) -> str:
    """Write ``out/report.md``, ``out/report.json`` (the same numbers) and, where matplotlib is
    installed, ``accuracy.png`` and ``curves.png``; return the markdown tables."""
    tables = collect(paths, baseline)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        figs = figures(tables, out)
    except ImportError:
        figs = []
    tab = table(tables)
    md = [f"# {title}", ""] + ([preamble, ""] if preamble else []) + [
        tab,
        "best = best test top-1 over the evaluated epochs; last = test top-1 after the final epoch; mean ± std "
        "(sample std) over seeds, a single run shown as (n=1). Δ = per-seed difference to the reference row over the "
        "seeds both ran, mean ± std (n = shared seeds). hyper-parameters = the method's resolved parameters.", ""]
    md += [f"- Note: {n}" for n in notes(tables)] + ([""] if notes(tables) else [])
    md += [f"![{p.stem}]({p.name})" for p in figs] + ([] if figs else ["(figures skipped: matplotlib not installed)"])
    machines = sorted({_machine_text(r.get("machine")) for t in tables for g in t.groups for r in g.runs})
    md += ["", "Machines: " + "; ".join(machines) + ". On one machine with the same thread count the numbers "
           "repeat bitwise; on another CPU model they differ within seed noise.", ""]
    skipped = skipped_runs(paths)
    if skipped:
        md += ["Skipped (not finished):", ""] + [f"- `{d}`: {why}" for d, why in skipped] + [""]
    md += ["", "Runs:", ""]
    for t in tables:
        md += [f"- `{r['dir']}` ({g.name}, seed {r['seed']}; {t.heading})" for g in t.groups for r in g.runs]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.json").write_text(json.dumps(report_json(tables, title), indent=2) + "\n")
    return tab
