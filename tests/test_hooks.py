"""Module outputs/inputs by module path: zoo, timm and torchvision models; hooks removed on exit."""

from __future__ import annotations

import pytest
import torch

from nkd.models import create_model
from nkd.models.hooks import FeatureTaps, module_at


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_zoo_model_outputs_and_inputs_by_path_match_a_manual_forward():
    m = create_model("resnet8", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with FeatureTaps(m, ["layer2", "layer3.0.conv1"]) as out, FeatureTaps(m, ["fc"], kind="input") as inp:
        logits = m(x)
    with torch.no_grad():
        h = m.relu(m.bn1(m.conv1(x)))
        l2 = m.layer2(m.layer1(h))
    torch.testing.assert_close(out["layer2"], l2)
    torch.testing.assert_close(out["layer3.0.conv1"], m.layer3[0].conv1(l2))
    torch.testing.assert_close(m.fc(inp["fc"]), logits)  # the classifier's input gives the logits
    assert _hooks(m) == 0  # removed on exit
    assert out["layer2"].requires_grad  # the graph is kept unless detach=True


def test_timm_and_torchvision_models_by_path():
    for name, path in (("timm/resnet18", "layer3.1.conv2"), ("tv/resnet18", "layer4.0")):
        try:
            m = create_model(name, 10)
        except ImportError as e:  # an adapter whose package is not installed
            pytest.skip(f"{name}: {e}")
        before = _hooks(m)  # the torchvision adapter keeps hooks of its own (for its features)
        with FeatureTaps(m, [path], detach=True) as taps:
            assert _hooks(m) == before + 1
            m(torch.randn(1, 3, 64, 64))
        assert taps[path].ndim == 4 and not taps[path].requires_grad
        assert _hooks(m) == before


def test_unknown_path_names_it_with_a_did_you_mean_and_installs_nothing():
    m = create_model("resnet8", 10)
    with pytest.raises(KeyError, match=r"no module 'layer3\.0\.conv3'.*did you mean 'layer3\.0\.conv"):
        FeatureTaps(m, ["layer2", "layer3.0.conv3"])
    assert _hooks(m) == 0
    with pytest.raises(KeyError, match="did you mean"):
        module_at(m, "layr2")


def test_hooks_are_removed_when_the_forward_raises():
    m = create_model("resnet8", 10)
    with pytest.raises(RuntimeError):
        with FeatureTaps(m, ["layer1"]):
            m(torch.randn(2, 5, 32, 32))  # wrong channel count
    assert _hooks(m) == 0
