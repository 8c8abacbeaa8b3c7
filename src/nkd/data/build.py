"""Build train/eval loaders from a :class:`~nkd.config.DataConfig`.

* In-memory small-image sets (``cifar10``, ``cifar100``, ``digits``, ``synthetic``,
  ``image_folder_small``) are loaded as uint8 arrays, one split at a time (:data:`ARRAY_SOURCES`),
  and served by :class:`~nkd.data.loaders.DeviceLoader` (random crop with ``crop_padding`` zero
  padding + flip for training).
* ``imagenet_folder`` goes through :func:`~nkd.data.loaders.folder_loader` (ImageNet transforms).

Folder layout (``data.root``): ``root/train/<class>/<image>`` and ``root/test`` or ``root/val``
(``imagenet_folder``: ``val`` first) with the same class sub-folders.

Normalization ``x ↦ (x/255 − mean)/std``: ``data.mean``/``data.std`` when given; otherwise the
known constants of CIFAR-10/100, ImageNet, digits and synthetic, and for ``image_folder_small`` the
per-channel statistics of its decoded training split (cached with the decode). The values used are
logged (logger ``nkd``).

:func:`build_eval_loader` builds only the evaluation split (``nkd eval``): no training images are
decoded; an image folder without ``data.mean/std`` reads its training statistics from the cache
(decoding the training split only if it was never decoded at this ``data.image_size``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .augment import (
    MixupCutmix,
)
from .datasets import ArrayDataset, class_dirs, image_folder_stats, load_cifar, load_digits, load_image_folder, synthetic
from .facts import DATASETS
from .loaders import DeviceLoader, folder_loader

log = logging.getLogger("nkd")

# derived from the dataset registry (nkd.data.facts), the one place each dataset's facts live
DEFAULT_STATS = {n: f.stats for n, f in DATASETS.items() if f.stats is not None}  # (mean, std)
KNOWN_CLASSES = {n: f.classes for n, f in DATASETS.items() if f.classes is not None}
FOLDER_DATASETS = tuple(n for n, f in DATASETS.items() if f.folder)
IMAGENET_SIZE = DATASETS["imagenet_folder"].default_size  # data.image_size default of imagenet_folder
EVAL_DIRS = {n: f.eval_dirs for n, f in DATASETS.items() if f.folder}


@dataclass
class Loaders:
    train: Any
    eval: Any
    num_classes: int
    sampler: Any = None
    mix: MixupCutmix | None = None  # applied by the trainer (folder loaders); DeviceLoader mixes itself
    input_shape: tuple[int, ...] = ()  # one training image [C, H, W] (what feature methods probe their shapes with)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.train, "set_epoch"):
            self.train.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def train_batches(self, start_step: int = 0, with_index: bool = False) -> Iterator:
        """This epoch's training batches from ``start_step`` on. In-memory datasets jump there
        directly (bitwise the batches of a full pass); a ``DataLoader`` loads and drops the skipped
        batches (the same samples in the same order — its sampler's order is a function of (seed,
        epoch) — but random augmentations come from fresh worker seeds). ``with_index``: batches
        are ``(x, y, dataset indices)`` (in-memory datasets only)."""
        if hasattr(self.train, "iterate"):
            return self.train.iterate(start_step, with_index=with_index)
        if with_index:
            raise ValueError("sample indices are available for in-memory datasets only (not imagenet_folder)")
        return itertools.islice(iter(self.train), start_step, None)

    @property
    def train_labels(self) -> Tensor | None:
        """Every training sample's label ``[N]`` by dataset index (in-memory datasets; else None)."""
        return getattr(self.train, "labels", None)


# ----------------------------------------------------------------------------- folder splits
def _root(d) -> Path:
    if not d.root:
        raise FileNotFoundError(f"data.root: required for data.name={d.name!r}")
    return Path(d.root)


def train_dir(d) -> Path:
    """``data.root/train``, or a FileNotFoundError naming ``data.root`` and the expected layout."""
    root = _root(d)
    if (root / "train").is_dir():
        return root / "train"
    raise FileNotFoundError(f"data.root: {root} has no training split: expected {root / 'train'}/<class>/<image>")


