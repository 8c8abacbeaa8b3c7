"""Device checks for a lent GPU (not part of CI): losses on CUDA match the CPU float64 values,
autocast (bf16/fp16) keeps them float32 with grads in the input dtype, and the Trainer runs a few
steps with bf16, fp16+GradScaler, channels_last, EMA and torch.compile.

    python benchmarks/cuda_smoke.py [--device cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from nkd.config import load_config
from nkd.engine import Trainer
from nkd.losses import dkd_loss, kd_loss, nkd_loss, uskd_loss


def check_losses(dev: str) -> None:
    g = torch.Generator().manual_seed(0)
    z, u, w = (torch.randn(256, 1000, generator=g) * 3 for _ in range(3))
    t = torch.randint(0, 1000, (256,), generator=g)
    fns = {
        "nkd": lambda z, u, w, t: nkd_loss(z, u, t, temperature=2.0),
        "uskd": lambda z, u, w, t: uskd_loss(z, w, t),
        "uskd_official": lambda z, u, w, t: uskd_loss(z, w, t, rank="official"),
        "kd": lambda z, u, w, t: kd_loss(z, u),
        "dkd": lambda z, u, w, t: dkd_loss(z, u, t),
    }
    for name, fn in fns.items():
        ref = fn(z.double(), u.double(), w.double(), t)
        zc = z.detach().clone().to(dev).requires_grad_(True)
        got = fn(zc, u.to(dev), w.to(dev), t.to(dev))
        got.backward()
        err = abs(float(got) - float(ref))
        for dtype in (torch.bfloat16, torch.float16):
            zh = z.detach().to(dev, dtype).requires_grad_(True)
            with torch.autocast(dev, dtype=dtype):
                lh = fn(zh, u.to(dev, dtype), w.to(dev, dtype), t.to(dev))
            lh.backward()
            assert lh.dtype == torch.float32 and zh.grad.dtype == dtype and torch.isfinite(zh.grad).all(), name
        assert err < 1e-4 * max(1, abs(float(ref))), (name, float(got), float(ref))
        print(f"loss {name:14s} cuda fp32 {float(got):.6f} vs cpu fp64 {float(ref):.6f} (|diff| {err:.2e}); "
              "bf16/fp16 autocast ok")


def check_trainer(dev: str) -> None:
    base = ["data.name=synthetic", "data.synthetic_samples=1024", "data.synthetic_classes=10", "data.batch_size=64",
            "model.name=resnet8x4", "model.num_classes=10", "teacher={name: resnet32x4, num_classes: 10}",
            "method.name=nkd", "schedule.epochs=2", "train.progress=false", "train.tensorboard=false",
            f"train.device={dev}"]
    variants = {
        "bf16+channels_last+ema": ["train.amp=bf16", "train.channels_last=true", "train.ema_decay=0.99"],
        "fp16+GradScaler": ["train.amp=fp16"],
        "bf16+compile": ["train.amp=bf16", "train.compile=true"],
        "uskd bf16": ["train.amp=bf16", "method.name=uskd", "teacher=null"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in variants.items():
            t0 = time.perf_counter()
            cfg = load_config(None, base + extra + [f"output_dir={tmp}/{name.replace('+', '_')}"])
            s = Trainer(cfg).fit()
            print(f"trainer {name:24s} last top1 {s['last_top1']:.2f} ({time.perf_counter() - t0:.1f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-trainer", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda":
        print(torch.cuda.get_device_name(), torch.__version__)
    check_losses(args.device)
    if not args.skip_trainer:
        check_trainer(args.device)


if __name__ == "__main__":
    main()
