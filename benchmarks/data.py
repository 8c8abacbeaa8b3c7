"""CIFAR-style training batches per second: nkd's DeviceLoader vs the classic torchvision pipeline.

Baseline (as the CRD/mdistiller recipe runs it): ``torchvision.datasets.ImageFolder`` +
``DataLoader(num_workers=2)`` + PIL ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
``ToTensor``, ``Normalize``. nkd: the folder decoded once (content-keyed cache), then
``DeviceLoader`` crops/flips/normalizes whole batches on the device. Same batch size, one run.

    python benchmarks/data.py [--root ../shared/data/cifar10-jpg/train] [--batch-size 64] [--device cpu]

Without ``--root`` the shared CIFAR-10 JPEG archive is unpacked to a temp dir if present,
otherwise a synthetic 50,000-image JPEG folder (CIFAR-10's size) is written.
"""

from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nkd.data import CIFAR10_MEAN, CIFAR10_STD, DeviceLoader, load_image_folder

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def prepare_root(tmp: Path) -> Path:
    if SHARED.is_file():
        with tarfile.open(SHARED) as tf:
            tf.extractall(tmp, filter="data")
        return tmp / "cifar10-jpg" / "train"
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp / "synthetic" / "train"
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(5000):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.jpg")
    return root


def bench_baseline(root: Path, bs: int, batches: int) -> float:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    loader = DataLoader(datasets.ImageFolder(str(root), tf), batch_size=bs, shuffle=True, num_workers=2,
                        drop_last=True, persistent_workers=True)
    it = endless(loader)
    for _ in range(10):  # warm-up: workers started
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches / (time.perf_counter() - t0)


def endless(loader):
    """Batches from ``loader``, epoch after epoch."""
    while True:
        yield from loader


def bench_nkd(root: Path, bs: int, device: str, cache: Path) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    ds = load_image_folder(root, cache_dir=cache)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    ds = load_image_folder(root, cache_dir=cache)
    cached = time.perf_counter() - t0
    dl = DeviceLoader(ds, bs, train=True, device=device, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    t0 = time.perf_counter()
    n = 0
    for _batch in dl:
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), first, cached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", type=Path)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--baseline-batches", type=int, default=300)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = args.root or prepare_root(tmp)
        base = bench_baseline(root, args.batch_size, args.baseline_batches)
        ours, first, cached = bench_nkd(root, args.batch_size, args.device, tmp / "cache")
    print(f"# data: {root} | batch {args.batch_size} | device {args.device} | torch {torch.__version__}")
    print(f"decode once: {first:.1f} s; cached load: {cached:.1f} s")
    print("| pipeline | batches/s | images/s | ratio |")
    print("|---|---|---|---|")
    print(f"| torchvision ImageFolder + DataLoader(2 workers) + PIL | {base:.1f} | {base * args.batch_size:.0f} | 1.00× |")
    print(f"| nkd DeviceLoader ({args.device}) | {ours:.1f} | {ours * args.batch_size:.0f} | {ours / base:.2f}× |")


if __name__ == "__main__":
    main()
