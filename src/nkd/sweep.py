"""Run configs over several seeds, in parallel processes where the cores allow.

``nkd sweep A.yaml [B.yaml …] --seeds 0,1,2`` trains every config once per seed into
``<its output_dir>/seed<k>``. With ``--share-teacher``, the runs of one seed whose configs agree
on what decides the batches and the teacher output (see
:func:`nkd.engine.trainer.shared_settings`) train in one process, in lockstep: one data
pipeline and one teacher forward per batch for all of them; runs that cannot share are listed
with the keys that differ and train on their own.

The sweep owns its worker processes: they die with it (``kill -9`` included: each saves
``last.pt`` after its step, as a single run does on SIGTERM), a SIGTERM to the sweep is passed
on to them, and a worker that dies stops only its own runs — the sweep names every run that did
not finish (:class:`SweepIncomplete`) and ``--resume`` continues them.
"""

from __future__ import annotations

import os
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


class SweepIncomplete(RuntimeError):
    """Some runs of a sweep did not finish (stopped by a signal, killed, or failed); the others
    did. ``stopped``: ``(run directories, why)`` per group; ``summaries``: the finished runs';
    ``signal``: the stop signal the sweep itself got, if any; ``code``: the exit status to give."""

    def __init__(self, stopped: list[tuple[list[str], str]], summaries: list[dict], signum: int | None = None,
                 not_started: list[str] | None = None, bad_input: bool = False):
        self.stopped, self.summaries, self.signal = stopped, summaries, signum
        self.not_started = not_started or []
        self.code = 128 + signum if signum else (2 if bad_input else 1)
        runs = sum(len(d) for d, _ in stopped)
        parts = [f"{runs} run{'s' if runs != 1 else ''} did not finish: "
                 + "; ".join(f"{', '.join(d)} ({why})" for d, why in stopped)] if stopped else []
        if self.not_started:
            parts.append(f"{len(self.not_started)} not started: {', '.join(self.not_started)}")
        head = f"stopped on {_signame(signum)}: " if signum else ""
        super().__init__(head + "; ".join(parts) + " — continue with --resume")


def _signame(signum: int | None) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except (ValueError, TypeError):
        return f"signal {signum}"


def _die_with_parent(parent: int) -> None:
    """A worker gets SIGTERM when the sweep process dies, even by ``kill -9`` (Linux
    ``PR_SET_PDEATHSIG``): it finishes its step, saves ``last.pt`` and releases its lock, as a
    single run does on SIGTERM."""
    import signal

    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker outlives a killed sweep
        pass
    if os.getppid() != parent:  # the sweep died before the request took effect
        os._exit(128 + signal.SIGTERM)


def _worker(conn, jobs: list[Job], threads: int, args: tuple, parent: int) -> None:
    """One group in its own process; sends ``("done", summaries)`` or ``(kind, why)`` back."""
    import signal
    import sys

    _die_with_parent(parent)
    from .engine import StopRequested
    from .typed import first_line

    code = 0
    try:
        msg = ("done", _run_group(jobs, threads, *args))
    except StopRequested as e:
        msg, code = ("stopped", str(e)), 128 + signal.SIGTERM
    except (ValueError, OSError) as e:  # setup problems (bad checkpoint, data, output dir, lock, resume check)
        msg, code = ("bad input", first_line(e)), 2
    except BaseException as e:  # noqa: BLE001 - reported by the sweep, naming the runs
        msg, code = ("failed", f"{type(e).__name__}: {first_line(e)}"), 1
    try:
        conn.send(msg)
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: nothing left to flush but the pipe


def _group_dirs(jobs: list[Job]) -> list[str]:
    out = []
    for j in jobs:
        d = next((o.split("=", 1)[1] for o in reversed(j.overrides) if o.startswith("output_dir=")), None)
        out.append(d or str(j.config))
    return out


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        return f"its worker was killed by {_signame(-code)}"
    return f"its worker exited with status {code}"


