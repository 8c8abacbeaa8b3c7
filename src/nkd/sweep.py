"""Run configs over several seeds, in parallel processes where the cores allow.

``nkd sweep A.yaml [B.yaml …] --seeds 0,1,2`` trains every config once per seed into
``<its output_dir>/seed<k>``. With ``--share-teacher``, the runs of one seed whose configs agree
on what decides the batches and the teacher output (see
:func:`nkd.engine.trainer.shared_settings`) train in one process, in lockstep: one data
pipeline and one teacher forward per batch for all of them; runs that cannot share are listed
with the keys that differ and train on their own.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Job:
    """One run: a config file (or None for defaults) and its ``key=value`` overrides."""

    config: str | None
    overrides: list[str]


def _run_group(jobs: list[Job], threads: int, resume: bool, overwrite: bool, allow_changes: bool) -> list[dict]:
    import torch

    from .config import load_config
    from .engine import Trainer
    from .engine.faults import Faults

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfgs = [load_config(j.config, j.overrides, check_files=True) for j in jobs]
        trainer = Trainer(cfgs[0] if len(cfgs) == 1 else cfgs, resume=resume, overwrite=overwrite,
                          allow_changes=allow_changes, faults=Faults.from_env())
        out = trainer.fit()
    finally:  # run in this process (one worker): leave its thread count as it was
        torch.set_num_threads(before)
    return [out] if len(cfgs) == 1 else out


def run_groups(groups: list[list[Job]], workers: int | None = None, desc: str | None = None, resume: bool = False,
               overwrite: bool = False, allow_changes: bool = False) -> list[dict]:
    """Train each group of jobs in one process (a group of one is an ordinary run); ``workers``
    processes with ``cores / workers`` threads each (at most ``OMP_NUM_THREADS`` when that is
    set; a config's ``train.threads`` wins). With ``desc`` a progress bar counts finished
    groups. Returns the summaries in job order."""
    from tqdm import tqdm

    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(groups), cores))
    threads = max(1, cores // workers)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    bar = tqdm(total=len(groups), desc=desc, unit="run", disable=desc is None, dynamic_ncols=True)
    args = (resume, overwrite, allow_changes)
    if workers == 1:
        results = []
        for g in groups:
            results.append(_run_group(g, threads, *args))
            bar.update(1)
        bar.close()
        return [s for r in results for s in r]
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        futures = [ex.submit(_run_group, g, threads, *args) for g in groups]
        for _ in as_completed(futures):
            bar.update(1)
        bar.close()
        return [s for f in futures for s in f.result()]


def run_many(jobs: list[tuple[str | None, list[str]]], workers: int | None = None, desc: str | None = None,
             resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Run ``(config, overrides)`` jobs, each on its own (see :func:`run_groups`)."""
    return run_groups([[Job(c, list(o))] for c, o in jobs], workers, desc, resume, overwrite)


def plan(configs: list[str], seeds: list[int], overrides: list[str], share_teacher: bool
         ) -> tuple[list[list[Job]], list[Path], list[str]]:
    """The groups to train, every run directory, and notes on runs that could not share.

    Raises ``ValueError`` (before anything runs) when two runs would write the same directory."""
    from .config import load_config
    from .engine.trainer import differences

    entries = []  # (job, cfg)
    for config in configs:
        base = load_config(config, overrides)  # validate once, before any process starts
        for s in seeds:
            d = Path(base.output_dir) / f"seed{s}"
            ov = [*overrides, f"seed={s}", f"output_dir={d}", "train.progress=false", "train.console=false"]
            entries.append((Job(config, ov), load_config(config, ov)))
    seen: dict[str, str] = {}
    for job, cfg in entries:
        d = os.path.abspath(cfg.output_dir)
        if d in seen and seen[d] != job.config:
            raise ValueError(f"{seen[d]} and {job.config} both write {cfg.output_dir}: give them different output_dir")
        if d in seen:
            raise ValueError(f"{job.config} is listed twice")
        seen[d] = job.config
    dirs = [Path(cfg.output_dir) for _, cfg in entries]
    if not share_teacher:
        return [[job] for job, _ in entries], dirs, []
    groups: list[list[tuple[Job, object]]] = []
    for job, cfg in entries:
        home = next((g for g in groups if not differences(g[0][1], cfg)), None)
        if home is None:
            groups.append([(job, cfg)])
        else:
            home.append((job, cfg))
    notes = []
    for g in groups:
        if len(g) == 1:
            cfg = g[0][1]
            peers = [h[0][1] for h in groups if h is not g and h[0][1].seed == cfg.seed]
            if peers:
                why = min((differences(p, cfg) for p in peers), key=len)
                notes.append(f"{cfg.output_dir} trains on its own: it differs from the other runs of seed {cfg.seed} "
                             f"in " + "; ".join(f"{k} ({a!r} vs {b!r})" for k, (a, b) in why.items()))
    return [[job for job, _ in g] for g in groups], dirs, notes


def sweep(configs: str | list[str], seeds: list[int], overrides: list[str], workers: int | None = None,
          resume: bool = False, overwrite: bool = False, share_teacher: bool = False, allow_changes: bool = False,
          log=print) -> list[Path]:
    """Train every config once per seed into ``<output_dir>/seed<k>``; returns the run directories.

    Without ``resume`` / ``overwrite``, seed folders that already hold checkpoints are a ValueError
    raised before any run starts."""
    from .engine.checkpoint import used_run_dir_error

    configs = [configs] if isinstance(configs, str) else list(configs)
    groups, dirs, notes = plan(configs, seeds, overrides, share_teacher)
    used = [e for e in map(used_run_dir_error, dirs) if e] if not (resume or overwrite) else []
    if used:
        raise ValueError("; ".join(used))
    for note in notes:
        log(f"nkd sweep: {note}")
    shared = sum(len(g) for g in groups if len(g) > 1)
    desc = f"{len(dirs)} runs" + (f", {shared} of them in {sum(len(g) > 1 for g in groups)} lockstep groups"
                                  if shared else "")
    run_groups(groups, workers, desc=desc, resume=resume, overwrite=overwrite, allow_changes=allow_changes)
    return dirs
