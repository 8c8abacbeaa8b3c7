"""Wall time of KD + DKD + NKD students trained in lockstep (one data pipeline, one teacher forward
per batch: :func:`nkd.engine.train_together`) against the same three runs one after another.

For each teacher → student pair (default resnet56 → resnet20 and resnet32x4 → resnet8x4) the three
student configs are the shipped recipes (``configs/cifar10/{kd,dkd,nkd}_resnet56_resnet20.yaml``,
``configs/cifar100/{kd,dkd,nkd}/resnet32x4_resnet8x4.yaml``: KD T=4 0.1·CE + 0.9·KD; DKD α=1,
β=2 resp. 8, T=4; NKD λ=3, γ=3.5) moved onto the shared CIFAR-10 JPEG folders
(``data.name=image_folder_small``, 10 classes) and cut to one epoch of ``--steps`` steps of batch
``--batch-size`` (``data.train_subset = steps × batch``). Changes that cost nothing but are needed
for a one-epoch run: no lr milestones, DKD warm-up 1 epoch instead of 20 (it only scales the
loss). The teacher has random weights (no ``teacher.checkpoint``): a forward costs the same with
trained weights. Evaluation: once, after the single epoch, on a small test folder of
``--eval-per-class`` images per class (every student evaluates itself in both variants).

Timed, each ``--repeats`` times after a warm-up (median reported; the two variants alternate so
drift in the machine's load hits both):

* separate: ``Trainer(cfg).fit()`` for KD, DKD, NKD one after another (each builds its own data
  pipeline and teacher and runs the teacher on every batch);
* shared: ``Trainer([kd, dkd, nkd]).fit()`` (what ``train_together`` runs; split to time the setup).

Both include building the trainer (loading the decoded images from the cache, hashing the folder,
building models), the epoch, the evaluation and the checkpoint writes; the one-off JPEG decode is
done once before any timing and the cache then serves every run. ``fit`` (no setup) is reported
too. T (one teacher forward) and S_i (one step of student i) are timed on one batch before each
repeat (medians) so the ideal ratio of the training loop, (T + ΣS_i)/(3T + ΣS_i), stands next to
the measured one. Finally the
students' ``last.pt`` weights of the two variants are compared bitwise (``torch.equal``).

    python benchmarks/share_teacher.py [--data cifar10-jpg.tar.gz] [--steps 60] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from nkd.config import Config, load_config
from nkd.data import load_image_folder
from nkd.engine import Trainer
from nkd.engine.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = Path("shared") / "data" / "cifar10-jpg.tar.gz"
METHODS = ("kd", "dkd", "nkd")
PAIRS = {  # teacher:student -> the shipped config of each method
    "resnet56:resnet20": {m: REPO / "configs" / "cifar10" / f"{m}_resnet56_resnet20.yaml" for m in METHODS},
    "resnet32x4:resnet8x4": {m: REPO / "configs" / "cifar100" / m / "resnet32x4_resnet8x4.yaml" for m in METHODS},
}
TARGET = 0.60


def default_archive() -> Path:
    """``../shared/data/cifar10-jpg.tar.gz`` next to the repository (or next to a folder above it,
    e.g. for a git worktree one level deeper)."""
    for up in REPO.parents:
        if (up / ARCHIVE).is_file():
            return up / ARCHIVE
    return REPO.parent / ARCHIVE


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- data
def prepare_data(archive: Path, work: Path, eval_per_class: int) -> Path:
    """Extract the archive once into ``work`` and build ``work/root`` with ``train`` (the full
    training folder) and ``test`` (the first ``eval_per_class`` test images of each class)."""
    if not archive.is_file():
        raise FileNotFoundError(f"--data: {archive} not found (the CIFAR-10 JPEG archive, cifar10-jpg.tar.gz)")
    stamp = work / "extracted.txt"
    key = f"{archive.resolve()} {archive.stat().st_size} {archive.stat().st_mtime_ns}"
    if not (stamp.is_file() and stamp.read_text() == key):
        shutil.rmtree(work / "cifar10-jpg", ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with tarfile.open(archive) as tf:
            tf.extractall(work, filter="data")
        stamp.write_text(key)
        print(f"extracted {archive} into {work} in {time.perf_counter() - t0:.1f} s")
    src = work / "cifar10-jpg"
    root = work / f"root_eval{eval_per_class}"
    if not (root / "test").is_dir():
        tmp = work / f"{root.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "train").parent.mkdir(parents=True)
        (tmp / "train").symlink_to(src / "train", target_is_directory=True)
        for cls in sorted(p for p in (src / "test").iterdir() if p.is_dir()):
            (tmp / "test" / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:eval_per_class]:
                shutil.copy(f, tmp / "test" / cls.name / f.name)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return root


def decode_once(root: Path, cache: Path) -> float:
    """Decode both splits into the cache (untimed below); returns the seconds it took."""
    t0 = time.perf_counter()
    for split in ("train", "test"):
        load_image_folder(root / split, cache_dir=cache)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- configs
def student_configs(pair: str, root: Path, cache: Path, out: Path, steps: int, args) -> list[Config]:
    """The KD, DKD, NKD configs of ``pair`` (shipped recipes, moved onto the folder; module docstring)."""
    common = [
        "data.name=image_folder_small", f"data.root={root}", f"data.cache_dir={cache}", "data.download=false",
        f"data.batch_size={args.batch_size}", f"data.train_subset={steps * args.batch_size}",
        "model.num_classes=10", "teacher.num_classes=10", "teacher.checkpoint=null",
        "schedule.epochs=1", "schedule.milestones=[]",
        f"train.max_steps_per_epoch={steps}", f"train.threads={args.threads}", f"train.device={args.device}",
        f"train.amp={args.amp}", "train.tensorboard=false", "train.progress=false", "train.console=false",
    ]
    cfgs = []
    for m, path in PAIRS[pair].items():
        extra = ["method.params.warmup_epochs=1"] if m == "dkd" else []
        cfgs.append(load_config(path, [*common, *extra, f"output_dir={out / m}"]))
    return cfgs


# ----------------------------------------------------------------------------- timing
def run_separate(cfgs: list[Config], device: str) -> tuple[float, float]:
    """(wall, fit-only) seconds of the three runs one after another."""
    setup = fit = 0.0
    for c in cfgs:
        sync(device)
        t0 = time.perf_counter()
        tr = Trainer(c)
        t1 = time.perf_counter()
        tr.fit()
        sync(device)
        t2 = time.perf_counter()
        setup, fit = setup + t1 - t0, fit + t2 - t1
    return setup + fit, fit


def run_shared(cfgs: list[Config], device: str) -> tuple[float, float]:
    sync(device)
    t0 = time.perf_counter()
    tr = Trainer(cfgs)
    t1 = time.perf_counter()
    tr.fit()
    sync(device)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def time_parts(cfgs: list[Config], device: str, repeats: int) -> tuple[float, list[float]]:
    """Median seconds of one teacher forward (T) and of one step of each student (S_i) on one batch."""
    tr = Trainer(cfgs)
    try:
        x, y = next(iter(tr.loaders.train_batches(0)))
        x, y = x.to(tr.device), y.to(tr.device)
        for s in tr.students:
            s.begin_epoch(0, 0)

        def teacher():
            with tr.students[0].autocast():
                return tr.teacher(x, tr.teacher_outputs)

        def med(fn) -> float:
            fn()  # warm-up
            ts = []
            for _ in range(repeats):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        out = teacher()
        big_t = med(teacher)
        small_s = [med(lambda s=s: s.train_step(x, y, out, 0.0, check_labels=False)) for s in tr.students]
        return big_t, small_s
    finally:
        tr.close()


def bitwise_equal(a: Path, b: Path) -> tuple[bool, str]:
    wa = load_checkpoint(a / "checkpoints" / "last.pt")["trainable"]
    wb = load_checkpoint(b / "checkpoints" / "last.pt")["trainable"]
    if wa.keys() != wb.keys():
        return False, "different keys"
    bad = [k for k in wa if not torch.equal(wa[k], wb[k])]
    return not bad, (f"{len(bad)} of {len(wa)} tensors differ, e.g. {bad[0]}" if bad else f"{len(wa)} tensors equal")


def ideal_ratio(big_t: float, small_s: list[float]) -> float:
    """Shared / separate time of the training loop if only the saved teacher forwards counted:
    (T + ΣS_i) / (n·T + ΣS_i) for n students."""
    return (big_t + sum(small_s)) / (len(small_s) * big_t + sum(small_s))


def bench_pair(pair: str, root: Path, cache: Path, tmp: Path, args) -> dict:
    def cfgs(out: str, steps: int = args.steps) -> list[Config]:
        return student_configs(pair, root, cache, tmp / out, steps, args)

    base = cfgs("cfg")
    print(f"\n## {pair.replace(':', ' -> ')}: {', '.join(c.method.name for c in base)}; "
          f"{args.steps} steps x batch {args.batch_size}, {args.threads} threads", flush=True)
    run_separate(cfgs("warm_sep", args.warmup_steps), args.device)  # warm-up: first-run overheads
    run_shared(cfgs("warm_shared", args.warmup_steps), args.device)
    sep, shared, parts = [], [], []
    for r in range(args.repeats):
        # T and S are timed next to each repeat, so the ideal ratio sees the same machine load
        parts.append(time_parts(cfgs(f"parts{r}"), args.device, args.part_repeats))
        shutil.rmtree(tmp / f"parts{r}")
        order = ("sep", "shared") if r % 2 == 0 else ("shared", "sep")
        for kind in order:
            if kind == "sep":
                sep.append(run_separate(cfgs(f"sep{r}"), args.device))
            else:
                shared.append(run_shared(cfgs(f"shared{r}"), args.device))
            if r:  # keep repeat 0 for the weight check, free the disk of the others
                shutil.rmtree(tmp / f"{kind}{r}")
        big_t, small_s = parts[-1]
        print(f"repeat {r + 1}: T = {big_t * 1e3:.0f} ms/teacher forward, S = "
              f"{'/'.join(f'{s * 1e3:.0f}' for s in small_s)} ms/step ({'/'.join(METHODS)}), ideal loop ratio "
              f"{ideal_ratio(big_t, small_s):.3f}; separate {sep[-1][0]:.1f} s (fit {sep[-1][1]:.1f}), shared "
              f"{shared[-1][0]:.1f} s (fit {shared[-1][1]:.1f}), ratio {shared[-1][0] / sep[-1][0]:.3f}", flush=True)
    big_t = statistics.median(p[0] for p in parts)
    small_s = [statistics.median(p[1][i] for p in parts) for i in range(len(METHODS))]
    ideal = ideal_ratio(big_t, small_s)
    checks = {m: bitwise_equal(tmp / "sep0" / m, tmp / "shared0" / m) for m in METHODS}
    for m, (ok, what) in checks.items():
        print(f"bitwise {m}: shared last.pt == separate last.pt: {ok} ({what})")
    wall_sep, wall_sh = statistics.median(x[0] for x in sep), statistics.median(x[0] for x in shared)
    fit_sep, fit_sh = statistics.median(x[1] for x in sep), statistics.median(x[1] for x in shared)
    return {"pair": pair, "sep": wall_sep, "shared": wall_sh, "ratio": wall_sh / wall_sep, "fit_sep": fit_sep,
            "fit_shared": fit_sh, "fit_ratio": fit_sh / fit_sep, "ideal": ideal, "T": big_t, "S": small_s,
            "paired": [b[0] / a[0] for a, b in zip(sep, shared)], "bitwise": all(ok for ok, _ in checks.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_archive(), help="the CIFAR-10 JPEG archive (default: %(default)s)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("NKD_CACHE_DIR", Path.home() / ".cache" / "nkd"))
                    / "share_teacher", help="where the archive is extracted and decoded, once (default: %(default)s)")
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"teacher:student pairs, from {list(PAIRS)}")
    ap.add_argument("--steps", type=int, default=60, help="training steps of the one epoch")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each variant (median reported)")
    ap.add_argument("--warmup-steps", type=int, default=3, help="steps of the untimed warm-up runs")
    ap.add_argument("--part-repeats", type=int, default=5, help="repeats of the T and S timings")
    ap.add_argument("--eval-per-class", type=int, default=10, help="test images per class in the evaluation folder")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads, the same for both variants")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    args = ap.parse_args()
    pairs = [p for p in args.pairs.split(",") if p]
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        ap.error(f"--pairs: unknown {unknown}; known: {list(PAIRS)}")
    torch.set_num_threads(args.threads)
    root = prepare_data(args.data, args.work, args.eval_per_class)
    cache = args.work / "cache"
    print(f"decode/cache load before timing: {decode_once(root, cache):.1f} s (not timed below)")
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} threads"
    results = []
    with tempfile.TemporaryDirectory(prefix="share_teacher_") as tmp:
        for pair in pairs:
            results.append(bench_pair(pair, root, cache, Path(tmp) / pair.replace(":", "_"), args))
    print(f"\n# KD + DKD + NKD, 1 epoch x {args.steps} steps x batch {args.batch_size}, amp {args.amp} | {dev} | "
          f"torch {torch.__version__} | median of {args.repeats}")
    print("| pair | separate s | shared s | ratio | paired ratios | fit-only ratio | T ms | S ms (kd/dkd/nkd) | "
          "ideal loop ratio | target | met | weights |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        met = "met" if r["ratio"] <= TARGET else f"not met (+{r['ratio'] - TARGET:.2f})"
        print(f"| {r['pair'].replace(':', ' → ')} | {r['sep']:.1f} | {r['shared']:.1f} | {r['ratio']:.3f}× | "
              f"{', '.join(f'{x:.3f}' for x in r['paired'])} | {r['fit_ratio']:.3f}× | {r['T'] * 1e3:.0f} | "
              f"{'/'.join(f'{x * 1e3:.0f}' for x in r['S'])} | {r['ideal']:.3f}× | ≤ {TARGET:.2f}× | {met} | "
              f"{'bitwise equal' if r['bitwise'] else 'DIFFERENT'} |")
    sys.exit(0 if all(r["bitwise"] for r in results) else 1)


if __name__ == "__main__":
    main()
