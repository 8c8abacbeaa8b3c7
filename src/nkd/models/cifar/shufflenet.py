"""ShuffleNet V1 (groups 3, widths 240/480/960) and V2 (1×, widths 116/232/464/1024) of the CRD
benchmark, 1×1 stem without max-pool for 32-px inputs. Module names match RepDistiller
checkpoints. USKD's weak head reads the second of the three stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import ZooModel


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """``[N, C, H, W] → [N, g, C/g, H, W] → transpose(1, 2) → [N, C, H, W]``."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class V1Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = cout // 4
        self.g1 = 1 if cin == 24 else groups
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return F.relu(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class _ShuffleBase(ZooModel):
    """Shared by V1 and V2: 1×1 stem ``conv1``/``bn1``, three stages ``layer1..3``, ``linear`` head."""

    weak_stage = 2  # stages = [stem, layer1, layer2, layer3]

    def get_classifier(self) -> nn.Linear:
        return self.linear

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        out = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3):
            out.append(layer(out[-1]))
        return out


class ShuffleNetV1(_ShuffleBase):

    def __init__(self, num_classes: int = 100, widths=(240, 480, 960), blocks=(4, 8, 4), groups: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (w, n) in enumerate(zip(widths, blocks), start=1):
            layers = []
            for j in range(n):
                # the downsampling block concatenates its pooled input: it produces w - cin channels
                layers.append(V1Block(cin, w - (cin if j == 0 else 0), 2 if j == 0 else 1, groups))
                cin = w
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.linear = nn.Linear(widths[2], num_classes)
        self.weak_channels = widths[1]



class V2Block(nn.Module):
    """Split in half, transform the second half (1×1, dw 3×3, 1×1), concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        c = channels // 2
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([x1, out], 1), 2)


class V2Down(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: Tensor) -> Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(_ShuffleBase):
    def __init__(self, num_classes: int = 100, widths=(116, 232, 464, 1024), blocks=(3, 7, 3)):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        cin = 24
        for i, (w, n) in enumerate(zip(widths[:3], blocks), start=1):
            setattr(self, f"layer{i}", nn.Sequential(V2Down(cin, w), *[V2Block(w) for _ in range(n)]))
            cin = w
        self.conv2 = nn.Conv2d(widths[2], widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)
        self.weak_channels = widths[1]


    def forward_head(self, last: Tensor) -> tuple[Tensor, Tensor]:
        return super().forward_head(F.relu(self.bn2(self.conv2(last))))
