"""CIFAR ResNets of the CRD benchmark (resnet8 … resnet110, resnet8x4, resnet32x4).

Three stages of ``n = (depth − 2)/6`` basic blocks, widths ``[w0, w1, w2, w3]``, 3×3 stem,
global average pooling, ``fc``. Module names match RepDistiller/mdistiller checkpoints.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..base import ZooModel, init_resnet_


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))`` with an optional 1×1 downsample."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()  # a module (not F.relu), so its input — the pre-activation — can be tapped by path

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.act(out + skip)


class CifarResNet(ZooModel):
    weak_stage = 2  # stages = [stem, layer1, layer2, layer3]: the second of three stages

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, (w, s) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = [BasicBlock(cin if j == 0 else w, w, s if j == 0 else 1) for j in range(n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
            cin = w
        self.fc = nn.Linear(widths[3], num_classes)
        self.weak_channels = widths[2]
        init_resnet_(self)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def preact_refs(self) -> list[str]:
        """Each stage's pre-activation: the stem's output (it has no residual), then the input of
        the last block's final ReLU in each stage (mdistiller's ``preact_feats``)."""
        return ["@stage0"] + [f"layer{i}.{len(getattr(self, f'layer{i}')) - 1}.act:input" for i in (1, 2, 3)]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        f0 = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(f0)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f0, f1, f2, f3]


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)
RESNETS = {
    "resnet8": (8, _SMALL),
    "resnet14": (14, _SMALL),
    "resnet20": (20, _SMALL),
    "resnet32": (32, _SMALL),
    "resnet44": (44, _SMALL),
    "resnet56": (56, _SMALL),
    "resnet110": (110, _SMALL),
    "resnet8x4": (8, _X4),
    "resnet32x4": (32, _X4),
}
