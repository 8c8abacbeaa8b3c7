"""Perplexity and next-token top-1 of a causal LM on token blocks (token-weighted, padding-aware)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, blocks: Tensor, attention_mask: Tensor | None = None, batch_size: int = 8) -> dict:
    """``{"perplexity", "top1", "nll", "tokens"}`` over every next-token position of ``blocks``
    ``[n, L]``: position ``i`` predicts token ``i + 1``; positions whose target is padding
    (``attention_mask == 0``) are left out. Every counted token weighs the same (not every block).
    ``top1`` is in percent. The model is put back in the mode it was in."""
    if not isinstance(blocks, Tensor) or blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must be a [n, L] integer tensor with L >= 2, got {getattr(blocks, 'shape', type(blocks))}")
    if attention_mask is not None and attention_mask.shape != blocks.shape:
        raise ValueError(f"attention_mask must have the shape of blocks {tuple(blocks.shape)}, got {tuple(attention_mask.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, correct, count = 0.0, 0, 0
    try:
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i : i + batch_size].to(device)
            mask = None if attention_mask is None else attention_mask[i : i + batch_size].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = ids[:, 1:]
            valid = torch.ones_like(tgt, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
            lg, tg = logits[valid], tgt[valid]
            nll += float(F.cross_entropy(lg, tg, reduction="sum", ignore_index=-1_000_000)) if len(tg) else 0.0
            correct += int((lg.argmax(-1) == tg).sum())
            count += int(valid.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("blocks: no next-token position to evaluate (all padding)")
    return {"perplexity": math.exp(nll / count), "top1": 100.0 * correct / count, "nll": nll / count, "tokens": count}
