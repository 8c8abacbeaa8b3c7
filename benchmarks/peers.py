"""Accuracy parity with mdistiller on the same recipe: nkd's pipeline against mdistiller's own data
pipeline, distiller and training step, on real images (the CIFAR-10 JPEG folders), seed by seed.

The job (both pipelines): a fixed random subset of ``--train-images`` training images (the same
files for both), all 10,000 test images; resnet56 → resnet20; SGD lr 0.05, momentum 0.9, weight
decay 5e-4 on every parameter, batch 64 keeping the last partial batch (``data.drop_last: false``,
as mdistiller's loader), crop 32 with 4 px zero padding + horizontal flip, the same per-channel
normalization; the CRD step schedule compressed to ``--epochs`` (×0.1 at 62.5 %, 75 %, 87.5 %);
KD ``T = 4``, ``0.1·CE + 0.9·KD``; DKD ``α = 1, β = 2, T = 4``, CE 1, warm-up ``--epochs // 3``
epochs; fp32, one thread per run. Top-1 on the test set after the last epoch.

Pairing: for seed ``s``, both students start from the *same* initial weights (nkd's resnet20 built
under seed ``s``, loaded into mdistiller's resnet20 — the state dicts are compatible); the
pipelines then draw their own data order and augmentation. The teacher (resnet56, plain CE, trained
once by nkd on the subset) is shared. Differences are reported paired by seed (mean ± std of
``nkd − mdistiller`` and the paired t statistic) next to each pipeline's mean ± std.

mdistiller is not on PyPI: ``--mdistiller`` points at its checkout or git directory (RESULTS.md:
commit a08d46f). Its package is unpacked into a temporary folder outside this repository
(``_mdistiller.py``) and its ``models/cifar/resnet.py`` and ``distillers/{_base,KD,DKD}.py`` are used
unmodified; what is not used is its CUDA
trainer class: the loop below is its ``train_iter`` (zero_grad, ``distiller(image=, target=,
epoch=)``, sum of the loss dict, backward, step) and its ``adjust_learning_rate``, on the CPU.

    python benchmarks/peers.py --data ../shared/data/cifar10-jpg.tar.gz --mdistiller /path/to/mdistiller \\
        [--train-images 5000 --epochs 15 --seeds 0,1,2,3,4 --methods kd,dkd --jobs 2]

Each finished run is appended to ``benchmarks/peers/runs.jsonl`` as it ends (top-1, training CPU
seconds, steps, the CPU model and a digest of the teacher checkpoint), so a stopped benchmark keeps
what it measured; ``--summarize`` prints the paired table from that file, one block per teacher
(runs are paired only with runs that distilled the same teacher).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "peers"
MEAN, STD = (0.4913, 0.4821, 0.4465), (0.2470, 0.2435, 0.2616)  # CIFAR-10 train statistics (both pipelines)
METHODS = {"kd": {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
           "dkd": {"alpha": 1.0, "beta": 2.0, "temperature": 4.0, "ce_weight": 1.0}}


def milestones(epochs: int) -> list[int]:
    return sorted({max(1, round(epochs * f)) for f in (0.625, 0.75, 0.875)})


# ----------------------------------------------------------------------------- data
def prepare_data(archive: Path, work: Path, n_train: int) -> Path:
    """``work/subset/{train,test}/<class>/*.jpg``: ``n_train`` training images drawn with a fixed seed."""
    import random

    root = work / "subset"
    if (root / "done").is_file():
        return root
    src = work / "cifar10-jpg"
    if not src.is_dir():
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
    files = sorted((src / "train").glob("*/*.jpg"))
    pick = sorted(random.Random(0).sample(files, n_train))
    for f in pick:
        dst = root / "train" / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    shutil.copytree(src / "test", root / "test")
    (root / "done").write_text(str(n_train))
    return root


# ----------------------------------------------------------------------------- nkd
def nkd_config(data: Path, out: Path, *, model: str, method: str, params: dict, epochs: int, seed: int,
               init: str | None = None, teacher: str | None = None) -> dict:
    cfg = {"seed": seed, "output_dir": str(out),
           "data": {"name": "image_folder_small", "root": str(data), "batch_size": 64, "drop_last": False,
                    "mean": list(MEAN), "std": list(STD), "cache_dir": str(data.parent / "cache"), "eval_batch_size": 500},
           "model": {"name": model, "num_classes": 10, **({"checkpoint": init} if init else {})},
           "method": {"name": method, "params": params},
           "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
           "schedule": {"name": "multistep", "epochs": epochs, "milestones": milestones(epochs), "gamma": 0.1},
           "train": {"threads": 1, "progress": False, "tensorboard": False, "eval_every": epochs}}
    if teacher:
        cfg["teacher"] = {"name": "resnet56", "num_classes": 10, "checkpoint": teacher}
    return cfg


