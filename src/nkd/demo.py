"""``nkd demo``: NKD and USKD on real data in about a minute on 2 cores, nothing to download.

Data: scikit-learn's handwritten digits (1,797 real 8×8 scans; it ships inside the package),
a fixed stratified split (1,347 train / 450 test) of which a 200-image training subset is used
so that the student has something to learn from its teacher. A ``wrn_16_2`` teacher is trained
once; ``resnet8`` students are trained with CE, KD, DKD and NKD, and self-KD runs with label
smoothing and USKD (the CE student is the self-KD baseline too), 3 seeds each. The students of a
seed train in lockstep — KD, DKD and NKD share one teacher forward per batch, CE, LS and USKD one
data pipeline — with the groups in parallel processes; each student ends exactly where a separate
run would. Everything else is the ordinary Trainer, so each run directory is a normal nkd run.
"""

from __future__ import annotations

import time
from pathlib import Path

from .report import write_report
from .sweep import Job, run_groups, run_many

BASE = [
    "data.name=digits", "data.train_subset=200", "data.batch_size=64", "data.eval_batch_size=512",
    "data.crop_padding=1", "data.flip=false", "model.num_classes=10", "optim.lr=0.05", "optim.weight_decay=5.0e-4",
    "schedule.name=cosine", "train.progress=false", "train.console=false", "train.tensorboard=false",
]
TEACHER = "wrn_16_2"
STUDENT = "resnet8"
TEACHER_METHODS = ("kd", "dkd", "nkd")
SELF_KD_METHODS = ("ce", "ls", "uskd")
METHOD_PARAMS = {"uskd": ["method.params.mu=0.1"]}  # DKD: a warm-up of 5 epochs (fewer in shorter runs)


def run_demo(out: str | Path = "demo_out", seeds: tuple[int, ...] = (0, 1, 2), epochs: int = 40,
             workers: int | None = None) -> str:
    out = Path(out)
    runs = out / "runs"
    t0 = time.perf_counter()
    base = [*BASE, f"schedule.epochs={epochs}"]
    teacher_dir = runs / "teacher"
    # fixed thread counts (teacher 2, students 1): CPU results depend on them, so the table is the
    # same on any machine and under any OMP_NUM_THREADS
    teacher_job = (None, [*base, f"model.name={TEACHER}", "method.name=ce", f"output_dir={teacher_dir}", "train.threads=2"])
    teacher = f"teacher={{name: {TEACHER}, num_classes: 10, checkpoint: {teacher_dir / 'checkpoints' / 'best.pt'}}}"
    jobs, groups = [], []
    for s in seeds:
        for family in (TEACHER_METHODS, SELF_KD_METHODS):
            groups.append([])
            for method in family:
                ov = [*base, f"model.name={STUDENT}", f"method.name={method}", f"seed={s}", "train.threads=1",
                      f"output_dir={runs / method / f'seed{s}'}", *METHOD_PARAMS.get(method, [])]
                if method == "dkd":
                    ov.append(f"method.params.warmup_epochs={min(5, epochs)}")
                if method in TEACHER_METHODS:
                    ov.append(teacher)
                jobs.append((None, ov))
                groups[-1].append(Job(None, ov))
    from .config import load_config

    for _, ov in [teacher_job, *jobs]:  # every config is checked before anything trains
        load_config(None, ov)
    run_many([teacher_job], 1, desc=f"teacher {TEACHER}", overwrite=True)
    run_groups(groups, workers, desc=f"students {STUDENT} ({len(jobs)} runs in {len(groups)} lockstep groups)",
               overwrite=True)  # the demo's own folder: a rerun starts again
    minutes = (time.perf_counter() - t0) / 60
    preamble = (f"scikit-learn digits (real 8×8 scans), 200 training images, 450 test images; teacher "
                f"{TEACHER} (1 run), students {STUDENT}, {epochs} epochs, SGD + cosine, seeds {list(seeds)}. "
                f"KD: T=4, 0.1·CE + 0.9·KD; DKD: α=1, β=8, T=4; NKD: T=1, γ=1.5; LS: ε=0.1; "
                f"USKD: α=1, β=0.1, μ=0.1. Wall time {minutes:.1f} min. Reproduce: `nkd demo --out {out}`.")
    return write_report([runs], out, title="nkd demo — KD and self-KD on handwritten digits", preamble=preamble)
