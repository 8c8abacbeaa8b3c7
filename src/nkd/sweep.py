"""Run one config over several seeds, in parallel processes where the cores allow."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path


def _run_one(config: str | None, overrides: list[str], threads: int, resume: bool, overwrite: bool) -> dict:
    import torch

    torch.set_num_threads(threads)
    from .config import load_config
    from .engine import Trainer

    cfg = load_config(config, overrides, check_files=True)
    return Trainer(cfg, resume=resume, overwrite=overwrite).fit()


def run_many(jobs: list[tuple[str | None, list[str]]], workers: int | None = None, desc: str | None = None,
             resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Run ``(config, overrides)`` jobs; ``workers`` processes with ``cores / workers`` threads each.

    With ``desc`` a progress bar counts finished runs. ``resume`` / ``overwrite`` as for
    :class:`nkd.engine.Trainer` (a finished run resumed is not retrained; it only re-reports).
    """
    from tqdm import tqdm

    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, len(jobs), cores))
    bar = tqdm(total=len(jobs), desc=desc, unit="run", disable=desc is None, dynamic_ncols=True)
    if workers == 1:
        results = []
        for c, o in jobs:
            results.append(_run_one(c, o, max(1, cores), resume, overwrite))
            bar.update(1)
        bar.close()
        return results
    threads = max(1, cores // workers)
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
        futures = [ex.submit(_run_one, c, o, threads, resume, overwrite) for c, o in jobs]
        for _ in as_completed(futures):
            bar.update(1)
        bar.close()
        return [f.result() for f in futures]


def sweep(config: str, seeds: list[int], overrides: list[str], workers: int | None = None, resume: bool = False,
          overwrite: bool = False) -> list[Path]:
    """Train ``config`` once per seed into ``<output_dir>/seed<k>``; returns the run directories.

    Without ``resume`` / ``overwrite``, seed folders that already hold checkpoints are a ValueError
    raised before any run starts."""
    from .config import load_config
    from .engine.checkpoint import used_run_dir_error

    base = load_config(config, overrides)  # validate once, before any process starts
    dirs = [Path(base.output_dir) / f"seed{s}" for s in seeds]
    used = [e for e in map(used_run_dir_error, dirs) if e] if not (resume or overwrite) else []
    if used:
        raise ValueError("; ".join(used))
    jobs = [(config, [*overrides, f"seed={s}", f"output_dir={d}", "train.progress=false",
                       "train.console=false"]) for s, d in zip(seeds, dirs)]
    run_many(jobs, workers, desc=f"{Path(config).stem}: {len(seeds)} seeds", resume=resume, overwrite=overwrite)
    return dirs