def run_nkd(cfg: dict) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from nkd.config import load_config
    from nkd.engine import Trainer

    path = Path(cfg["output_dir"]).with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    path.write_text(yaml.safe_dump(cfg))

    class Timed(Trainer):  # CPU time of the training epochs only (as for mdistiller: no evaluation, no setup)
        cpu = 0.0

        def train_epoch(self, epoch):
            t0 = time.process_time()
            try:
                return super().train_epoch(epoch)
            finally:
                Timed.cpu += time.process_time() - t0

    trainer = Timed(load_config(path), overwrite=True)
    steps = trainer.steps_per_epoch() * cfg["schedule"]["epochs"]
    summary = trainer.fit()
    return {"top1": summary["last_top1"], "cpu_s": Timed.cpu, "steps": steps}


# ----------------------------------------------------------------------------- mdistiller
def load_mdistiller(source: Path, into: Path):
    """mdistiller's CIFAR ResNets and its KD / DKD distillers, from its package unpacked under ``into``."""
    import importlib

    import _mdistiller

    _mdistiller.unpack(source, into)
    names = {"models_cifar_resnet": "models.cifar.resnet", "distillers_KD": "distillers.KD", "distillers_DKD": "distillers.DKD"}
    return {k: importlib.import_module(f"mdistiller.{v}") for k, v in names.items()}


def run_mdistiller(source: Path, data: Path, method: str, params: dict, epochs: int, seed: int, init: str,
                   teacher: str) -> dict:
    from types import SimpleNamespace as NS

    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    np.random.seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        m = load_mdistiller(source, Path(tmp))
        student, t_model = m["models_cifar_resnet"].resnet20(num_classes=10), m["models_cifar_resnet"].resnet56(num_classes=10)
    student.load_state_dict(torch.load(init, weights_only=True))
    t_state = torch.load(teacher, weights_only=False)["trainable"]
    t_model.load_state_dict({k.removeprefix("student."): v for k, v in t_state.items() if k.startswith("student.")})
    p = params
    if method == "kd":
        cfg = NS(KD=NS(TEMPERATURE=p["temperature"], LOSS=NS(CE_WEIGHT=p["ce_weight"], KD_WEIGHT=p["kd_weight"])))
        distiller = m["distillers_KD"].KD(student, t_model, cfg)
    else:
        cfg = NS(DKD=NS(CE_WEIGHT=p["ce_weight"], ALPHA=p["alpha"], BETA=p["beta"], T=p["temperature"],
                        WARMUP=p["warmup_epochs"]))
        distiller = m["distillers_DKD"].DKD(student, t_model, cfg)
    train_tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    test_tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    train = DataLoader(datasets.ImageFolder(str(data / "train"), train_tf), batch_size=64, shuffle=True, num_workers=0)
    test = DataLoader(datasets.ImageFolder(str(data / "test"), test_tf), batch_size=500, shuffle=False, num_workers=0)
    opt = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    stages = milestones(epochs)
    t0, steps = time.process_time(), 0
    for epoch in range(1, epochs + 1):  # mdistiller counts epochs from 1
        k = int(np.sum(epoch > np.asarray(stages)))
        for g in opt.param_groups:
            g["lr"] = 0.05 * 0.1**k
        distiller.train()
        for image, target in train:  # its train_iter, on the CPU
            opt.zero_grad()
            _, losses = distiller(image=image.float(), target=target, epoch=epoch)
            sum(v.mean() for v in losses.values()).backward()
            opt.step()
            steps += 1
    cpu = time.process_time() - t0
    distiller.eval()
    correct = 0
    with torch.no_grad():
        for image, target in test:
            correct += int((distiller(image=image).argmax(1) == target).sum())
    return {"top1": 100.0 * correct / len(test.dataset), "cpu_s": cpu, "steps": steps}


# ----------------------------------------------------------------------------- driver
def child(args) -> None:
    job = json.loads(args.child)
    if job["pipeline"] == "nkd":
        res = run_nkd(job["cfg"])
    else:
        res = run_mdistiller(Path(job["mdistiller"]), Path(job["data"]), job["method"], job["params"], job["epochs"],
                             job["seed"], job["init"], job["teacher"])
    print("RESULT " + json.dumps(res))


def spawn(job: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))  # the script's folder (benchmarks/) is on sys.path
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, env=env)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{job['pipeline']} {job.get('method')} seed {job.get('seed')} failed:\n{r.stderr[-3000:]}")
    return {**{k: job[k] for k in ("pipeline", "method", "seed") if k in job}, **json.loads(line[7:])}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def paired(d: list[float]) -> str:
    """``mean ± std`` of the paired differences, t (df) and the 95 % confidence interval of the mean."""
    from scipy.stats import t as student_t

    if len(d) < 2:
        return f"{d[0]:+.2f} (n=1) | – | –"
    m, sd = statistics.mean(d), statistics.stdev(d)
    half = student_t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d))
    t = m / (sd / math.sqrt(len(d))) if sd > 0 else float("nan")
    return f"{m:+.2f} ± {sd:.2f} | {t:.2f} ({len(d) - 1}) | [{m - half:+.2f}, {m + half:+.2f}]"


