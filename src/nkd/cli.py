"""Command line: ``nkd train | eval | export | demo | sweep | report``.

Exit codes: 0 success, 1 a runtime failure (e.g. a non-finite loss), 2 bad input (config, CLI,
paths) — reported before any training starts, every problem listed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

COMMANDS = {}


def command(name: str, help: str):
    def deco(fn):
        COMMANDS[name] = (fn, help)
        return fn

    return deco


def _bad_input(msg: str) -> int:
    print(f"nkd: error: {msg}", file=sys.stderr)
    return 2


@command("train", "train a model from a YAML config (key=value overrides allowed)")
def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import NonFiniteError, StopRequested, Trainer
    from .engine.checkpoint import CheckpointWriteError
    from .engine.faults import Faults

    cfg = load_config(args.config, args.overrides, check_files=True)
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes,
                          faults=Faults.from_env())
    except (ValueError, OSError) as e:  # setup problems: bad checkpoint, data, output dir, lock
        return _bad_input(str(e))
    try:
        trainer.fit()
    except (NonFiniteError, CheckpointWriteError) as e:
        print(f"nkd: training stopped: {e}", file=sys.stderr)
        return _exit_worker(1)
    except StopRequested as e:  # pre-emption: saved, exit as a SIGTERM'd process would
        print(f"nkd: {e}", file=sys.stderr)
        return _exit_worker(128 + signal.SIGTERM)
    except Exception:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # e.g. a peer died: leave at once
            traceback.print_exc()
            return _exit_worker(1)
        raise
    from .engine.distributed import cleanup

    cleanup(trainer.dist)  # every rank finished: tear the process group down
    return 0


def _exit_worker(code: int) -> int:
    """Under torchrun a failed worker exits immediately: tearing down a process group whose peer
    died can block, and torchrun only restarts the job (``--max-restarts``) once every worker
    has exited."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML experiment file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1 seed=3")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from OUTPUT_DIR/checkpoints/last.pt (from scratch if there is none)")
    start.add_argument("--overwrite", action="store_true",
                       help="delete the checkpoints already in OUTPUT_DIR and start again (refused otherwise)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept a config that changes the run (listed, and recorded in its history)")


@command("eval", "evaluate a checkpoint on the config's evaluation split")
def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .config import load_config
    from .data.build import build_eval_loader
    from .engine.trainer import evaluate_model
    from .models import create_model, load_weights

    path = Path(args.checkpoint)
    if args.config is not None and "=" in args.config and not Path(args.config).is_file():
        args.overrides, args.config = [args.config, *args.overrides], None  # overrides only
    if not path.is_file():
        return _bad_input(f"--checkpoint: file not found: {path}")
    if args.config is None:
        stored = _stored_config(path)
        if stored is None:
            return _bad_input(f"eval: name the run's config: {path} records none (only files of nkd export do)")
        cfg = _config_from_text(stored, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides, check_files=False)
    device = torch.device("cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model = create_model(cfg.model.name, cfg.model.num_classes, **cfg.model.kwargs)
    try:
        load_weights(model, _read_weights(path), source=str(path))
    except ValueError as e:
        return _bad_input(f"--checkpoint: {e}")
    model.to(device)
    result = evaluate_model(model, build_eval_loader(cfg, device), device)
    print(json.dumps({"checkpoint": str(path), **result}))
    return 0


def _stored_config(path: Path) -> str | None:
    """The run config an exported ``.safetensors`` file records in its metadata (or None)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("config")
    except (SafetensorError, OSError):
        return None


def _config_from_text(text: str, overrides: list[str]):
    import tempfile

    from .config import load_config

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "config.yaml"
        p.write_text(text, encoding="utf-8")
        return load_config(p, overrides, check_files=False)


def _read_weights(path: Path):
    """A checkpoint file's contents (``.safetensors`` or a torch file); unreadable → ValueError."""
    if path.suffix != ".safetensors":
        from .models.checkpoint import read_checkpoint

        return read_checkpoint(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"checkpoint {path} is unreadable (not a complete safetensors file): {e}") from e


def _eval_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="the run's config (optional for a file of nkd export, which records it)")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True, help="nkd checkpoint (.pt), exported .safetensors, or a state_dict")


