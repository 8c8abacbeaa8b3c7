"""``tv/<name>``: torchvision classification models (for architectures timm lacks, e.g.
ShuffleNetV2 on ImageNet). Stage outputs are captured with forward hooks on named modules.

USKD's weak head (docs/methods.md: the stage before the last) — ShuffleNetV2: ``stage4`` (464 channels for
x1.0; the last stage before the 1×1 ``conv5``, as in the official mmcls backbone).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

# model-name prefix -> (stage modules in order, index of the weak stage)
STAGES = {
    "shufflenet_v2": (("maxpool", "stage2", "stage3", "stage4", "conv5"), 3),
    "resnet": (("maxpool", "layer1", "layer2", "layer3", "layer4"), 3),
    "mobilenet_v2": (("features.1", "features.3", "features.6", "features.13", "features.17", "features.18"), 4),
}


class TorchvisionModel(nn.Module):
    def __init__(self, name: str, num_classes: int = 1000, **kwargs):
        super().__init__()
        import torchvision

        self.model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        self.num_classes = num_classes
        key = next((k for k in STAGES if name.startswith(k)), None)
        if key is None:
            raise ValueError(f"tv/{name}: no stage table for feature extraction; known families: {sorted(STAGES)}")
        names, self.weak_stage = STAGES[key]
        modules = dict(self.model.named_modules())
        self._outputs: list[Tensor] = []
        self._capture = False
        for n in names:
            modules[n].register_forward_hook(self._hook)
        self.weak_channels = self._probe_channels()

    def _hook(self, module, inputs, output) -> None:
        if self._capture:
            self._outputs.append(output)

    def _probe_channels(self) -> int:
        import torch

        was = self.training
        self.eval()
        with torch.no_grad():
            _, feats = self.forward(torch.zeros(1, 3, 64, 64), return_features=True)
        self.train(was)
        return int(feats["weak"].shape[1])

    def forward(self, x: Tensor, return_features: bool = False):
        if not return_features:
            return self.model(x)
        self._outputs, self._capture = [], True
        try:
            logits = self.model(x)
        finally:
            self._capture = False
        stages, self._outputs = self._outputs, []
        pooled = F.adaptive_avg_pool2d(stages[-1], 1).flatten(1)
        weak = F.adaptive_avg_pool2d(stages[self.weak_stage], 1).flatten(1)
        return logits, {"stages": stages, "pooled": pooled, "weak": weak}
