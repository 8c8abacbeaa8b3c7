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

    cfg = load_config(args.config, args.overrides, check_files=True)
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, allow_changes=args.allow_changes)
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

    cfg = load_config(args.config, args.overrides, check_files=False)
    path = Path(args.checkpoint)
    if not path.is_file():
        return _bad_input(f"--checkpoint: file not found: {path}")
    device = torch.device("cuda" if cfg.train.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    model = create_model(cfg.model.name, cfg.model.num_classes)
    try:
        load_weights(model, _read_weights(path), source=str(path))
    except ValueError as e:
        return _bad_input(f"--checkpoint: {e}")
    model.to(device)
    result = evaluate_model(model, build_eval_loader(cfg, device), device)
    print(json.dumps({"checkpoint": str(path), **result}))
    return 0


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
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--checkpoint", required=True, help="nkd checkpoint (.pt), exported .safetensors, or a state_dict")


@command("export", "export the student of a run as safetensors")
def cmd_export(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

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
        with torch.device("meta"):  # the weights must fit the model the checkpoint names
            model = create_model(ck["model_name"], int(ck["num_classes"]))
        problem = describe_mismatch(model, sd)
        if problem:
            raise ValueError(f"{src} does not fit {ck['model_name']}: {problem}")
    except (ValueError, KeyError, TypeError) as e:
        return _bad_input(f"{src}: not an nkd training checkpoint ({e})" if not isinstance(e, ValueError) else str(e))
    out = Path(args.out) if args.out else run / "student.safetensors"
    save_file(sd, str(out), metadata=meta)
    mask = os.umask(0)
    os.umask(mask)
    out.chmod(0o666 & ~mask)  # like every other file nkd writes (safetensors creates it 0600)
    print(f"wrote {out} ({len(sd)} tensors, {meta})")
    return 0


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--last", action="store_true", help="export the last epoch instead of the best")
    p.add_argument("--out", help="output file (default RUN_DIR/student.safetensors)")


@command("demo", "train a teacher and KD/self-KD students on built-in real data (about a minute on 2 cores)")
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    seeds = tuple(range(args.seeds))
    table = run_demo(args.out, seeds=seeds, epochs=args.epochs, workers=args.workers)
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
    return seeds


@command("sweep", "run configs over several seeds (parallel processes; --share-teacher: lockstep) and report")
def cmd_sweep(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import NonFiniteError
    from .report import write_report
    from .sweep import sweep

    configs = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
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
    out = Path(args.report_dir) if args.report_dir else Path(os.path.commonpath([str(d.parent) for d in dirs]))
    print(write_report(dirs, out, title=f"sweep of {', '.join(configs)}"))
    print(f"report: {out / 'report.md'}")
    return 0


def _sweep_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("items", nargs="+", metavar="CONFIG_OR_OVERRIDE",
                   help="one or more YAML configs, then key=value overrides applied to each")
    p.add_argument("--share-teacher", action="store_true",
                   help="train the runs of a seed that share data and teacher in one process, in lockstep "
                        "(one teacher forward per batch; each student bitwise as if trained alone)")
    p.add_argument("--allow-changes", action="store_true", help="with --resume: as for nkd train")
    p.add_argument("--seeds", type=_seed_list, default=[0, 1, 2], help="e.g. 0,1,2")
    p.add_argument("--workers", type=int, default=None, help="parallel runs (default: one per core)")
    p.add_argument("--report-dir", help="where report.md goes (default: the config's output_dir)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue each run (finished ones are not retrained)")
    start.add_argument("--overwrite", action="store_true", help="delete the seeds' existing checkpoints and start again")


@command("report", "compare finished runs: one table per dataset (mean ± std, paired Δ over seeds), figures")
def cmd_report(args: argparse.Namespace) -> int:
    from .report import ReportError, write_report

    try:
        print(write_report(args.run_dirs, args.out, title=args.title, baseline=args.baseline))
    except ReportError as e:
        return _bad_input(str(e))
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