@command("export", "export the student of a run as safetensors")
def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .engine.checkpoint import load_checkpoint
    from .models import create_model
    from .models.checkpoint import describe_mismatch, extract_state_dict

    run = Path(args.run_dir)
    src = run / "checkpoints" / ("last.pt" if args.last else "best.pt")
    if not src.is_file():
        return _bad_input(f"no checkpoint at {src}")
    try:
        ck = load_checkpoint(src)
        sd = {k: v.contiguous() for k, v in extract_state_dict(ck, str(src)).items()}
        meta = {"model": str(ck["model_name"]), "num_classes": str(ck["num_classes"]), "method": str(ck["method"]),
                "epoch": str(int(ck["epoch"]) + 1)}
        if ck.get("config"):
            meta["config"] = str(ck["config"])  # nkd eval FILE.safetensors needs no config file
        kwargs = _model_kwargs(ck)
        if kwargs:
            meta["model_kwargs"] = json.dumps(kwargs, sort_keys=True)
        with torch.device("meta"):  # the weights must fit the model the checkpoint names (built as it was trained)
            model = create_model(ck["model_name"], int(ck["num_classes"]), **kwargs)
        problem = describe_mismatch(model, sd)
        if problem:
            raise ValueError(f"{src} does not fit {ck['model_name']}: {problem}")
    except (ValueError, KeyError, TypeError) as e:
        return _bad_input(f"{src}: not an nkd training checkpoint ({e})" if not isinstance(e, ValueError) else str(e))
    default = "student.safetensors" if args.format == "safetensors" else "student_model.pth"
    out = Path(args.out) if args.out else run / default
    if not out.parent.is_dir():
        return _bad_input(f"--out: folder not found: {out.parent}")
    if out.is_dir():
        return _bad_input(f"--out: {out} is a folder; name the file to write")
    from safetensors import SafetensorError

    try:
        if args.format == "mdistiller":  # mdistiller / RepDistiller: torch.load(f)["model"] is the state_dict
            torch.save({"model": sd, "nkd": meta}, out)
        else:
            write_safetensors(sd, out, meta)
    except (SafetensorError, OSError, RuntimeError) as e:
        return _bad_input(f"--out: cannot write {out}: {e}")
    mask = os.umask(0)
    os.umask(mask)
    out.chmod(0o666 & ~mask)  # like every other file nkd writes (safetensors creates it 0600)
    print(f"wrote {out} ({len(sd)} tensors, {meta})")
    return 0


def write_safetensors(sd: dict, out: Path, metadata: dict[str, str]) -> None:
    """A safetensors file that is a function of the weights and the metadata only: the header's
    JSON is written with sorted keys (safetensors writes its metadata map in hash order, so equal
    weights gave different bytes). Written atomically."""
    import struct

    from safetensors.torch import save

    blob = save(sd, metadata=metadata)
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors writes it
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text + blob[8 + n:])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _model_kwargs(ck: dict) -> dict:
    """The ``model.kwargs`` a training checkpoint's run was built with (from its stored config)."""
    import yaml

    try:
        cfg = yaml.safe_load(ck.get("config") or "{}") or {}
    except yaml.YAMLError:
        return {}
    kwargs = (cfg.get("model") or {}).get("kwargs") if isinstance(cfg, dict) else None
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--last", action="store_true", help="export the last epoch instead of the best")
    p.add_argument("--out", help="output file (default RUN_DIR/student.safetensors, or RUN_DIR/student_model.pth "
                                 "with --format mdistiller)")
    p.add_argument("--format", choices=("safetensors", "mdistiller"), default="safetensors",
                   help="safetensors (default), or mdistiller: a torch file {'model': state_dict} as mdistiller and "
                        "RepDistiller load it (the zoo's keys are already theirs)")


@command("demo", "train a teacher and KD/self-KD students on built-in real data (about a minute on 2 cores)")
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .sweep import SweepIncomplete

    seeds = tuple(range(args.seeds))
    try:
        table = run_demo(args.out, seeds=seeds, epochs=args.epochs, workers=args.workers)
    except SweepIncomplete as e:
        print(f"nkd demo: {e}", file=sys.stderr)
        return e.code
    print(table)
    print(f"report: {Path(args.out) / 'report.md'} (figures accuracy.png, curves.png)")
    return 0


def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: one per core)")


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated integers, got {text!r}") from e
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds must name at least one seed")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"--seeds names seed {', '.join(map(str, repeated))} more than once "
                                         f"(got {text!r}): each seed is one run")
    return seeds