def run_groups(groups: list[list[Job]], workers: int | None = None, desc: str | None = None, resume: bool = False,
               overwrite: bool = False, allow_changes: bool = False) -> list[dict]:
    """Train each group of jobs in one process (a group of one is an ordinary run); ``workers``
    processes with ``cores / workers`` threads each (at most ``OMP_NUM_THREADS`` when that is
    set; a config's ``train.threads`` wins). With ``desc`` a progress bar counts finished
    groups. Returns the summaries in job order.

    The worker processes belong to the sweep: SIGTERM to the sweep is passed on to them (each
    saves ``last.pt`` after its current step and stops), no queued group starts after it, and a
    killed sweep takes its workers with it (see :func:`_die_with_parent`). A worker that dies or
    fails stops only its own runs. When any run did not finish, :class:`SweepIncomplete` names
    them (after every other run has finished)."""
    from tqdm import tqdm

    cores = os.cpu_count() or 1
    if workers and workers > cores:
        import sys

        print(f"nkd sweep: --workers {workers} capped at {cores} (this machine's cores: more parallel runs would "
              "only share them)", file=sys.stderr)
    workers = max(1, min(workers or cores, len(groups), cores))
    threads = max(1, cores // workers)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    bar = tqdm(total=sum(len(g) for g in groups), desc=desc, unit="run", disable=desc is None, dynamic_ncols=True)
    args = (resume, overwrite, allow_changes)
    results: dict[int, list[dict]] = {}
    stopped: list[tuple[list[str], str]] = []
    kinds: list[str] = []
    got = {"signal": None}
    try:
        if workers == 1:
            _run_here(groups, threads, args, bar, results, stopped, kinds, got)
        else:
            _run_in_workers(groups, workers, threads, args, bar, results, stopped, kinds, got)
    finally:
        bar.close()
    summaries = [s for i in sorted(results) for s in results[i]]
    started = {d for dirs, _ in stopped for d in dirs}
    not_started = [d for i, g in enumerate(groups) if i not in results for d in _group_dirs(g) if d not in started]
    if stopped or not_started:
        raise SweepIncomplete(stopped, summaries, got["signal"], not_started,
                              bad_input=bool(kinds) and all(k == "bad input" for k in kinds))
    return summaries


def _run_here(groups, threads, args, bar, results, stopped, kinds, got) -> None:
    """``workers == 1``: every group in this process, one after the other."""
    from .engine import GroupError, NonFiniteError, StopRequested
    from .typed import first_line

    for i, g in enumerate(groups):
        try:
            results[i] = _run_group(g, threads, *args)
        except StopRequested as e:
            stopped.append((_group_dirs(g), str(e)))
            got["signal"] = 15
            return
        except (NonFiniteError, GroupError) as e:
            stopped.append((_group_dirs(g), first_line(e)))
            kinds.append("failed")
        except (ValueError, OSError) as e:
            stopped.append((_group_dirs(g), first_line(e)))
            kinds.append("bad input")
        bar.update(len(g))


def _run_in_workers(groups, workers, threads, args, bar, results, stopped, kinds, got) -> None:
    import multiprocessing as mp
    import signal
    import threading
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    pending = list(enumerate(groups))
    running: dict = {}  # parent end of the pipe -> (index, process)

    def forward(signum, _frame):
        got["signal"] = signum
        for _, p in running.values():
            if p.pid is not None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1)} if main else {}
    try:
        while pending or running:
            while pending and len(running) < workers and got["signal"] is None:
                i, g = pending.pop(0)
                here, there = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker, args=(there, g, threads, args, os.getpid()), daemon=False)
                p.start()
                there.close()
                running[here] = (i, p)
            if not running:
                break
            for conn in wait(list(running)):
                i, p = running.pop(conn)
                try:
                    kind, value = conn.recv()
                except (EOFError, OSError):
                    kind, value = None, None
                conn.close()
                p.join()
                if kind == "done":
                    results[i] = value
                else:
                    stopped.append((_group_dirs(groups[i]), value or _exit_reason(p.exitcode)))
                    kinds.append(kind or "failed")
                bar.update(len(groups[i]))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for _, p in running.values():  # only on an exception here (e.g. Ctrl-C): stop them, let them save
            if p.is_alive():
                p.terminate()
            p.join()


def run_many(jobs: list[tuple[str | None, list[str]]], workers: int | None = None, desc: str | None = None,
             resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Run ``(config, overrides)`` jobs, each on its own (see :func:`run_groups`)."""
    return run_groups([[Job(c, list(o))] for c, o in jobs], workers, desc, resume, overwrite)


def plan(configs: list[str], seeds: list[int], overrides: list[str], share_teacher: bool
         ) -> tuple[list[list[Job]], list[Path], list[str]]:
    """The groups to train, every run directory, and notes on runs that could not share.

    Raises ``ValueError`` (before anything runs) when two runs would write the same directory."""
    from .config import load_config
    from .engine.trainer import differences, shared_settings

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
                no_teacher = shared_settings(cfg)["teacher"] is None
                if all(k == "teacher" or k.startswith("teacher.") for k in why) and (
                        no_teacher or all(shared_settings(p)["teacher"] is None for p in peers)):  # say it short
                    alone = ("its method uses no teacher" if no_teacher
                             else f"the other runs of seed {cfg.seed} use no teacher")
                    notes.append(f"{cfg.output_dir} trains on its own: {alone}")
                    continue
                notes.append(f"{cfg.output_dir} trains on its own: it differs from the other runs of seed {cfg.seed} "
                             f"in " + "; ".join(f"{k} ({a!r} vs {b!r})" for k, (a, b) in why.items()))
    return [[job for job, _ in g] for g in groups], dirs, notes


def resume_problems(jobs: list[Job], allow_changes: bool) -> list[str]:
    """Why each run would refuse ``--resume`` (a changed config, another model or method, an
    unreadable checkpoint), checked on its newest readable checkpoint without training."""
    import logging

    from .config import load_config
    from .engine.state import check_compatible, read_checkpoints

    quiet = logging.getLogger("nkd.sweep.resume-check")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    problems = []
    for job in jobs:
        cfg = load_config(job.config, job.overrides)
        try:
            found = read_checkpoints(Path(cfg.output_dir) / "checkpoints", quiet)
            if found:
                check_compatible(*found[0], cfg.to_dict(), allow_changes)
        except ValueError as e:
            problems.append(str(e))
    return problems


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
    if resume:  # every run's resume check before anything trains, every refused run listed
        refused = resume_problems([job for g in groups for job in g], allow_changes)
        if refused:
            raise ValueError(f"--resume refused for {len(refused)} run{'s' if len(refused) > 1 else ''}: "
                             + " | ".join(refused))
    for note in notes:
        log(f"nkd sweep: {note}")
    shared = sum(len(g) for g in groups if len(g) > 1)
    desc = f"{len(dirs)} runs" + (f", {shared} of them in {sum(len(g) > 1 for g in groups)} lockstep groups"
                                  if shared else "")
    try:
        run_groups(groups, workers, desc=desc, resume=resume, overwrite=overwrite, allow_changes=allow_changes)
    except SweepIncomplete as e:
        e.dirs = dirs  # every run directory of the sweep, for the report of the finished ones
        raise
    return dirs
