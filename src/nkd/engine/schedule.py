r"""Learning-rate schedules as pure functions of (fractional) epoch, so resuming needs no state.

* ``multistep``: ``lr·γ^{#\{m ≤ ⌊e⌋\}}`` (the CRD/official recipes step at epoch boundaries);
* ``cosine``: ``min_lr + (lr − min_lr)·½(1 + cos(π·(e − w)/(E − w)))`` after warm-up;
* ``exponential``: ``lr·γ^{⌊e⌋}`` (per-epoch decay, the MobileNetV2 recipe);
* ``linear``: ``min_lr + (lr − min_lr)·(1 − (e − w)/(E − w))`` (the ShuffleNetV2 recipe);
* ``constant``.

Linear warm-up over ``w`` epochs (per step) from ``warmup_start_factor·lr`` applies to all.
"""

from __future__ import annotations

import math

from ..config import ScheduleConfig


def lr_at(base_lr: float, s: ScheduleConfig, epoch: float) -> float:
    if s.warmup_epochs > 0 and epoch < s.warmup_epochs:
        f = s.warmup_start_factor + (1 - s.warmup_start_factor) * epoch / s.warmup_epochs
        return base_lr * f
    if s.name == "multistep":
        return base_lr * s.gamma ** sum(1 for m in s.milestones if m <= math.floor(epoch + 1e-9))
    span = max(s.epochs - s.warmup_epochs, 1e-9)
    t = min(max((epoch - s.warmup_epochs) / span, 0.0), 1.0)
    if s.name == "cosine":
        return s.min_lr + (base_lr - s.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    if s.name == "linear":
        return s.min_lr + (base_lr - s.min_lr) * (1 - t)
    if s.name == "exponential":
        return base_lr * s.gamma ** math.floor(epoch + 1e-9)
    return base_lr