@command("sweep", "run configs over several seeds (parallel processes; --share-teacher: lockstep) and report")
def cmd_sweep(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import NonFiniteError
    from .report import write_report
    from .sweep import SweepIncomplete, sweep

    is_config = [("=" not in a or Path(a).is_file()) for a in args.items]  # an existing file is a config
    configs = [a for a, c in zip(args.items, is_config) if c]
    overrides = [a for a, c in zip(args.items, is_config) if not c]
    if not configs:
        return _bad_input("sweep: name at least one config file")
    for c in configs:
        load_config(c, overrides, check_files=True)
    try:
        dirs = sweep(configs, args.seeds, overrides, args.workers, resume=args.resume, overwrite=args.overwrite,
                     share_teacher=args.share_teacher, allow_changes=args.allow_changes)
    except ValueError as e:
        return _bad_input(str(e))
    except NonFiniteError as e:
        print(f"nkd: training stopped: {e}", file=sys.stderr)
        return 1
    except SweepIncomplete as e:
        return _sweep_incomplete(e, args, configs)
    out = Path(args.report_dir) if args.report_dir else Path(os.path.commonpath([str(d.parent) for d in dirs]))
    print(write_report(dirs, out, title=f"sweep of {', '.join(configs)}"))
    print(f"report: {out / 'report.md'}")
    return 0


def _sweep_incomplete(e, args: argparse.Namespace, configs: list[str]) -> int:
    """Some runs of a sweep did not finish: name them, report the finished ones, exit non-zero."""
    from .report import ReportError, write_report

    print(f"nkd sweep: {e}", file=sys.stderr)
    dirs = getattr(e, "dirs", [])
    finished = [d for d in dirs if (d / "summary.json").is_file()]
    if finished:
        out = Path(args.report_dir) if args.report_dir else Path(os.path.commonpath([str(d.parent) for d in dirs]))
        try:
            print(write_report(finished, out, title=f"sweep of {', '.join(configs)} ({len(finished)} of "
                                                    f"{len(dirs)} runs finished)"))
            print(f"report of the {len(finished)} finished runs: {out / 'report.md'}")
        except ReportError as err:
            print(f"nkd sweep: no report: {err}", file=sys.stderr)
    return e.code


def _sweep_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="+", metavar="CONFIG_OR_OVERRIDE",
                   help="one or more YAML configs, then key=value overrides applied to each")
    p.add_argument("--share-teacher", action="store_true",
                   help="train the runs of a seed that share data and teacher in one process, in lockstep "
                        "(one teacher forward per batch; each student bitwise as if trained alone)")
    p.add_argument("--allow-changes", action="store_true", help="with --resume: as for nkd train")
    p.add_argument("--seeds", type=_seed_list, default=[0, 1, 2], help="e.g. 0,1,2")
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: one per core)")
    p.add_argument("--report-dir", help="where report.md goes (default: the configs' output_dir; with several "
                                        "configs, the folder that holds all their output_dirs)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue each run (finished ones are not retrained)")
    start.add_argument("--overwrite", action="store_true", help="delete the seeds' existing checkpoints and start again")


@command("report", "compare finished runs: one table per dataset (mean ± std, paired Δ over seeds), figures")
def cmd_report(args: argparse.Namespace) -> int:
    from .report import ReportError, write_report

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _bad_input(f"--out: {out} is a file, not a folder (the report writes report.md and more into it)")
    from .report import skipped_runs

    for run, why in skipped_runs(args.run_dirs):
        print(f"nkd report: skipped {run}: {why}", file=sys.stderr)
    try:
        print(write_report(args.run_dirs, args.out, title=args.title, baseline=args.baseline))
    except ReportError as e:
        return _bad_input(str(e))
    except OSError as e:
        return _bad_input(f"--out: cannot write the report into {out}: {e.strerror or e}")
    print(f"report: {Path(args.out) / 'report.md'} (report.json, accuracy.png, curves.png)")
    return 0


def _report_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", help="run directories, or folders that contain them")
    p.add_argument("--out", default="report", help="output directory (default report)")
    p.add_argument("--title", default="nkd report")
    p.add_argument("--baseline", metavar="TEXT",
                   help="reference row of the paired differences: a row name or label, or whole words of one matching exactly "
                        "one row per table (default: each table's first row)")


PARSERS = {"train": _train_parser, "eval": _eval_parser, "export": _export_parser, "demo": _demo_parser,
           "sweep": _sweep_parser, "report": _report_parser}


@command("lm", "language models: nkd lm cache CONFIG (teacher top-k cache) | nkd lm train CONFIG (student)")
def cmd_lm(args: argparse.Namespace) -> int:
    from .lm.recipe import RecipeError, run_cache, run_train

    try:
        if args.lm_command == "cache":
            return run_cache(args.config)
        return run_train(args.config, resume=args.resume, overwrite=args.overwrite)
    except RecipeError as e:
        return _bad_input(str(e))
    except ValueError as e:  # cache fingerprint, vocabulary, corpus, locked run directory
        return _bad_input(str(e))
    except FloatingPointError as e:
        print(f"nkd: training stopped: {e}", file=sys.stderr)
        return 1


def _lm_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lm_command", required=True)
    c = sub.add_parser("cache", help="run the teacher once over the corpus and write its top-k cache (resumable)")
    c.add_argument("config", help="YAML LM recipe (see nkd.lm.recipe)")
    t = sub.add_parser("train", help="train the student from the cache (or a live teacher)")
    t.add_argument("config", help="YAML LM recipe (see nkd.lm.recipe)")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoints/last.pt")
    start.add_argument("--overwrite", action="store_true", help="start again in an OUTPUT_DIR that holds a run")


PARSERS["lm"] = _lm_parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="nkd", description="Normalized KD and Universal Self-KD for PyTorch")
    ap.add_argument("--version", action="version", version=f"nkd {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        PARSERS[name](p)
        p.set_defaults(func=fn)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # argparse already printed the usage error
        return int(e.code or 0)
    # key=value overrides may also follow options (nkd train CONFIG --resume optim.lr=0.1,
    # nkd sweep A.yaml B.yaml --seeds 0,1 optim.lr=0.1)
    slot = next((name for name in ("overrides", "items") if hasattr(args, name)), None)
    if extra and slot and all("=" in x and not x.startswith("-") for x in extra):
        setattr(args, slot, [*getattr(args, slot), *extra])
    elif extra:
        return _bad_input(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as e:
        return _bad_input(str(e))
    except FileNotFoundError as e:
        return _bad_input(str(e))
    except KeyboardInterrupt:
        print("nkd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
