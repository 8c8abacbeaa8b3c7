"""Four-stage ResNets with a 3×3 stride-1 stem and no max-pool, widths 64–512.

``resnet50`` is the CIFAR ResNet50 of the CRD benchmark (bottleneck blocks [3, 4, 6, 3]);
``resnet18_cifar`` / ``resnet34_cifar`` are the official NKD/USKD CIFAR-100 models (basic blocks
[2, 2, 2, 2] / [3, 4, 6, 3]). Module names match RepDistiller's ``resnetv2`` (``linear`` head).
USKD's weak head reads stage 3 of 4 (256 channels for 18/34, 1024 for 50).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..base import ZooModel, init_resnet_


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential:
    if stride == 1 and cin == cout:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlockV2(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class BottleneckV2(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.shortcut = _shortcut(cin, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNetV2(ZooModel):
    weak_stage = 3  # stages = [stem, layer1, layer2, layer3, layer4]

    def __init__(self, block: type, num_blocks: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n, stride) in enumerate(zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)), start=1):
            layers = []
            for j in range(n):
                layers.append(block(cin, planes, stride if j == 0 else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.linear = nn.Linear(512 * block.expansion, num_classes)
        self.weak_channels = 256 * block.expansion
        init_resnet_(self)

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        out = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out.append(layer(out[-1]))
        return out


RESNETV2 = {
    "resnet50": (BottleneckV2, (3, 4, 6, 3)),
    "resnet18_cifar": (BasicBlockV2, (2, 2, 2, 2)),
    "resnet34_cifar": (BasicBlockV2, (3, 4, 6, 3)),
}
