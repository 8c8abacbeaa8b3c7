"""Common interface of every nkd model.

``model(x)`` returns logits ``[N, num_classes]``; ``model(x, return_features=True)`` returns
``(logits, features)`` where ``features`` is a dict:

* ``"stages"``: list of stage outputs ``[N, C_i, H_i, W_i]`` (stem first, last stage last),
* ``"pooled"``: the pooled pre-logit feature ``[N, D]``,
* ``"weak"``: the pooled feature USKD's weak head reads ``[N, model.weak_channels]`` (docs/methods.md: the
  stage before the last, global-average-pooled; for ViTs the class token after block L/2).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ZooModel(nn.Module):
    """Base class: subclasses implement ``forward_stages`` and ``forward_head``.

    ``weak_stage`` indexes ``stages``; ``weak_channels`` is that stage's channel count.
    """

    weak_stage: int = -2
    weak_channels: int = 0
    num_classes: int = 0

    def forward_stages(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, last: Tensor) -> tuple[Tensor, Tensor]:
        """``(pooled, logits)`` from the last stage output."""
        pooled = F.adaptive_avg_pool2d(last, 1).flatten(1)
        return pooled, self.get_classifier()(pooled)

    def get_classifier(self) -> nn.Linear:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature_refs(self) -> list[str] | None:
        """The stage features that feature-distillation methods index, stem first (the CRD /
        mdistiller ``feats``); ``None``: every ``@stage<i>``."""
        return None

    def preact_refs(self) -> list[str] | None:
        """Feature references (:mod:`nkd.models.hooks`) of each stage's output *before* its final
        activation, where the model defines them (``None``: use ``@stage<i>``)."""
        return None

    def forward(self, x: Tensor, return_features: bool = False):
        stages = self.forward_stages(x)
        pooled, logits = self.forward_head(stages[-1])
        if not return_features:
            return logits
        weak = F.adaptive_avg_pool2d(stages[self.weak_stage], 1).flatten(1)
        return logits, {"stages": stages, "pooled": pooled, "weak": weak}


def init_resnet_(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions, BN weight 1 / bias 0 (RepDistiller ResNets)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_fanout_normal_(model: nn.Module, linear_std: float | None) -> None:
    """Convs ~ N(0, 2/(k²·C_out)), BN 1/0, linear bias 0 and weight ~ N(0, linear_std) if given
    (the WRN / VGG / MobileNetV2 initializations of the CRD zoo)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, (2.0 / n) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
