"""Shared tensor helpers of the loss tests: seeded float64 logits, labels and mixup-style soft labels."""

from __future__ import annotations

import torch

D = torch.float64


def rand(*shape, scale=3.0, seed=0, dtype=D, grad=False):
    """Seeded ``N(0, scale²)`` values of ``shape``, drawn in float64 then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return x.requires_grad_(grad)


def labels(n, c, seed=0):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def mixed(n, c, seed=0, lam=0.7):
    """mixup-style soft labels: lam·onehot(a) + (1-lam)·onehot(b), some rows one-hot."""
    a, b = labels(n, c, seed), labels(n, c, seed + 1)
    y = torch.zeros(n, c, dtype=D)
    y[torch.arange(n), a] += lam
    y[torch.arange(n), b] += 1 - lam
    return y


def grad_of(fn, *xs):
    """Gradients of ``fn()`` w.r.t. ``xs`` (cleared first)."""
    for x in xs:
        x.grad = None
    fn().backward()
    return [x.grad.clone() for x in xs]
