"""Non-finite guard: a NaN/Inf loss term or gradient stops the run or skips the step.

``train.nan_policy="skip"`` checks each step on the host (one sync per step) and skips a bad
one. ``"stop"`` keeps a flag on the device (no sync) — the first global step with a non-finite
value and a bitmask of the offending terms — and :meth:`NonFiniteGuard.first_failure` reads it
at ``log_every`` boundaries, before any checkpoint is written, and at the end of the epoch:
nothing non-finite is ever saved.
"""

from __future__ import annotations

import torch

from .distributed import DistInfo, all_reduce_max


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/Inf."""


class NonFiniteGuard:
    def __init__(self, policy: str, device: torch.device, dist: DistInfo):
        self.skip = policy == "skip"
        self.device, self.dist = device, dist
        self.reset()

    def reset(self) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.bad_terms = torch.zeros((), dtype=torch.long, device=self.device)

    def record(self, losses: dict[str, torch.Tensor], grads_ok: torch.Tensor, global_step: int) -> None:
        """Remember (on the device) the first step with a non-finite term or gradient
        (bit ``len(losses)`` of the mask: the gradient)."""
        flags = [~torch.isfinite(v.detach()) for v in losses.values()] + [~grads_ok]
        bits = sum(f.long() << j for j, f in enumerate(flags))
        first = (self.first_bad < 0) & (bits > 0)
        self.first_bad = torch.where(first, torch.full_like(self.first_bad, global_step), self.first_bad)
        self.bad_terms = torch.where(first, bits, self.bad_terms)

    def first_failure(self, names: list[str]) -> tuple[int, list[str]] | None:
        """``(global step, offending terms)`` of the first recorded failure on any rank, or None
        (a collective under DDP: every rank calls it)."""
        step = int(all_reduce_max(self.first_bad.clone(), self.dist))
        if step < 0:
            return None
        bits = int(self.bad_terms)
        what = [n for j, n in enumerate(names) if bits >> j & 1] + (["gradient"] if bits >> len(names) & 1 else [])
        return step, what
