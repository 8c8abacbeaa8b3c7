"""Fast lockstep check (seconds): a student trained in a group is bitwise its separate run with
MixUp, CutMix and dropout on — the random draws of a step are a function of (seed, epoch, step,
rank), never of the global RNG that other students' initialisation moved."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import write_config
from nkd.config import load_config
from nkd.engine import Trainer, train_together
from nkd.engine.checkpoint import load_checkpoint

TEACHER = {"name": "resnet8", "num_classes": 10}
SMALL = {"synthetic_samples": 32, "batch_size": 8, "image_size": 8}


def _cfg(tmp: Path, name: str, model: dict, data: dict, method: str = "kd") -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    return write_config(tmp / f"{name}.yaml", output_dir=str(tmp / name), teacher=TEACHER,
                        model={"num_classes": 10, **model}, method={"name": method},
                        data={**SMALL, **data}, schedule={"name": "cosine", "epochs": 1})


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["trainable"]


@pytest.mark.parametrize("data", [{"mixup": 0.8}, {"cutmix": 1.0}, {"mixup": 0.8, "cutmix": 1.0}],
                         ids=["mixup", "cutmix", "both"])
def test_lockstep_student_is_its_separate_run_with_mixing_and_dropout(tmp_path, data):
    # alone: resnet8; in the group it comes after a wrn with dropout, whose initialisation and
    # steps draw from the RNG too
    alone = tmp_path / "alone"
    Trainer(load_config(_cfg(alone, "r8", {"name": "resnet8"}, data))).fit()
    group = tmp_path / "group"
    cfgs = [load_config(_cfg(group, "r8", {"name": "resnet8"}, data)),
            load_config(_cfg(group, "wrn", {"name": "wrn_16_1", "kwargs": {"drop_rate": 0.3}}, data, "nkd"))]
    train_together(cfgs)
    wa, wb = _weights(alone / "r8"), _weights(group / "r8")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])][:3]


def test_dropout_student_in_a_group_is_its_separate_run(tmp_path):
    alone = tmp_path / "alone"
    drop = {"name": "wrn_16_1", "kwargs": {"drop_rate": 0.3}}
    Trainer(load_config(_cfg(alone, "wrn", drop, {"mixup": 0.8}, "nkd"))).fit()
    group = tmp_path / "group"
    train_together([load_config(_cfg(group, "wrn", drop, {"mixup": 0.8}, "nkd")),
                    load_config(_cfg(group, "r8", {"name": "resnet8"}, {"mixup": 0.8}))])
    wa, wb = _weights(alone / "wrn"), _weights(group / "wrn")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_construction_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    Trainer(load_config(_cfg(tmp_path, "r8", {"name": "resnet8"}, {"mixup": 0.8})))
    assert torch.equal(torch.get_rng_state(), before)
