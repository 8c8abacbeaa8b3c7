"""``timm/<name>``: any timm model behind nkd's model interface.

Features come from timm's ``forward_intermediates``. USKD's weak-head feature (docs/methods.md):

* ViT / DeiT (models with ``blocks`` and a class token): the class token after block ``L/2``
  (block 6 of 12), before the final norm;
* CNNs and Swin: the global-average-pooled output of the stage before the last — the last
  ``feature_info`` entry narrower than the pre-logit width (ResNet18/34: 256, ResNet50/101: 1024,
  MobileNetV2: 320, RegNetX-1.6GF: 408, Swin-T: 384).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _import_timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("timm models need the 'vision' extra: pip install 'nkd[vision]'") from e
    return timm


class TimmModel(nn.Module):
    """Wraps ``timm.create_model(name, pretrained=False, num_classes=...)`` as ``self.model``."""

    def __init__(self, name: str, num_classes: int = 1000, **kwargs):
        super().__init__()
        timm = _import_timm()
        self.model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        self.num_classes = num_classes
        self.is_vit = hasattr(self.model, "blocks") and getattr(self.model, "cls_token", None) is not None
        if self.is_vit:
            self.weak_index = len(self.model.blocks) // 2 - 1  # block L/2 (1-based)
            self.weak_channels = int(self.model.embed_dim)
        else:
            chs = [int(f["num_chs"]) for f in self.model.feature_info]
            self.weak_index = len(chs) - 1 if chs[-1] < self.model.num_features else len(chs) - 2
            self.weak_channels = chs[self.weak_index]

    def forward(self, x: Tensor, return_features: bool = False):
        if not return_features:
            return self.model(x)
        if self.is_vit:
            final, inter = self.model.forward_intermediates(x, indices=[self.weak_index], return_prefix_tokens=True)
            spatial, prefix = inter[0]
            stages, weak = [spatial], prefix[:, 0]
        else:
            final, stages = self.model.forward_intermediates(x)
            weak = F.adaptive_avg_pool2d(stages[self.weak_index], 1).flatten(1)
        pooled = self.model.forward_head(final, pre_logits=True)
        logits = self.model.forward_head(final)
        return logits, {"stages": list(stages), "pooled": pooled, "weak": weak}
