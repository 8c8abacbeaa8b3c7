"""The dense driver: runs any :class:`~nkd.losses.spec.LossSpec` on logits ``[..., C]``.

One path for every loss: check the call (:func:`~nkd.losses.spec.common_checks`, tensor shapes),
parse the target into rows (:func:`~nkd.losses._common.parse_rows`), compute the rows in float32
(float64 stays float64) with autocast off, attach the spec's analytic gradient or let autograd
differentiate its rows, and reduce (``"mean"`` over valid rows, 0 when none; ``"sum"``;
``"none"``: per-row values ``[...]``). Parts, where a spec has them, are reduced the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import Rows, check_logits, compute_dtype, no_autocast, parse_rows, reduce_rows, row_loss_with_grad
from .spec import LossSpec, common_checks

__all__ = ["dense_loss", "all_rows"]


def all_rows(logits: Tensor) -> Rows:
    """Rows of ``logits`` ``[..., C]`` without a target: every row valid, class index 0."""
    c = logits.shape[-1]
    flat = logits.reshape(-1, c)
    m = flat.shape[0]
    return Rows(flat, torch.zeros(m, dtype=torch.long, device=logits.device),
                torch.ones(m, dtype=torch.bool, device=logits.device), None, logits.shape[:-1])


def _check_inputs(spec: LossSpec, tensors: tuple[Tensor | None, ...]) -> None:
    names = [i.name for i in spec.inputs]
    if len(tensors) != len(names):
        raise TypeError(f"{type(spec).__name__} takes {len(names)} tensor(s) before target ({', '.join(names)}), "
                        f"got {len(tensors)}")
    check_logits(names[0], tensors[0])
    for name, x in zip(names[1:], tensors[1:]):
        check_logits(name, x)
        if x.shape != tensors[0].shape:
            raise ValueError(f"{name} must have the same shape as {names[0]}: got {tuple(x.shape)} vs "
                             f"{tuple(tensors[0].shape)}")


def dense_loss(spec: LossSpec, *tensors: Tensor, target: Tensor | None = None, reduction: str = "mean",
               ignore_index: int = -100, return_parts: bool = False, **extra: Tensor | None) -> Any:
    """The loss ``spec`` describes on ``tensors`` (its ``inputs``, e.g. student and teacher logits)
    and ``target``, reduced; ``(loss, parts)`` with ``return_parts``. See the module docstring."""
    common_checks(spec, reduction, ignore_index)
    _check_inputs(spec, tensors)
    z_in = tensors[0]
    if target is None:
        if spec.target == "required":
            raise TypeError(f"target is required by {spec.name or type(spec).__name__}")
        rows = all_rows(z_in)
    else:
        rows = parse_rows(z_in, target, ignore_index, name=spec.inputs[0].name)
    spec.check_rows(rows)
    dtype = compute_dtype(z_in.dtype)
    with no_autocast(z_in):
        z = rows.logits.to(dtype)
        u = None
        if len(tensors) > 1:
            u = tensors[1].detach() if spec.detach_second else tensors[1]
            u = u.reshape(z.shape).to(dtype)
        for k, v in extra.items():
            if v is not None and (not isinstance(v, Tensor) or v.shape != z_in.shape):
                raise ValueError(f"{k} must have the shape of {spec.inputs[0].name} {tuple(z_in.shape)}, got "
                                 f"{tuple(getattr(v, 'shape', ()))}")
        extra = {k: (None if v is None else v.detach().reshape(z.shape).to(dtype)) for k, v in extra.items()}
        if spec.dense_analytic:
            grad_z = torch.is_grad_enabled() and z.requires_grad
            grad_u = torch.is_grad_enabled() and u is not None and u.requires_grad
            with torch.no_grad():
                out = spec.rows(z.detach(), None if u is None else u.detach(), rows, grad_z or grad_u, **extra)
            per_row = _attach(out, z, u, grad_z, grad_u)
        else:
            out = spec.rows(z, u, rows, False, **extra)
            per_row = out.loss
        loss = reduce_rows(per_row, rows.valid, reduction, rows.lead_shape)
        if not return_parts:
            return loss
        parts = out.parts or {}
        return loss, {k: reduce_rows(v.detach(), rows.valid, reduction, rows.lead_shape) for k, v in parts.items()}


def _attach(out, z: Tensor, u: Tensor | None, grad_z: bool, grad_u: bool) -> Tensor:
    """The per-row loss with the spec's precomputed gradients attached for the inputs that need them."""
    if not (grad_z or grad_u):
        return out.loss
    gz, gu = out.grad if isinstance(out.grad, tuple) else (out.grad, None)
    if grad_z and grad_u:
        return row_loss_with_grad(out.loss, z, gz, u, gu)
    if grad_z:
        return row_loss_with_grad(out.loss, z, gz)
    return row_loss_with_grad(out.loss, u, gu)
