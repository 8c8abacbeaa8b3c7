"""Wide ResNets of the CRD benchmark: wrn_{depth}_{k}, depth = 6n+4, widths 16, 16k, 32k, 64k.

Pre-activation blocks (BN-ReLU-conv); a final BN-ReLU before pooling. Module names match
RepDistiller checkpoints (``block{i}.layer.{j}``, ``convShortcut``, ``bn1``, ``fc``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..base import ZooModel, init_fanout_normal_


class WRNBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # identity blocks add the raw input; projection blocks project the activated input
        return out + (x if self.equal else self.convShortcut(act))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *[WRNBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate) for i in range(n)]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(ZooModel):
    weak_stage = 2  # stages = [stem, block1, block2, block3]

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.weak_channels = ch[2]
        init_fanout_normal_(self, linear_std=None)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        return [f0, f1, f2, f3]

    def forward_head(self, last: Tensor) -> tuple[Tensor, Tensor]:
        return super().forward_head(self.relu(self.bn1(last)))


WRNS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