def eval_dir(d) -> Path:
    """``data.root/test`` or ``data.root/val`` (``imagenet_folder``: ``val`` first)."""
    root = _root(d)
    names = EVAL_DIRS[d.name]
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise FileNotFoundError(f"data.root: {root} has no evaluation split: expected {root / names[0]} or "
                            f"{root / names[1]} with one sub-folder per class (<split>/<class>/<image>)")


def checked_eval_dir(d) -> Path:
    """:func:`eval_dir`, checked to hold the same classes as the training split when that exists."""
    ev = eval_dir(d)
    train = _root(d) / "train"
    if train.is_dir():
        _check_same_classes(train, ev)
    return ev


def _check_same_classes(train: Path, ev: Path) -> None:
    """Labels are class indices in alphabetical order: both splits must list the same classes."""
    a, b = class_dirs(train), class_dirs(ev)
    if a != b:
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"data.root: the class sub-folders of {ev} differ from those of {train} "
                         f"(missing in {ev.name}: {missing[:5]}, extra: {extra[:5]}); labels would not match")


def dataset_num_classes(d) -> int | None:
    """The number of classes, known without decoding any image: CIFAR-10/100 10/100, digits 10,
    synthetic ``data.synthetic_classes``, folders the class sub-folders of ``data.root/train``
    (None when that folder is missing; :func:`train_dir` reports it)."""
    if d.name in KNOWN_CLASSES:
        return KNOWN_CLASSES[d.name]
    if d.name == "synthetic":
        return d.synthetic_classes
    if d.name in FOLDER_DATASETS:
        if not d.root or not (Path(d.root) / "train").is_dir():
            return None
        return len(class_dirs(Path(d.root) / "train"))
    raise ValueError(f"data.name: unknown dataset {d.name!r}")


# ----------------------------------------------------------------------------- in-memory arrays
def _synthetic(d, train: bool) -> ArrayDataset:
    n = d.synthetic_samples if train else max(d.synthetic_samples // 4, 8)
    return synthetic(n, num_classes=d.synthetic_classes, size=d.image_size or 32, seed=d.synthetic_seed,
                     split="train" if train else "test")


def _digits(d, train: bool) -> ArrayDataset:
    return load_digits(train=train)


def _cifar(d, train: bool) -> ArrayDataset:
    return load_cifar(d.root or "data", d.name, train=train, download=d.download, verify=d.verify_checksums)


def _small_folder(d, train: bool) -> ArrayDataset:
    split = train_dir(d) if train else checked_eval_dir(d)
    return load_image_folder(split, cache_dir=d.cache_dir, image_size=d.image_size)


ARRAY_SOURCES: dict[str, Callable[[Any, bool], ArrayDataset]] = {
    "synthetic": _synthetic, "digits": _digits, "cifar10": _cifar, "cifar100": _cifar,
    "image_folder_small": _small_folder,
}


def load_split(d, train: bool) -> ArrayDataset:
    """One split of an in-memory dataset (the other is not touched)."""
    return ARRAY_SOURCES[d.name](d, train)


# ----------------------------------------------------------------------------- normalization
def _check_stats(key: str, values: Sequence[float], positive: bool) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) != 3 or (positive and min(values) <= 0):
        kind = "positive values" if positive else "values"
        raise ValueError(f"{key}: expected 3 {kind} (R, G, B on the 0-1 scale; gray images are read as RGB), "
                         f"got {list(values)}")
    return values


