"""DIST and z-score KD/DKD as training methods (objectives) and configs (the authors' published values only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nkd.config import load_config
from nkd.losses import dist_loss, dkd_zscore_loss, kd_zscore_loss
from nkd.methods import METHODS
from nkd.typed import Problems

ROOT = Path(__file__).resolve().parents[1] / "configs"


def _load(rel: str):
    return load_config(ROOT / rel)


def _stems(folder: str) -> set[str]:
    return {p.stem for p in (ROOT / folder).glob("*.yaml")}


def test_only_pairs_with_published_settings_have_configs():
    assert _stems("cifar100/dist") == {"wrn_40_2_wrn_40_1", "resnet56_resnet20", "resnet32x4_resnet8x4",
                                       "resnet50_mobilenetv2", "resnet32x4_shufflev1", "resnet32x4_shufflev2"}
    published = {"resnet56_resnet20", "resnet110_resnet32", "resnet32x4_resnet8x4", "wrn_40_2_wrn_16_2",
                 "wrn_40_2_wrn_40_1", "vgg13_vgg8", "vgg13_mobilenetv2", "resnet50_mobilenetv2",
                 "resnet32x4_shufflev2"}
    assert _stems("cifar100/kd_zscore") == published
    assert _stems("cifar100/dkd_zscore") == published
    assert _stems("imagenet/dist") == {"resnet34_resnet18", "resnet50_mobilenetv1"}
    assert _stems("imagenet/kd_zscore") == {"resnet34_resnet18"}
    assert not (ROOT / "imagenet" / "dkd_zscore").exists()


def test_dist_values():
    c = _load("cifar100/dist/resnet32x4_resnet8x4.yaml")
    assert c.method.params == {"beta": 1.0, "gamma": 1.0, "temperature": 4.0, "ce_weight": 1.0, "kd_weight": 2.0}
    assert (c.optim.lr, c.data.batch_size, c.schedule.epochs, c.schedule.milestones) == (0.05, 64, 240, [150, 180, 210])
    assert not c.optim.nesterov
    assert _load("cifar100/dist/resnet32x4_shufflev2.yaml").optim.lr == 0.01
    i = _load("imagenet/dist/resnet34_resnet18.yaml")
    assert i.method.params["temperature"] == 1.0 and i.method.params["kd_weight"] == 2.0
    assert (i.optim.lr, i.optim.nesterov, i.optim.no_decay_norm_bias, i.data.global_batch_size) == (0.1, True, True, 256)


def test_zscore_values():
    k = _load("cifar100/kd_zscore/resnet32x4_resnet8x4.yaml")
    # the README's "2,9"; eps is the loss's own parameter, now a method parameter too (default 1e-7)
    assert k.method.params == {"temperature": 2.0, "eps": 1e-7, "ce_weight": 0.1, "kd_weight": 9.0}
    assert _load("cifar100/kd_zscore/vgg13_vgg8.yaml").method.params["temperature"] == 3.0
    assert _load("cifar100/kd_zscore/resnet50_mobilenetv2.yaml").method.params["kd_weight"] == 1.0
    d = _load("cifar100/dkd_zscore/resnet56_resnet20.yaml").method.params
    assert (d["temperature"], d["kd_weight"], d["alpha"], d["beta"], d["warmup_epochs"]) == (3.0, 18.0, 1.0, 2.0, 20)
    assert _load("cifar100/dkd_zscore/resnet32x4_resnet8x4.yaml").method.params["beta"] == 8.0
    i = _load("imagenet/kd_zscore/resnet34_resnet18.yaml")
    assert i.method.params == {"temperature": 2.0, "eps": 1e-7, "ce_weight": 1.0, "kd_weight": 9.0}
    assert (i.data.global_batch_size, i.optim.lr, i.optim.weight_decay) == (512, 0.2, 1e-4)


def test_headers_cite_sources_not_developer_notes():
    for folder in ("cifar100/dist", "cifar100/kd_zscore", "cifar100/dkd_zscore", "imagenet/dist", "imagenet/kd_zscore"):
        for p in (ROOT / folder).glob("*.yaml"):
            head = p.read_text().splitlines()[1]
            assert "source:" in head and "docs/baselines.md" in head and "SPEC" not in head, p


def _method(name, **params):
    cls = METHODS[name]
    return cls(cls.Params(**params), num_classes=7)


def test_method_objectives_combine_the_losses_as_the_authors_do():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 7, (8,), generator=g)
    z, u = torch.randn(8, 7, generator=g), torch.randn(8, 7, generator=g) * 3
    out, teacher = {"logits": z}, {"logits": u}
    m = _method("dist", temperature=4.0, beta=0.5, gamma=1.5, ce_weight=1.0, kd_weight=2.0)
    loss = m.losses(out, teacher, y, epoch=0)
    torch.testing.assert_close(loss["loss_ce"], F.cross_entropy(z, y))
    torch.testing.assert_close(loss["loss_dist"], 2.0 * dist_loss(z, u, temperature=4.0, beta=0.5, gamma=1.5))
    m = _method("kd_zscore", temperature=3.0, ce_weight=0.1, kd_weight=9.0)
    loss = m.losses(out, teacher, y, epoch=0)
    torch.testing.assert_close(loss["loss_ce"], 0.1 * F.cross_entropy(z, y))
    torch.testing.assert_close(loss["loss_kd"], 9.0 * kd_zscore_loss(z, u, temperature=3.0))
    # DKD: the KD weight multiplies α and β (= the DKD term); linear warm-up over W epochs (0-based epoch e)
    m = _method("dkd_zscore", alpha=1.0, beta=2.0, temperature=3.0, kd_weight=18.0, warmup_epochs=20)
    full = dkd_zscore_loss(z, u, y, alpha=18.0, beta=36.0, temperature=3.0)
    torch.testing.assert_close(m.losses(out, teacher, y, epoch=4)["loss_dkd"], full * 5 / 20)
    torch.testing.assert_close(m.losses(out, teacher, y, epoch=30)["loss_dkd"], full)
    torch.testing.assert_close(m.losses(out, teacher, y, epoch=30)["loss_ce"], F.cross_entropy(z, y))
    assert all(METHODS[n].teacher_outputs == ("logits",) for n in ("dist", "kd_zscore", "dkd_zscore"))


def test_method_params_are_checked_at_config_time():
    for name, bad in (("dist", {"temperature": 0.0}), ("dist", {"gamma": -1.0}), ("kd_zscore", {"kd_weight": -9.0}),
                      ("dkd_zscore", {"beta": float("nan")})):
        with pytest.raises(Problems, match=next(iter(bad))):
            METHODS[name].Params(**bad)
