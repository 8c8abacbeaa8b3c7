"""Training images per second of one NKD step, resnet32x4 → resnet8x4, batch 64.

Baseline — a plain loop as the CRD/mdistiller recipe runs it: ``torchvision.datasets.ImageFolder``
+ ``DataLoader(num_workers=W)`` + PIL ``RandomCrop(32, 4)``/``RandomHorizontalFlip``/``ToTensor``/
``Normalize``, eager float32 models, teacher forward under ``no_grad``, the naive NKD formulation
(boolean-mask copies), SGD. nkd — the real :class:`nkd.engine.Trainer` on the same images:
decoded once, device-side augmentation, fused ``nkd_loss``, channels_last, once in float32 and once
with bf16 autocast (``train.amp=bf16``; on CPUs with AVX512-BF16/AMX it speeds up the teacher too);
``--compile-mode MODE`` adds fp32 and bf16 rows with torch.compile. Same machine, one run.

    python benchmarks/train_step.py [--device cpu|cuda] [--steps 60] [--workers 2] [--compile-mode reduce-overhead]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import endless, prepare_root  # noqa: E402
from losses import naive_nkd  # noqa: E402
from nkd.config import load_config  # noqa: E402
from nkd.data import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from nkd.engine import Trainer  # noqa: E402
from nkd.models import create_model  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def baseline(root: Path, device: str, steps: int, workers: int, bs: int = 64) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    loader = DataLoader(datasets.ImageFolder(str(root), tf), batch_size=bs, shuffle=True, num_workers=workers,
                        drop_last=True, pin_memory=device == "cuda", persistent_workers=workers > 0)
    torch.manual_seed(0)
    student = create_model("resnet8x4", 10).to(device).train()
    teacher = create_model("resnet32x4", 10).to(device).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    def step(x, y):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = F.cross_entropy(s, y) + naive_nkd(s, t, y, 1.0, 1.5)
        opt.zero_grad()
        loss.backward()
        opt.step()

    it = endless(loader)
    for _ in range(10):
        step(*next(it))
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    sync(device)
    return steps * bs / (time.perf_counter() - t0)


def ours(root: Path, device: str, steps: int, compile_mode: str | None, out: Path, amp: str) -> float:
    overrides = [
        f"output_dir={out}", f"data.root={root.parent}", f"train.device={device}",
        f"train.max_steps_per_epoch={steps}", "train.progress=false", "train.tensorboard=false",
        f"data.cache_dir={out / 'cache'}",
    ]
    overrides += ["train.channels_last=true", f"train.amp={amp}"]
    if compile_mode:
        overrides += ["train.compile=true", f"train.compile_mode={compile_mode}"]
    cfg = load_config(None, [
        "data.name=image_folder_small", "data.batch_size=64", "model.name=resnet8x4", "model.num_classes=10",
        "teacher={name: resnet32x4, num_classes: 10}", "method.name=nkd", "optim.lr=0.05", "schedule.epochs=2",
        *overrides,
    ])
    torch.manual_seed(0)
    t = Trainer(cfg)
    t.train_epoch(0)  # warm-up (and compilation)
    sync(device)
    stats = t.train_epoch(1)
    return stats["img_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compile-mode", default=None,
                    help="also time fp32 and bf16 + torch.compile with this mode (e.g. reduce-overhead = CUDA graphs)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = prepare_root(tmp)
        # the trainer reads <root>/train and <root>/test|val: give it an eval split
        test = root.parent / "test"
        if not test.exists():
            test.symlink_to(root, target_is_directory=True)
        base = baseline(root, args.device, args.steps, args.workers)
        variants = [("fp32", "none", None), ("bf16 autocast", "bf16", None)]
        if args.compile_mode:
            variants.append((f"fp32 + torch.compile({args.compile_mode})", "none", args.compile_mode))
            variants.append((f"bf16 autocast + torch.compile({args.compile_mode})", "bf16", args.compile_mode))
        fast = {label: ours(root, args.device, args.steps, mode, tmp / f"run_{j}", amp)
                for j, (label, amp, mode) in enumerate(variants)}
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# NKD step resnet32x4 -> resnet8x4, batch 64, {args.steps} timed steps | {name} | torch {torch.__version__}")
    print("| pipeline | images/s | ratio |")
    print("|---|---|---|")
    print(f"| plain loop: ImageFolder + DataLoader({args.workers} workers) + PIL, eager fp32, naive NKD | {base:.0f} | 1.00× |")
    for label, ips in fast.items():
        print(f"| nkd Trainer: device-side data, fused nkd_loss, channels_last, {label} | {ips:.0f} | "
              f"{ips / base:.2f}× |")


if __name__ == "__main__":
    main()
