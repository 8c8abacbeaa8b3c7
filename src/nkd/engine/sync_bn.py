r"""``train.sync_bn``: BatchNorm statistics over the global batch of all processes.

On CUDA this is torch's :class:`torch.nn.SyncBatchNorm`. torch's module refuses CPU tensors
("SyncBatchNorm expected input tensor to be on GPU"), so for CPU/gloo runs nkd swaps in
:class:`CPUSyncBatchNorm`: per channel ``c`` over the ``n`` values of all ranks,

.. math::

    \mu_c = \frac{1}{n}\sum x,\qquad \sigma^2_c = \frac{1}{n}\sum (x-\mu_c)^2,\qquad
    y = \frac{x-\mu_c}{\sqrt{\sigma^2_c+\epsilon}}\,w_c + b_c

with both sums all-reduced by ``torch.distributed.nn.functional.all_reduce``, which is
differentiable (its backward all-reduces the gradient), so the backward pass is the global-batch
BatchNorm's too. Running statistics use the unbiased ``σ²·n/(n−1)``, as BatchNorm does. With it,
N processes train a BatchNorm network to the weights of one process with the global batch (to
float rounding); without it each process normalizes with its own slice's statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are all-reduced across the default process group."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([xf.numel() / xf.shape[1]], dtype=xf.dtype, device=xf.device)
        total = all_reduce(torch.cat([xf.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = xf - mean.reshape(shape)
        var = all_reduce(centred.square().sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)).clamp(min=0), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` → torch's SyncBatchNorm (CUDA) or :class:`CPUSyncBatchNorm`."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(iter(module.state_dict().values())).device) if module.state_dict() else new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, device))
    return module


__all__ = ["CPUSyncBatchNorm", "convert_sync_batchnorm"]
