"""Every shipped config loads and validates, names real models, and carries SPEC's values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nkd.config import load_config
from nkd.models import MODELS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 100


def _model_known(name: str) -> bool:
    if name.startswith("timm/"):
        timm = pytest.importorskip("timm")
        return timm.is_model(name[5:])
    if name.startswith("tv/"):
        tv = pytest.importorskip("torchvision")
        return name[3:] in tv.models.list_models()
    return name in MODELS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_config_validates(path):
    cfg = load_config(path)
    assert _model_known(cfg.model.name), cfg.model.name
    if cfg.teacher is not None:
        assert _model_known(cfg.teacher.name), cfg.teacher.name
    assert cfg.output_dir.startswith("runs/")


def _load(rel: str):
    return load_config(Path(__file__).resolve().parents[1] / "configs" / rel)


def test_spec_values_are_in_the_configs():
    c = _load("cifar100/kd/resnet32x4_resnet8x4.yaml")
    assert (c.optim.lr, c.schedule.epochs, c.schedule.milestones, c.data.batch_size) == (0.05, 240, [150, 180, 210], 64)
    assert c.method.params == {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    assert _load("cifar100/kd/vgg13_mobilenetv2.yaml").optim.lr == 0.01
    assert _load("cifar100/dkd/resnet56_resnet20.yaml").method.params["beta"] == 2.0
    assert _load("cifar100/dkd/wrn_40_2_wrn_16_2.yaml").method.params["beta"] == 6.0
    assert _load("cifar100/dkd/resnet32x4_resnet8x4.yaml").method.params["beta"] == 8.0
    o = _load("cifar100/official/nkd_resnet34_resnet18.yaml")
    assert (o.optim.lr, o.schedule.milestones, o.schedule.gamma, o.data.batch_size) == (0.1, [60, 120, 160], 0.2, 128)
    assert o.method.params == {"temperature": 3.0, "gamma": 3.5, "ce_weight": 1.0}
    u = _load("cifar100/official/uskd_resnet18.yaml").method.params
    assert (u["alpha"], u["beta"], u["mu"]) == (0.1, 0.1, 0.1)
    i = _load("imagenet/nkd/resnet34_resnet18.yaml")
    assert (i.optim.lr, i.optim.weight_decay, i.data.global_batch_size, i.schedule.milestones) == (
        0.1, 1e-4, 256, [30, 60, 90])
    d = _load("imagenet/nkd/deit3s_tiny.yaml")
    assert d.method.params["gamma"] == 1.0 and d.optim.name == "adamw" and d.train.grad_clip == 5.0
    assert (d.data.mixup, d.data.cutmix, d.data.label_smoothing) == (0.8, 1.0, 0.1)
    crd_pairs = {p.stem for p in (CONFIGS[0].parents[2] / "configs" / "cifar100" / "nkd").glob("*.yaml")}
    assert len(crd_pairs) == 11
    for rel in ("imagenet/uskd/" + n + ".yaml" for n in ("resnet18", "resnet50", "resnet101", "mobilenetv1_100",
                                                       "mobilenetv2_100", "shufflenet_v2_x1_0", "regnetx_016",
                                                       "swin_tiny", "deit_tiny")):
        p = _load(rel).method.params
        assert (p["alpha"], p["beta"], p["mu"]) == (1.0, 0.1, 0.005), rel


def test_generated_files_are_up_to_date(tmp_path):
    """configs/generate.py reproduces the committed YAML exactly."""
    import runpy
    import shutil

    src = Path(__file__).resolve().parents[1] / "configs"
    shutil.copy(src / "generate.py", tmp_path / "generate.py")
    runpy.run_path(str(tmp_path / "generate.py"), run_name="__main__")
    for p in CONFIGS:
        rel = p.relative_to(src)
        assert yaml.safe_load((tmp_path / rel).read_text()) == yaml.safe_load(p.read_text()), rel
        assert (tmp_path / rel).read_text() == p.read_text(), rel
