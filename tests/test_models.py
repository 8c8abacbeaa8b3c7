"""nkd.models: the CRD zoo (forward, features, parameter counts, checkpoint keys), timm adapter."""

from __future__ import annotations

import pytest
import torch

from nkd.models import MODELS, create_model

# Parameter counts at 100 classes. resnet8x4 / resnet32x4 are the figures the issue gives for
# the RepDistiller/mdistiller implementations; the others match the "Params" columns of the
# CRD/mdistiller tables (0.28M resnet20, 0.47M resnet32, 0.86M resnet56, 1.74M resnet110,
# 2.26M wrn_40_2, 0.70M wrn_16_2, 0.57M wrn_40_1, 9.46M vgg13, 3.96M vgg8, 23.71M resnet50).
PARAMS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028, "vgg11": 9_277_284, "vgg13": 9_462_180, "vgg16": 14_774_436, "vgg19": 20_086_692,
    "mobilenetv2": 812_836, "shufflev1": 949_258, "shufflev2": 1_355_528, "resnet50": 23_705_252,
    "resnet18_cifar": 11_220_132, "resnet34_cifar": 21_328_292,
}

# Key names and shapes that checkpoints of the reference implementations carry.
REFERENCE_KEYS = {
    "resnet8x4": {"conv1.weight": (32, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 32, 1, 1),
                  "layer3.0.bn2.running_var": (256,), "fc.weight": (100, 256)},
    "resnet56": {"layer1.8.conv2.weight": (16, 16, 3, 3), "layer2.0.downsample.1.weight": (32,),
                 "fc.bias": (100,)},
    "wrn_40_2": {"block1.layer.0.convShortcut.weight": (32, 16, 1, 1), "block3.layer.5.bn2.weight": (128,),
                 "bn1.running_mean": (128,), "fc.weight": (100, 128)},
    "vgg13": {"block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block0.4.running_mean": (64,),
              "block4.3.weight": (512, 512, 3, 3), "classifier.weight": (100, 512)},
    "vgg8": {"block0.1.num_batches_tracked": (), "block4.0.weight": (512, 512, 3, 3)},
    "mobilenetv2": {"conv1.0.weight": (16, 3, 3, 3), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
                    "blocks.6.0.conv.7.weight": (160,), "conv2.0.weight": (1280, 160, 1, 1),
                    "classifier.0.weight": (100, 1280)},
    "shufflev1": {"conv1.weight": (24, 3, 1, 1), "layer1.0.conv1.weight": (54, 24, 1, 1),
                  "layer1.0.conv3.weight": (216, 18, 1, 1), "layer3.3.bn3.weight": (960,), "linear.weight": (100, 960)},
    "shufflev2": {"layer1.0.conv5.weight": (58, 58, 1, 1), "layer1.1.conv1.weight": (58, 58, 1, 1),
                  "conv2.weight": (1024, 464, 1, 1), "linear.weight": (100, 1024)},
    "resnet50": {"layer1.0.shortcut.0.weight": (256, 64, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                 "linear.weight": (100, 2048)},
    "resnet18_cifar": {"conv1.weight": (64, 3, 3, 3), "layer2.0.shortcut.0.weight": (128, 64, 1, 1),
                       "linear.weight": (100, 512)},
}

WEAK = {"resnet8x4": 128, "resnet56": 32, "wrn_40_2": 64, "vgg13": 512, "mobilenetv2": 160, "shufflev1": 480,
        "shufflev2": 232, "resnet50": 1024, "resnet18_cifar": 256, "resnet34_cifar": 256}


def test_every_crd_name_is_registered():
    crd = ("resnet8 resnet14 resnet20 resnet32 resnet44 resnet56 resnet110 resnet8x4 resnet32x4 wrn_16_1 wrn_16_2 "
           "wrn_40_1 wrn_40_2 vgg8 vgg11 vgg13 vgg16 vgg19 mobilenetv2 shufflev1 shufflev2 resnet50").split()
    assert set(crd) | {"resnet18_cifar", "resnet34_cifar"} == set(MODELS)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_forward_features_and_params(name):
    torch.manual_seed(0)
    m = create_model(name, num_classes=100).eval()
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = m(x)
        logits2, feats = m(x, return_features=True)
    assert logits.shape == (2, 100)
    torch.testing.assert_close(logits, logits2)
    assert feats["weak"].shape == (2, m.weak_channels)
    assert feats["pooled"].shape[0] == 2 and feats["pooled"].dim() == 2
    assert all(s.dim() == 4 and s.shape[0] == 2 for s in feats["stages"])
    assert feats["stages"][m.weak_stage].shape[1] == m.weak_channels
    if name in WEAK:
        assert m.weak_channels == WEAK[name]
    sd = m.state_dict()
    for key, shape in REFERENCE_KEYS.get(name, {}).items():
        assert tuple(sd[key].shape) == shape, key


def test_num_classes_changes_the_head():
    m = create_model("resnet8", num_classes=10)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("wrap", ["bare", "model", "module"])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, wrap):
    torch.manual_seed(1)
    src = create_model("resnet8x4").eval()
    for mod in src.modules():  # non-trivial BN statistics
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    sd = src.state_dict()
    obj = {"bare": sd, "model": {"model": sd, "epoch": 240, "best_acc": 79.4},
           "module": {"model": {"module." + k: v for k, v in sd.items()}}}[wrap]
    path = tmp_path / "teacher.pth"
    torch.save(obj, path)
    torch.manual_seed(2)
    dst = create_model("resnet8x4", checkpoint=str(path)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_wrong_checkpoint_lists_keys_and_shapes(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"model": create_model("resnet8").state_dict()}, path)
    with pytest.raises(ValueError, match="missing keys") as e:
        create_model("wrn_16_1", checkpoint=str(path))
    assert "unexpected keys" in str(e.value) and "block1.layer.0" in str(e.value)
    torch.save(create_model("resnet8", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatches.*fc.weight"):
        create_model("resnet8", num_classes=100, checkpoint=str(path))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_model("resnet8", checkpoint=str(tmp_path / "nope.pth"))


def test_checkpoint_with_arbitrary_pickle_needs_opt_in(tmp_path):
    import argparse

    from nkd.models import load_weights

    path = tmp_path / "pickle.pth"
    sd = create_model("resnet8").state_dict()
    torch.save({"model": sd, "opt": argparse.Namespace(lr=0.05)}, path)  # as training scripts often do
    with pytest.raises(ValueError, match="weights_only"):
        load_weights(create_model("resnet8"), path)
    load_weights(create_model("resnet8"), path, allow_pickle=True)


def test_unknown_model_is_an_error():
    with pytest.raises(ValueError, match="unknown model 'resnet9'"):
        create_model("resnet9")


# ----------------------------------------------------------------------------- timm
pytest.importorskip("timm")


@pytest.mark.parametrize(
    "name,size,weak",
    [("resnet18", 64, 256), ("resnet50", 64, 1024), ("mobilenetv2_100", 64, 320), ("regnetx_016", 64, 408)],
)
def test_timm_cnn_weak_feature_is_the_stage_before_last(name, size, weak):
    m = create_model("timm/" + name, num_classes=10).eval()
    assert m.weak_channels == weak
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        logits, feats = m(x, return_features=True)
        torch.testing.assert_close(logits, m(x))
    assert feats["weak"].shape == (1, weak)


def test_timm_swin_weak_feature():
    m = create_model("timm/swin_tiny_patch4_window7_224", num_classes=10).eval()
    assert m.weak_channels == 384
    with torch.no_grad():
        _, feats = m(torch.randn(1, 3, 224, 224), return_features=True)
    assert feats["weak"].shape == (1, 384)


def test_timm_vit_weak_feature_is_cls_token_after_half_the_blocks():
    torch.manual_seed(0)
    m = create_model("timm/deit_tiny_patch16_224", num_classes=10).eval()
    assert m.weak_channels == 192 and m.weak_index == 5
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits, feats = m(x, return_features=True)
        v = m.model
        h = v._pos_embed(v.patch_embed(x))
        h = v.norm_pre(v.patch_drop(h))
        for blk in v.blocks[:6]:
            h = blk(h)
        torch.testing.assert_close(feats["weak"], h[:, 0])
        torch.testing.assert_close(logits, m(x))


# Logits of the reference implementations, run side by side on 2026-11-28 (not vendored): CRD's
# HobbitLong/RepDistiller models/{resnet,wrn,vgg (the *_bn variants its model_dict uses),mobilenetv2,
# ShuffleNetv1,ShuffleNetv2,resnetv2}.py; resnet18_cifar / resnet34_cifar against its resnetv2
# ResNet18 / ResNet34. float64, eval mode, every float tensor of the state dict filled in key order
# from torch.Generator seed 0 (N(0, 0.1^2); running_var |.| + 0.5), input N(0, 1) from seed 1, shape
# (2, 3, 32, 32), 100 classes: (first four logits of sample 0, sum of all logits, sum of |logits|).
# Our state-dict keys come in the reference's order, so the same fill gives the same weights.
REFERENCE_LOGITS = {
    "resnet8": ([-0.077953, -0.10949, -0.109713, -0.086929], -0.622337, 17.453138),
    "resnet14": ([0.260216, -0.110755, -0.27953, 0.356481], 1.712122, 21.378913),
    "resnet20": ([-0.2373, 0.199768, 0.074449, 0.023357], 4.66331, 31.555652),
    "resnet32": ([0.087753, 0.234462, 0.004514, 0.273515], -0.618887, 30.025247),
    "resnet44": ([0.274966, 0.159054, 0.308054, 0.383145], -0.904526, 42.157602),
    "resnet56": ([0.209077, -0.336063, 0.245236, -0.026031], 4.960791, 37.757156),
    "resnet110": ([0.318498, -0.272699, 0.466789, 0.508766], -2.533035, 58.961143),
    "resnet8x4": ([-0.300095, 0.024, 0.107318, 0.554569], -0.780439, 27.187537),
    "resnet32x4": ([0.178532, -0.360038, 0.345637, -0.113387], 19.423771, 55.276681),
    "wrn_16_1": ([-0.109171, 0.093907, -0.067628, 0.046635], 1.674523, 19.03222),
    "wrn_16_2": ([-0.015716, -0.17729, -0.139028, 0.004775], -0.033434, 22.082888),
    "wrn_40_1": ([0.260128, -0.005968, -0.106346, 0.057553], 4.134036, 18.969446),
    "wrn_40_2": ([0.25594, 0.056621, -0.256215, -0.127951], 1.215082, 21.051493),
    "vgg8": ([0.044036, -0.125013, 0.082693, -0.082897], 0.398362, 28.529845),
    "vgg11": ([-0.01838, -0.335962, -0.092912, 0.125715], 8.827433, 31.505287),
    "vgg13": ([-0.231101, 0.221558, -0.014173, 0.017609], -7.588617, 39.448195),
    "vgg16": ([0.03509, 0.118109, 0.152755, 0.026543], 1.886173, 39.447889),
    "vgg19": ([0.249503, 0.01294, 0.068099, 0.331676], 3.552316, 33.089729),
    "mobilenetv2": ([-0.488169, 0.006782, 0.288575, -0.177665], -4.290824, 45.667255),
    "shufflev1": ([0.582914, 0.481258, -0.387875, -0.825054], -0.323889, 137.459236),
    "shufflev2": ([0.379022, 0.19773, 0.113137, -0.145712], 5.224377, 38.115767),
    "resnet50": ([0.861059, 1.488019, 0.157545, -0.543701], -32.524688, 121.538725),
    "resnet18_cifar": ([-0.129555, 0.087963, -0.160099, 0.267769], 19.091919, 58.762969),
    "resnet34_cifar": ([0.430999, -0.258085, 0.446784, 0.150177], -6.166701, 75.73247),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_LOGITS))
def test_zoo_computes_what_the_reference_code_computes(name):
    """Same state-dict keys in the same order and the same function as the reference code: a
    RepDistiller / mdistiller checkpoint gives the logits it gave there."""
    model = create_model(name, num_classes=100).double().eval()
    sd = model.state_dict()
    g = torch.Generator().manual_seed(0)
    for k, v in sd.items():
        if v.dtype.is_floating_point:
            r = torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.1
            v.copy_(r.abs() + 0.5 if k.endswith("running_var") else r)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        y, _ = model(x, return_features=True)
    first, total, l1 = REFERENCE_LOGITS[name]
    torch.testing.assert_close(y[0, :4], torch.tensor(first, dtype=torch.float64), atol=2e-6, rtol=0)
    assert abs(y.sum().item() - total) < 1e-5 and abs(y.abs().sum().item() - l1) < 1e-5
