"""CRD's contrastive sample indices (Tian et al., 2020): for each sample of a batch, the memory-bank
rows its scores are computed against — the positive first, then ``K`` negatives.

* ``mode="exact"``: the positive is the sample itself; ``"relax"``: a random sample of its class;
* negatives: ``K`` samples of the *other* classes, uniform without replacement (with replacement
  when there are fewer than ``K``), as the official ``CIFAR100InstanceSample`` draws them.

Every draw comes from a generator seeded by the step's seed (a function of seed, epoch, step and
rank), so a student draws the same indices alone or in a lockstep group, and after a resume.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("exact", "relax")


class ContrastSampler:
    """Per-class index lists of the training set's ``labels`` ``[N]`` and :meth:`draw`."""

    def __init__(self, labels: Tensor, k: int, mode: str = "exact"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        labels = labels.detach().cpu().long()
        if labels.ndim != 1 or not len(labels):
            raise ValueError(f"labels must be a non-empty [N] tensor of class ids, got shape {tuple(labels.shape)}")
        self.labels, self.k, self.mode = labels, k, mode
        classes = labels.unique().tolist()
        self.positive = {c: (labels == c).nonzero().squeeze(1) for c in classes}
        self.negative = {c: (labels != c).nonzero().squeeze(1) for c in classes}
        if any(not len(v) for v in self.negative.values()):
            raise ValueError("CRD needs at least two classes in the training set (negatives are other classes' samples)")

    def draw(self, index: Tensor, seed: int) -> Tensor:
        """``[B, 1 + K]`` indices for the batch's dataset ``index`` ``[B]``, drawn from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        rows = []
        for i in index.detach().cpu().tolist():
            c = int(self.labels[i])
            pos = self.positive[c]
            first = i if self.mode == "exact" else int(pos[torch.randint(len(pos), (1,), generator=g)])
            neg = self.negative[c]
            if self.k > len(neg):
                pick = neg[torch.randint(len(neg), (self.k,), generator=g)]
            else:
                pick = neg[torch.randperm(len(neg), generator=g)[: self.k]]
            rows.append(torch.cat([torch.tensor([first]), pick]))
        return torch.stack(rows).to(index.device)