def pairs(runs: list[dict], method: str) -> tuple[list, list, list]:
    """Seeds with both pipelines' run for ``method`` (within one block of runs), and those runs (nkd's, mdistiller's)."""
    by = {(r["pipeline"], r["seed"]): r for r in runs if r["method"] == method}
    seeds = sorted({s for _, s in by if ("nkd", s) in by and ("mdistiller", s) in by})
    return seeds, [by["nkd", s] for s in seeds], [by["mdistiller", s] for s in seeds]


def summarize(runs: list[dict]) -> str:
    """One table per block (teacher × CPU: runs pair only within a block), then each method's paired
    differences pooled over the blocks (a difference is taken within its pair, so the blocks' other
    differences — teacher, CPU — cancel in it)."""
    blocks: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        blocks.setdefault((r.get("teacher", "?"), r.get("cpu", "?")), []).append(r)
    out, pooled = [], {}
    for (teacher, cpu), rs in blocks.items():
        lines = [f"teacher {teacher} on {cpu}:", "| method | nkd top-1 | mdistiller top-1 | paired nkd − mdistiller | t (df) | "
                 "95 % CI | CPU s / step nkd | mdistiller | ratio |", "|---|---|---|---|---|---|---|---|---|"]
        for method in dict.fromkeys(r["method"] for r in rs):
            seeds, a, b = pairs(rs, method)
            if not seeds:
                continue
            pooled.setdefault(method, []).extend(x["top1"] - y["top1"] for x, y in zip(a, b))
            ta, tb = [x["top1"] for x in a], [y["top1"] for y in b]
            step = [statistics.mean(r["cpu_s"] / r["steps"] for r in side) for side in (a, b)]
            sd = [f"{statistics.stdev(x):.2f}" if len(x) > 1 else "–" for x in (ta, tb)]
            lines.append(f"| {method} (seeds {', '.join(map(str, seeds))}) | {statistics.mean(ta):.2f} ± {sd[0]} | "
                         f"{statistics.mean(tb):.2f} ± {sd[1]} | {paired([x - y for x, y in zip(ta, tb)])} | "
                         f"{step[0]:.3f} | {step[1]:.3f} | {step[0] / step[1]:.2f} |")
        out.append("\n".join(lines))
    if len(blocks) > 1:
        lines = ["pooled over the blocks:", "| method | pairs | paired nkd − mdistiller | t (df) | 95 % CI |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {len(d)} | {paired(d)} |" for m, d in pooled.items()]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, help="cifar10-jpg.tar.gz")
    ap.add_argument("--mdistiller", type=Path)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "nkd-peers")
    ap.add_argument("--train-images", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--methods", default="kd,dkd")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--summarize", action="store_true", help="print the paired table from benchmarks/peers/runs.jsonl and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    log = OUT / "runs.jsonl"
    if args.summarize:
        return print(summarize([json.loads(x) for x in log.read_text().splitlines() if x.strip()]))
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args.data, args.work, args.train_images)
    runs_dir = args.work / f"runs-{args.train_images}-{args.epochs}"
    teacher = runs_dir / "teacher" / "checkpoints" / "last.pt"
    if not (runs_dir / "teacher" / "summary.json").is_file():  # written when the teacher's run has finished
        cfg = nkd_config(data, runs_dir / "teacher", model="resnet56", method="ce", params={}, epochs=args.teacher_epochs,
                         seed=0)
        cfg["train"]["threads"] = args.jobs  # nothing else runs yet
        print("teacher:", spawn({"pipeline": "nkd", "method": "ce", "seed": 0, "cfg": cfg}), flush=True)
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from nkd.models import create_model

    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = []
    for seed in seeds:
        torch.manual_seed(seed)
        torch.save(create_model("resnet20", 10).state_dict(), runs_dir / f"init-resnet20-{seed}.pt")
    for method in args.methods.split(","):  # method by method: every seed of the first method comes first
        for seed in seeds:
            init = runs_dir / f"init-resnet20-{seed}.pt"
            params = dict(METHODS[method])
            if method == "dkd":
                params["warmup_epochs"] = max(1, args.epochs // 3)
            cfg = nkd_config(data, runs_dir / f"nkd-{method}-{seed}", model="resnet20", method=method, params=params,
                             epochs=args.epochs, seed=seed, init=str(init), teacher=str(teacher))
            jobs.append({"pipeline": "nkd", "method": method, "seed": seed, "cfg": cfg})
            jobs.append({"pipeline": "mdistiller", "method": method, "seed": seed, "params": params,
                         "epochs": args.epochs, "init": str(init), "teacher": str(teacher), "data": str(data),
                         "mdistiller": str(args.mdistiller)})
    from nkd.engine.step import cpu_model

    tag = {"teacher": digest(teacher), "cpu": cpu_model()}
    runs = []
    OUT.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for r in pool.map(spawn, jobs):
            r = {**r, **tag}
            print(json.dumps(r), flush=True)
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            runs.append(r)
    print(summarize(runs))


if __name__ == "__main__":
    main()
