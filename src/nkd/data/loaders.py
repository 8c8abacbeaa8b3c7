"""Batch iterators.

* :class:`DeviceLoader` — small datasets (CIFAR) held as uint8 on the training device and
  augmented there in batches. Order and augmentation come from a CPU generator seeded by
  ``(seed, epoch)``; a *global* batch of ``batch_size · world_size`` samples is drawn and rank
  ``r`` takes its ``r``-th slice, so N processes see exactly the samples (and crops/flips) of one
  process with the global batch.
* :func:`folder_loader` — ImageNet-style ``train/``/``val/`` folders through torchvision's
  ``ImageFolder`` and a ``DataLoader`` with workers (RandomResizedCrop + flip for training,
  resize + center crop for evaluation), sharded with ``DistributedSampler``. Memory is pinned
  only for a CUDA device (``pin_memory=None`` = when CUDA is available): a CPU run gets no
  pin-memory warning.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .augment import MixupCutmix, crop_flip_normalize, normalize_uint8
from .datasets import ArrayDataset


class DeviceLoader:
    def __init__(self, ds: ArrayDataset, batch_size: int, *, train: bool, device: str | torch.device = "cpu",
                 mean: Sequence[float], std: Sequence[float], pad: int = 4, flip: bool = True,
                 mix: MixupCutmix | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool | None = None, channels_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = ds.images.to(self.device)
        self.labels = ds.labels.to(self.device)
        self.num_classes = ds.num_classes
        self.batch_size, self.train, self.pad, self.flip = batch_size, train, pad, flip
        self.mean, self.std, self.mix, self.seed = tuple(mean), tuple(std), mix, seed
        self.rank, self.world_size = rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last = channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        if not self.train:
            return math.ceil(math.ceil(n / self.world_size) / self.batch_size)
        gb = self.batch_size * self.world_size
        if self.drop_last or n % gb == 0:
            return n // gb
        # the partial last batch is kept when every process gets at least one image of its slice
        tail = n % gb
        return n // gb + ((self.world_size - 1) * math.ceil(tail / self.world_size) < tail)

    def _finish(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iterate(0)

    def iterate(self, start_step: int = 0, with_index: bool = False) -> Iterator[tuple[Tensor, ...]]:
        """The epoch's batches from ``start_step`` on (training): the same batches, augmentations and
        mixes as a full pass would give from that step, without computing the skipped ones. With
        ``with_index``, each batch also carries its samples' dataset indices ``[B]`` (training only)."""
        n = len(self.labels)
        if not self.train:
            idx = torch.arange(self.rank, n, self.world_size, device=self.device)
            for i in range(0, len(idx), self.batch_size):
                b = idx[i:i + self.batch_size]
                yield self._finish(normalize_uint8(self.images[b], self.mean, self.std)), self.labels[b]
            return
        # All randomness of the epoch is drawn up front on the CPU and moved once: no per-step
        # host-to-device copies (which would stall an asynchronous GPU pipeline).
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        steps = len(self)
        gb = self.batch_size * self.world_size
        total = min(steps * gb, n)
        perm = torch.randperm(n, generator=g)[:total]
        oy = torch.randint(0, 2 * self.pad + 1, (total,), generator=g)
        ox = torch.randint(0, 2 * self.pad + 1, (total,), generator=g)
        fl = torch.rand(total, generator=g) < 0.5 if self.flip else torch.zeros(total, dtype=torch.bool)
        mix_seeds = torch.randint(0, 2**62, (steps,), generator=g).tolist()
        perm, oy, ox, fl = (t.to(self.device, non_blocking=True) for t in (perm, oy, ox, fl))
        for step in range(start_step, steps):
            start = step * gb
            m = min(gb, total - start)
            per = math.ceil(m / self.world_size)
            sl = slice(start + self.rank * per, start + min((self.rank + 1) * per, m))
            b = perm[sl]
            x = crop_flip_normalize(self.images[b], oy[sl], ox[sl], fl[sl], self.pad, self.mean, self.std)
            y = self.labels[b]
            if self.mix is not None:
                x, y = self.mix(x, y, torch.Generator().manual_seed(mix_seeds[step] + self.rank))
            yield (self._finish(x), y, b) if with_index else (self._finish(x), y)


def folder_loader(root: str, batch_size: int, *, train: bool, image_size: int = 224, num_workers: int = 4,
                  rank: int = 0, world_size: int = 1, seed: int = 0, mean=(0.485, 0.456, 0.406),
                  std=(0.229, 0.224, 0.225), pin_memory: bool | None = None, randaugment: bool = False,
                  drop_last: bool = True):
    """``DataLoader`` over ``torchvision.datasets.ImageFolder(root)`` with the standard ImageNet
    transforms; returns ``(loader, train_sampler_or_None, classes)``. ``drop_last`` (training only):
    drop the last partial batch (the sampler also drops the tail that does not divide over the
    processes). Classes are the non-hidden
    sub-folders (:func:`~nkd.data.datasets.class_dirs`). ``pin_memory=None`` pins when CUDA is
    available. Call the sampler's ``set_epoch(e)`` before each training epoch
    (``Loaders.set_epoch`` does)."""
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision.transforms import v2

    from ._folder import ImageFolder

    if train:
        tf = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
        if randaugment:
            tf.append(v2.RandAugment(num_ops=2, magnitude=9))
    else:
        tf = [v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size)]
    tf += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    ds = ImageFolder(root, transform=v2.Compose(tf))
    sampler = None
    if train:  # the order of epoch e is a function of (seed, e) on any number of processes: resumes replay it
        sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
    elif world_size > 1:  # every image exactly once over the ranks (DistributedSampler would pad with repeats)
        sampler = range(rank, len(ds), world_size)
    g = torch.Generator().manual_seed(seed)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        drop_last=train and drop_last, generator=g, persistent_workers=num_workers > 0)
    return loader, (sampler if train else None), ds.classes

