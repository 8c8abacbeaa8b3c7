"""VGG with batch norm for CIFAR (CRD benchmark: vgg8/11/13/16/19 are the ``_bn`` variants).

Five conv blocks (each conv-BN-ReLU, the last ReLU of a block applied outside it), max-pool
between blocks 0–3 (the one after block 3 only for 64-px inputs, as in the reference), global
average pooling and a linear ``classifier``. Module names match RepDistiller checkpoints.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..base import ZooModel, init_fanout_normal_


def _block(widths: list[int], cin: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        cin = w
    return nn.Sequential(*layers[:-1])


class VGG(ZooModel):
    weak_stage = -2  # the stage before the last (block3, 512 channels)

    def __init__(self, cfg: list[list[int]], num_classes: int = 100):
        super().__init__()
        self.num_classes = num_classes
        cin = 3
        for i, widths in enumerate(cfg):
            setattr(self, f"block{i}", _block(widths, cin))
            cin = widths[-1]
        self.pool = nn.MaxPool2d(2, 2)
        self.classifier = nn.Linear(512, num_classes)
        self.weak_channels = cfg[3][-1]
        init_fanout_normal_(self, linear_std=0.01)

    def get_classifier(self) -> nn.Linear:
        return self.classifier

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        h = x.shape[2]
        out = [F.relu(self.block0(x))]
        for i in (1, 2, 3):
            out.append(F.relu(getattr(self, f"block{i}")(self.pool(out[-1]))))
        last = self.pool(out[-1]) if h == 64 else out[-1]
        out.append(F.relu(self.block4(last)))
        return out


VGGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}
