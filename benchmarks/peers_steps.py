"""Training-step CPU time of every method nkd shares with mdistiller, each library running its own
step code on the same tensors: resnet32x4 → resnet8x4 (CIFAR-100 shapes, batch 64, the same
weights in both), one thread, interleaved rounds.

nkd: the shipped ``configs/cifar100/<method>/resnet32x4_resnet8x4.yaml`` with the data swapped for
in-memory synthetic images (50,000 of 100 classes, CIFAR-100's size, for CRD's memory) and a
seeded teacher; one step is what ``Trainer.train_epoch`` does per batch — the shared teacher
forward with the method's declared outputs, then ``Student.train_step`` (lr schedule, forward, loss,
non-finite guard, backward, gradient norm, SGD). mdistiller: its distiller built from its own
``CFG`` merged with its ``configs/cifar100/<method>.yaml``; one step is its ``BaseTrainer.train_iter``
on the CPU (zero_grad, ``distiller(image=, target=, epoch=)``, sum of the loss dict, backward, SGD
step). Neither side's data pipeline is timed: batches are tensors made once, except that nkd draws
CRD's 16,384 negatives inside its step while mdistiller's loader draws them per sample
(``CIFAR100InstanceSample``); that loader work is timed separately and reported, not added.

    python benchmarks/peers_steps.py --mdistiller /path/to/mdistiller[.git] [--steps 10 --rounds 5]

Besides nkd's ``[dev]`` extra it needs what mdistiller's own modules import: ``pip install yacs
tensorboardX`` (benchmark-only; never a dependency of nkd).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import _mdistiller  # noqa: E402

# nkd method → mdistiller config file (its default pair is resnet32x4 → resnet8x4)
MDX_CONFIG = {"kd": "kd.yaml", "dkd": "dkd/res32x4_res8x4.yaml", "fitnet": "fitnet.yaml", "at": "at.yaml",
              "rkd": "rkd.yaml", "crd": "crd.yaml", "reviewkd": "reviewkd.yaml"}
N_DATA, CLASSES, EPOCH = 50_000, 100, 30  # epoch 30: past every warm-up


def nkd_step(method: str, work: Path):
    from nkd.config import load_config
    from nkd.engine import Trainer
    from nkd.methods import Sample

    cfg = load_config(ROOT / "configs" / "cifar100" / method / "resnet32x4_resnet8x4.yaml", [
        "data.name=synthetic", f"data.synthetic_classes={CLASSES}", f"data.synthetic_samples={N_DATA}",
        "data.download=false", "teacher.checkpoint=", f"output_dir={work / method}", "train.threads=1",
        "train.progress=false", "train.tensorboard=false"])
    trainer = Trainer(cfg, overwrite=True)
    s = trainer.students[0]
    labels = trainer.loaders.train_labels

    def step(x, y, idx, i):
        teacher = trainer.teacher(x, trainer.teacher_outputs)
        sample = Sample(idx, i) if s.method.needs_index else None
        s.train_step(x, y, teacher, EPOCH + 0.5, check_labels=False, sample=sample)

    return trainer, step, labels


def mdx_step(method: str, root: Path, trainer, labels: torch.Tensor):
    from mdistiller.distillers import distiller_dict
    from mdistiller.engine.cfg import CFG
    from mdistiller.models.cifar import cifar_model_dict

    _mdistiller.crd_on_cpu()
    cfg = CFG.clone()
    cfg.merge_from_file(str(root / "configs" / "cifar100" / MDX_CONFIG[method]))
    student = cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=CLASSES)
    teacher = cifar_model_dict[cfg.DISTILLER.TEACHER][0](num_classes=CLASSES)
    student.load_state_dict(trainer.students[0].trainable.student.state_dict())  # the same weights as nkd's
    teacher.load_state_dict(trainer.teacher.model.state_dict())
    kind = cfg.DISTILLER.TYPE
    distiller = (distiller_dict[kind](student, teacher, cfg, N_DATA) if kind == "CRD"
                 else distiller_dict[kind](student, teacher, cfg))
    distiller.train()
    opt = torch.optim.SGD(distiller.get_learnable_parameters(), lr=cfg.SOLVER.LR, momentum=cfg.SOLVER.MOMENTUM,
                          weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    k = cfg.CRD.NCE.K
    y_np = labels.numpy()
    cls_negative = [np.flatnonzero(y_np != c) for c in range(CLASSES)] if kind == "CRD" else []  # CRD's loader only

    def negatives(idx, y):  # what its CIFAR100InstanceSample.__getitem__ does per sample ("exact" mode)
        return torch.from_numpy(np.stack([np.hstack((np.asarray([int(i)]),
                                                     np.random.choice(cls_negative[int(t)], k, replace=True)))
                                          for i, t in zip(idx, y)]))

    def step(x, y, idx, contrast):
        opt.zero_grad()
        _, losses = distiller(image=x, target=y, epoch=EPOCH, index=idx, contrastive_index=contrast)
        sum(v.mean() for v in losses.values()).backward()
        opt.step()

    return step, negatives


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mdistiller", type=Path, required=True)
    ap.add_argument("--methods", default=",".join(MDX_CONFIG))
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = _mdistiller.unpack(args.mdistiller, Path(tmp) / "mdx")
        for method in args.methods.split(","):
            torch.manual_seed(0)
            np.random.seed(0)
            trainer, ours, labels = nkd_step(method, Path(tmp) / "runs")
            theirs, negatives = mdx_step(method, root, trainer, labels)
            g = torch.Generator().manual_seed(1)
            batches = []
            for _ in range(args.steps):
                idx = torch.randint(0, N_DATA, (args.batch,), generator=g)
                batches.append((torch.randn(args.batch, 3, 32, 32, generator=g), labels[idx], idx))
            t0 = time.process_time()
            contrast = [negatives(idx, y) for _, y, idx in batches] if method == "crd" else [None] * len(batches)
            loader_s = (time.process_time() - t0) / len(batches)
            times = {"nkd": [], "mdistiller": []}
            for r in range(args.rounds + 1):  # round 0 warms up both
                for name in ("nkd", "mdistiller") if r % 2 == 0 else ("mdistiller", "nkd"):
                    t0 = time.process_time()
                    for i, ((x, y, idx), c) in enumerate(zip(batches, contrast)):
                        ours(x, y, idx, r * len(batches) + i) if name == "nkd" else theirs(x, y, idx, c)
                    if r:
                        times[name].append((time.process_time() - t0) / len(batches))
            trainer.close()
            a, b = statistics.median(times["nkd"]), statistics.median(times["mdistiller"])
            rows.append((method, a, b, loader_s if method == "crd" else None))
            print(f"{method}: nkd {a * 1e3:.1f} ms, mdistiller {b * 1e3:.1f} ms, ratio {a / b:.2f}", flush=True)
    print(f"\nmdistiller {_mdistiller.commit(args.mdistiller)}, torch {torch.__version__}, 1 thread, "
          f"batch {args.batch}, {args.steps} steps × {args.rounds} rounds, median CPU ms per step")
    print("| method | nkd | mdistiller | nkd / mdistiller |\n|---|---|---|---|")
    for method, a, b, loader in rows:
        extra = f" (+ {loader * 1e3:.0f} ms loader-side negative sampling per batch in mdistiller)" if loader else ""
        print(f"| {method} | {a * 1e3:.1f} | {b * 1e3:.1f}{extra} | {a / b:.2f}× |")


if __name__ == "__main__":
    main()
