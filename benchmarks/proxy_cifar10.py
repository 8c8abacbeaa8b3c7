"""Proxy benchmark on real data that fits a 2-core CPU: CIFAR-10 (the shared JPEG set),
resnet56 → resnet20 (a standard CRD pair, and the cheapest one), CE / KD / DKD / NKD and self-KD
CE vs USKD, several seeds each, with the shipped ``configs/cifar10/*.yaml`` recipes scaled down:

* a fixed 4,000-image random training subset (``data.train_subset``, the same for every run),
  all 10,000 test images, evaluated every 5 epochs and after the last;
* ``--epochs`` epochs (default 15) with the CRD step schedule compressed to the same shape
  (×0.1 at 62.5 %, 75 %, 87.5 % of training, as 150/180/210 of 240);
* bf16 autocast on the CPU (AVX512-BF16: about 2× faster; the losses still compute in float32).

    python benchmarks/proxy_cifar10.py --data /path/to/cifar10-jpg [--seeds 0,1,2] [--epochs 15]

The teacher is trained once (seed 0). Writes ``benchmarks/proxy/report.md`` plus figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from nkd.report import write_report  # noqa: E402
from nkd.sweep import run_many  # noqa: E402

CONFIGS = ROOT / "configs" / "cifar10"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", required=True, help="folder with train/ and test/ (the unpacked shared archive)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--subset", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "proxy"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--teacher-epochs", type=int, default=None, help="teacher schedule length (default: --epochs)")
    ap.add_argument("--methods", default="ce,kd,dkd,nkd,uskd", help="which student runs, e.g. kd,dkd,nkd")
    ap.add_argument("--variant", action="append", default=[], metavar="METHOD:KEY=V,KEY=V",
                    help="extra student runs with other method parameters, e.g. nkd:temperature=1,gamma=1.5 (repeatable)")
    ap.add_argument("--teacher", default=None, help="an already trained teacher checkpoint (skips teacher training)")
    ap.add_argument("--reuse", action="append", default=[],
                    help="finished run folders to include in the report (e.g. CE/USKD runs of an earlier call)")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    runs = out / "runs"
    e = args.epochs
    milestones = [round(e * f) for f in (0.625, 0.75, 0.875)]
    common = [f"data.root={args.data}", f"data.train_subset={args.subset}", f"schedule.epochs={e}",
              f"schedule.milestones={milestones}", "train.amp=bf16", "train.progress=false", "train.console=false",
              "train.tensorboard=false", "train.channels_last=true", f"train.eval_every={args.eval_every}"]
    t0 = time.perf_counter()
    teacher_dir = runs / "teacher_resnet56"
    te = args.teacher_epochs or e
    t_ms = [round(te * f) for f in (0.625, 0.75, 0.875)]
    if args.teacher is None:
        run_many([(str(CONFIGS / "teacher_resnet56.yaml"),
                   [*common, f"schedule.epochs={te}", f"schedule.milestones={t_ms}", f"output_dir={teacher_dir}"])], 1,
                 desc=f"teacher resnet56 ({te} epochs)", resume=True)
    teacher_ckpt = f"teacher.checkpoint={args.teacher or teacher_dir / 'checkpoints' / 'best.pt'}"
    names = {"ce": "ce_resnet20", "kd": "kd_resnet56_resnet20", "dkd": "dkd_resnet56_resnet20",
             "nkd": "nkd_resnet56_resnet20", "uskd": "uskd_resnet20"}
    students = [(names[m], names[m], []) for m in filter(None, args.methods.split(","))]
    for v in args.variant:  # METHOD:key=v,key=v -> its own run folder, the parameters as overrides
        method, _, kvs = v.partition(":")
        pairs = [kv.split("=", 1) for kv in kvs.split(",") if kv]
        tag = "_".join(f"{k}{x}" for k, x in pairs)
        students.append((names[method], f"{names[method]}_{tag}", [f"method.params.{k}={x}" for k, x in pairs]))
    jobs = []
    for config, name, extra in students:
        for s in seeds:
            ov = [*common, *extra, f"seed={s}", f"output_dir={runs / name / f'seed{s}'}"]
            if name.startswith(("kd", "dkd", "nkd")):
                ov.append(teacher_ckpt)
            jobs.append((str(CONFIGS / f"{config}.yaml"), ov))
    run_many(jobs, args.workers, desc=f"students ({len(jobs)} runs)", resume=True)  # a rerun continues
    hours = (time.perf_counter() - t0) / 3600
    pre = (f"CIFAR-10 (shared JPEG set), {args.subset}-image training subset, 10,000 test images, {e} epochs "
           f"(×0.1 at {milestones}), bf16 autocast on a 2-core CPU, seeds {seeds}; teacher resnet56 (1 run, {te} "
           f"epochs). "
           f"Wall time {hours:.2f} h. Command: `python benchmarks/proxy_cifar10.py --data DATA --seeds {args.seeds} "
           f"--epochs {e} --subset {args.subset} --eval-every {args.eval_every} --teacher-epochs {te} --methods {args.methods or repr('')}"
           f"{' --teacher CKPT' if args.teacher else ''}"
           f"{''.join(' --variant ' + v for v in args.variant)}`"
           f"{' plus reused runs ' + ', '.join(args.reuse) if args.reuse else ''}. Best = best of the evaluated epochs.")
    print(write_report([runs, *args.reuse], out, title="Proxy benchmark: CIFAR-10, resnet56 → resnet20", preamble=pre))


if __name__ == "__main__":
    main()