def normalization(d, train: ArrayDataset | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for ``x ↦ (x/255 − mean)/std``, logged with their source. ``train``: the decoded
    training split when at hand (image folders take its statistics, else they are read from the
    cache of the training split's decode)."""
    if d.mean is not None and d.std is not None:
        mean, std, source = d.mean, d.std, "from data.mean/data.std"
    else:
        if d.name == "image_folder_small":
            stats = train.stats if train is not None and train.stats is not None else image_folder_stats(
                _stats_dir(d), cache_dir=d.cache_dir, image_size=d.image_size)
            (mean, std), source = (stats.mean, stats.std), f"computed from the training split ({stats.num_images} images)"
        else:
            (mean, std), source = DEFAULT_STATS[d.name], f"(the {d.name} constants)"
        if d.mean is not None or d.std is not None:
            mean, std = (d.mean, std) if d.mean is not None else (mean, d.std)
            source += f", except {'data.mean' if d.mean is not None else 'data.std'} (given)"
    mean, std = _check_stats("data.mean", mean, False), _check_stats("data.std", std, True)
    log.info("normalizing with mean %s std %s %s", _fmt(mean), _fmt(std), source)
    return mean, std


def _stats_dir(d) -> Path:
    try:
        return train_dir(d)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; it is needed for the normalization statistics (or set data.mean and "
                                "data.std, e.g. to the values the training run logged)") from None


def _fmt(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.4f}" for x in v) + ")"


# ----------------------------------------------------------------------------- loaders
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


def _folder_eval(cfg, device: torch.device, rank: int, world_size: int, mean, std):
    d = cfg.data
    loader, _, _ = folder_loader(str(checked_eval_dir(d)), d.eval_batch_size, train=False,
                                 image_size=d.image_size or IMAGENET_SIZE,
                                 num_workers=d.num_workers, rank=rank, world_size=world_size, seed=cfg.seed, mean=mean,
                                 std=std, pin_memory=torch.device(device).type == "cuda")
    return loader


def _array_eval(cfg, device: torch.device, rank: int, world_size: int, mean, std, te: ArrayDataset) -> DeviceLoader:
    return DeviceLoader(te, cfg.data.eval_batch_size, train=False, device=device, mean=mean, std=std, rank=rank,
                        world_size=world_size, channels_last=cfg.train.channels_last)


def build_eval_loader(cfg, device: torch.device, rank: int = 0, world_size: int = 1):
    """The evaluation loader alone: only the evaluation split is read (see the module docstring)."""
    d = cfg.data
    if d.name in FOLDER_DATASETS:
        checked_eval_dir(d)  # a missing split is reported before any statistics are computed
    mean, std = normalization(d)
    if d.name == "imagenet_folder":
        return _folder_eval(cfg, device, rank, world_size, mean, std)
    return _array_eval(cfg, device, rank, world_size, mean, std, load_split(d, train=False))


def build_loaders(cfg, device: torch.device, rank: int = 0, world_size: int = 1) -> Loaders:
    d = cfg.data
    batch = per_process_batch(d, world_size)
    if d.name == "imagenet_folder":
        mean, std = normalization(d)
        train, sampler, classes = folder_loader(str(train_dir(d)), batch, train=True,
                                                image_size=d.image_size or IMAGENET_SIZE,
                                                num_workers=d.num_workers, rank=rank, world_size=world_size,
                                                seed=cfg.seed, mean=mean, std=std, randaugment=d.randaugment,
                                                pin_memory=torch.device(device).type == "cuda", drop_last=d.drop_last)
        ev = _folder_eval(cfg, device, rank, world_size, mean, std)
        side = d.image_size or IMAGENET_SIZE
        return Loaders(train, ev, len(classes), sampler, make_mix(d, len(classes)), (3, side, side))
    tr = load_split(d, train=True)
    mean, std = normalization(d, tr)
    te = load_split(d, train=False)
    tr = tr.subset(d.train_subset, d.subset_seed)
    mix = make_mix(d, tr.num_classes)
    train = DeviceLoader(tr, batch, train=True, device=device, mean=mean, std=std, pad=d.crop_padding, flip=d.flip,
                         mix=mix, seed=cfg.seed, rank=rank, world_size=world_size, drop_last=d.drop_last,
                         channels_last=cfg.train.channels_last)
    return Loaders(train, _array_eval(cfg, device, rank, world_size, mean, std, te), tr.num_classes,
                   input_shape=(tr.images.shape[3], *tr.images.shape[1:3]))  # stored [N, H, W, C]
