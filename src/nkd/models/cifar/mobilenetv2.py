"""MobileNetV2 of the CRD benchmark (``mobile_half``: expansion 6, width 0.5).

Module names match RepDistiller checkpoints (``conv1``, ``blocks.{i}.{j}.conv``, ``conv2``,
``classifier.0``). USKD's weak head reads the last inverted-residual group (the 320·w channels
before the final 1×1 convolution, as for ImageNet MobileNetV2).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..base import ZooModel, init_fanout_normal_


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, 1, 0, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(ZooModel):
    weak_stage = -2  # stages = [stem, blocks 0..6 groups..., conv2 output]

    def __init__(self, expand: int = 6, width: float = 0.5, num_classes: int = 100):
        super().__init__()
        self.num_classes = num_classes
        setting = [(1, 16, 1, 1), (expand, 24, 2, 1), (expand, 32, 3, 2), (expand, 64, 4, 2),
                   (expand, 96, 3, 1), (expand, 160, 3, 2), (expand, 320, 1, 1)]
        cin = int(32 * width)
        self.conv1 = _conv_bn_relu(3, cin, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in setting:
            cout = int(c * width)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
            self.blocks.append(nn.Sequential(*layers))
        self.weak_channels = cin
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(cin, last, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_fanout_normal_(self, linear_std=0.01)

    def get_classifier(self) -> nn.Linear:
        return self.classifier[0]

    def feature_refs(self) -> list[str]:
        """The stem, then the ends of block groups 1, 2, 4 and 6 (mdistiller's ``feats``)."""
        return ["@stage0", "@stage2", "@stage3", "@stage5", "@stage7"]

    def forward_stages(self, x: Tensor) -> list[Tensor]:
        out = [self.conv1(x)]
        for block in self.blocks:
            out.append(block(out[-1]))
        out.append(self.conv2(out[-1]))
        return out
