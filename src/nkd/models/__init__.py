"""Model zoo: the CRD CIFAR benchmark models, official NKD/USKD CIFAR ResNets, and timm.

``create_model(name, num_classes=100, checkpoint=None)``; names are listed in ``MODELS``
(plus ``timm/<any timm model>``). Every model returns logits, or ``(logits, features)`` with
``return_features=True`` (see :mod:`nkd.models.base`), and has ``weak_channels``.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from ..registry import Registry
from .checkpoint import load_weights
from .cifar.mobilenetv2 import MobileNetV2
from .cifar.resnet import RESNETS, CifarResNet
from .cifar.resnetv2 import RESNETV2, ResNetV2
from .cifar.shufflenet import ShuffleNetV1, ShuffleNetV2
from .cifar.vgg import VGG, VGGS
from .cifar.wrn import WRNS, WideResNet
from .timm_adapter import TimmModel
from .torchvision_adapter import TorchvisionModel

MODELS: Registry = Registry("model")  # name -> constructor(num_classes=..., **kwargs)
for _name, (_depth, _widths) in RESNETS.items():
    MODELS.add(_name, partial(CifarResNet, _depth, _widths))
for _name, (_block, _blocks) in RESNETV2.items():
    MODELS.add(_name, partial(ResNetV2, _block, _blocks))
for _name, (_depth, _k) in WRNS.items():
    MODELS.add(_name, partial(WideResNet, _depth, _k))
for _name, _cfg in VGGS.items():
    MODELS.add(_name, partial(VGG, _cfg))
MODELS.add("mobilenetv2", partial(MobileNetV2, 6, 0.5))
MODELS.add("shufflev1", ShuffleNetV1)
MODELS.add("shufflev2", ShuffleNetV2)

TIMM_PREFIX = "timm/"
TV_PREFIX = "tv/"


def available_models() -> list[str]:
    return sorted(MODELS) + [TIMM_PREFIX + "<name>", TV_PREFIX + "<name>"]


def create_model(name: str, num_classes: int = 100, checkpoint: str | None = None, **kwargs) -> nn.Module:
    """Build a model by name; ``checkpoint`` loads weights (``weights_only``) strictly.

    A checkpoint may be a bare ``state_dict`` or a dict holding it under ``"model"``,
    ``"state_dict"`` or ``"student"`` (RepDistiller/mdistiller/mmcls/nkd files), with or without a
    DataParallel ``module.`` prefix. A mismatch raises ``ValueError`` listing the missing and
    unexpected keys and the shape mismatches.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if name.startswith(TIMM_PREFIX):
        model = TimmModel(name[len(TIMM_PREFIX):], num_classes=num_classes, **kwargs)
    elif name.startswith(TV_PREFIX):
        model = TorchvisionModel(name[len(TV_PREFIX):], num_classes=num_classes, **kwargs)
    elif name in MODELS:
        model = MODELS[name](num_classes=num_classes, **kwargs)
    else:
        raise ValueError(f"{MODELS.unknown(name)}, or timm/<name>, or tv/<name>")
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


__all__ = ["MODELS", "create_model", "available_models", "load_weights", "TimmModel", "TorchvisionModel"]
