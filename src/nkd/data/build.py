"""Build train/eval loaders from a :class:`~nkd.config.DataConfig`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MixupCutmix,
)
from .datasets import ArrayDataset, load_cifar, load_digits, load_image_folder, synthetic
from .loaders import DeviceLoader, folder_loader

DEFAULT_STATS = {
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "image_folder_small": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet_folder": (IMAGENET_MEAN, IMAGENET_STD),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "digits": ((0.31, 0.31, 0.31), (0.38, 0.38, 0.38)),
}


@dataclass
class Loaders:
    train: Any
    eval: Any
    num_classes: int
    sampler: Any = None
    mix: MixupCutmix | None = None  # applied by the trainer (folder loaders); DeviceLoader mixes itself

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.train, "set_epoch"):
            self.train.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def train_batches(self, start_step: int = 0) -> Iterator:
        """This epoch's training batches from ``start_step`` on. In-memory datasets jump there
        directly (bitwise the batches of a full pass); a ``DataLoader`` loads and drops the skipped
        batches (the same samples in the same order — its sampler's order is a function of (seed,
        epoch) — but random augmentations come from fresh worker seeds)."""
        if hasattr(self.train, "iterate"):
            return self.train.iterate(start_step)
        return itertools.islice(iter(self.train), start_step, None)


def _split_dir(root: Path, names: tuple[str, ...]) -> Path:
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise FileNotFoundError(f"{root} has none of the sub-folders {names}")


def load_arrays(d) -> tuple[ArrayDataset, ArrayDataset]:
    """Train/eval arrays for the small-image datasets."""
    if d.name == "synthetic":
        kw = dict(num_classes=d.synthetic_classes, size=d.image_size, seed=d.synthetic_seed)
        return synthetic(d.synthetic_samples, split="train", **kw), synthetic(max(d.synthetic_samples // 4, 8),
                                                                                split="test", **kw)
    if d.name == "digits":
        return load_digits(train=True), load_digits(train=False)
    if d.name in ("cifar10", "cifar100"):
        root = d.root or "data"
        kw = dict(download=d.download, verify=d.verify_checksums)
        return load_cifar(root, d.name, train=True, **kw), load_cifar(root, d.name, train=False, **kw)
    root = Path(d.root)
    return (load_image_folder(_split_dir(root, ("train",)), cache_dir=d.cache_dir),
            load_image_folder(_split_dir(root, ("test", "val")), cache_dir=d.cache_dir))


def make_mix(d, num_classes: int) -> MixupCutmix | None:
    """MixUp/CutMix/label smoothing from the data config, or None when all are off."""
    if d.mixup > 0 or d.cutmix > 0 or d.label_smoothing > 0:
        return MixupCutmix(num_classes, d.mixup, d.cutmix, label_smoothing=d.label_smoothing)
    return None


def per_process_batch(d, world_size: int) -> int:
    if d.global_batch_size is None:
        return d.batch_size
    if d.global_batch_size % world_size:
        raise ValueError(f"data.global_batch_size={d.global_batch_size} is not divisible by the {world_size} processes")
    return d.global_batch_size // world_size


def build_loaders(cfg, device: torch.device, rank: int = 0, world_size: int = 1) -> Loaders:
    d = cfg.data
    batch = per_process_batch(d, world_size)
    mean, std = DEFAULT_STATS[d.name]
    mean, std = tuple(d.mean or mean), tuple(d.std or std)
    if d.name == "imagenet_folder":
        root = Path(d.root)
        train, sampler, classes = folder_loader(str(_split_dir(root, ("train",))), batch, train=True,
                                                image_size=d.image_size, num_workers=d.num_workers, rank=rank,
                                                world_size=world_size, seed=cfg.seed, mean=mean, std=std,
                                                randaugment=d.randaugment)
        ev, _, _ = folder_loader(str(_split_dir(root, ("val", "test"))), d.eval_batch_size, train=False,
                                 image_size=d.image_size, num_workers=d.num_workers, rank=rank,
                                 world_size=world_size, seed=cfg.seed, mean=mean, std=std)
        return Loaders(train, ev, len(classes), sampler, make_mix(d, len(classes)))
    tr, te = load_arrays(d)
    tr = tr.subset(d.train_subset, d.subset_seed)
    mix = make_mix(d, tr.num_classes)
    channels_last = cfg.train.channels_last
    train = DeviceLoader(tr, batch, train=True, device=device, mean=mean, std=std, pad=d.crop_padding, flip=d.flip,
                         mix=mix, seed=cfg.seed,
                         rank=rank, world_size=world_size, channels_last=channels_last)
    ev = DeviceLoader(te, d.eval_batch_size, train=False, device=device, mean=mean, std=std, rank=rank,
                      world_size=world_size, channels_last=channels_last)
    return Loaders(train, ev, tr.num_classes)
