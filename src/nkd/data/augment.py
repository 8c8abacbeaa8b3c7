"""Batched augmentation on the training device.

``crop_flip_normalize`` does per-sample random crop with zero padding and horizontal flip in
one gather over a uint8 channels-last batch, then converts to normalized float NCHW:
``out = (x[oy:oy+H, ox:ox+W] (flipped) / 255 − mean) / std``.
Mixup/CutMix come from ``torchvision.transforms.v2`` and turn labels into soft labels ``[N, C]``;
every draw they make (the coin, λ, the CutMix box) comes from the caller's generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .facts import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401


def normalize_uint8(x: Tensor, mean: Sequence[float], std: Sequence[float], dtype=torch.float32) -> Tensor:
    """uint8 ``[N, H, W, 3]`` → normalized float ``[N, 3, H, W]``."""
    m = torch.tensor(mean, device=x.device, dtype=dtype).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=x.device, dtype=dtype).view(1, 3, 1, 1) * 255
    return (x.permute(0, 3, 1, 2).to(dtype) - m) / s


def crop_flip_normalize(x: Tensor, oy: Tensor, ox: Tensor, flip: Tensor, pad: int,
                        mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Random crop (offsets ``oy, ox`` in ``[0, 2·pad]`` of the zero-padded image) + flip.

    Args:
        x: uint8 ``[B, H, W, C]`` on any device.
        oy, ox: int64 ``[B]`` crop offsets; ``flip``: bool ``[B]``.
    """
    b, h, w, _ = x.shape
    if pad:
        x = F.pad(x, (0, 0, pad, pad, pad, pad))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h
    cols = ox[:, None] + torch.where(flip[:, None], (w - 1) - ar_w, ar_w)
    out = x[torch.arange(b, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return normalize_uint8(out, mean, std)


class MixupCutmix:
    """Apply MixUp (``mixup_alpha``) or CutMix (``cutmix_alpha``), chosen with probability
    ``switch_prob`` for CutMix when both are on, with probability ``prob`` per batch; labels
    become soft ``[N, C]`` and are optionally smoothed ``y·(1−ε) + ε/C``."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.0):
        from torchvision.transforms import v2

        self.num_classes, self.prob, self.eps = num_classes, prob, label_smoothing
        self.switch_prob = switch_prob if mixup_alpha > 0 and cutmix_alpha > 0 else (1.0 if cutmix_alpha > 0 else 0.0)
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Mix one batch. Every random draw — the two coins, then λ and the CutMix box — comes from
        ``generator`` (torchvision draws λ and the box from the global CPU RNG, so its op runs under
        a forked global RNG seeded from ``generator``; the caller's global RNG is left as it was)."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator (the batch's own stream), got {type(generator).__name__}")
        u = torch.rand(2, generator=generator).tolist()
        if (self.mixup is None and self.cutmix is None) or u[0] >= self.prob:
            y = F.one_hot(labels, self.num_classes).to(images.dtype)
        else:
            op = self.cutmix if u[1] < self.switch_prob else self.mixup
            seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                images, y = op(images, labels)
        if self.eps:
            y = y * (1 - self.eps) + self.eps / self.num_classes
        return images, y
