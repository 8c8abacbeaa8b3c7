"""Structure guarantees: config field properties declared once on the fields, faults injected
through an explicit hook object, process-wide settings given back after a run, mixed precision
on the CPU (bf16 autocast, fp16 + GradScaler)."""

from __future__ import annotations

import dataclasses
import json
import logging
import typing

import pytest
import torch

from helpers import write_config
from nkd.config import LOCKSTEP_SHARED_KEYS, RUN_KEYS_SAFE_TO_CHANGE, Config, TrainConfig, field_keys, load_config
from nkd.engine import NonFiniteError, Trainer
from nkd.engine.faults import Faults
from nkd.engine.trainer import group_problems

SMALL = {"synthetic_samples": 32, "batch_size": 8, "image_size": 8}


def _cfg(tmp_path, name="c", **sections):
    sections = {"data": SMALL, "schedule": {"name": "constant", "epochs": 1}, **sections}
    return write_config(tmp_path / f"{name}.yaml", output_dir=str(tmp_path / "run"), **sections)


def test_every_field_of_a_mixed_section_declares_whether_a_lockstep_group_shares_it():
    for cls in (TrainConfig, Config):
        assert cls.LOCKSTEP_SHARED is None
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]) or f.name == "teacher":
                continue
            assert f.metadata.get("shared") in (True, False), f"{cls.__name__}.{f.name}"


@dataclasses.dataclass
class _TrainWithNewKnob(TrainConfig):
    new_knob: int = 0  # no shared= declared


@dataclasses.dataclass
class _ConfigWithNewKnob(Config):
    train: _TrainWithNewKnob = dataclasses.field(default_factory=_TrainWithNewKnob)


def test_an_undeclared_field_is_an_error_not_a_silent_per_student_key():
    with pytest.raises(TypeError, match="train.new_knob must declare shared"):
        field_keys("shared", _ConfigWithNewKnob)


def test_shared_and_resume_safe_keys_come_from_the_fields_and_decide_groups(tmp_path):
    assert "data.mixup" in LOCKSTEP_SHARED_KEYS and "optim.lr" not in LOCKSTEP_SHARED_KEYS
    assert "train.tensorboard" in RUN_KEYS_SAFE_TO_CHANGE and "optim.lr" not in RUN_KEYS_SAFE_TO_CHANGE
    a = load_config(_cfg(tmp_path, "a"))
    b = load_config(_cfg(tmp_path, "b", optim={"lr": 0.2}))
    c = load_config(_cfg(tmp_path, "c", data={**SMALL, "mixup": 0.2}))
    b.output_dir = c.output_dir = str(tmp_path / "other")
    assert not group_problems([a, b])
    assert any("data.mixup" in p for p in group_problems([a, c]))


def test_faults_come_from_a_hook_object_and_the_environment_is_not_read_in_process(tmp_path, monkeypatch):
    cfg = load_config(_cfg(tmp_path, train={"progress": False, "tensorboard": False, "nan_policy": "stop"}))
    monkeypatch.setenv("NKD_FAULT_NAN_STEPS", "0")  # the training path never reads it
    Trainer(cfg).fit()
    with pytest.raises(NonFiniteError):
        Trainer(cfg, overwrite=True, faults=Faults(nan_steps=frozenset({1}))).fit()
    assert Faults.from_env({"NKD_FAULT_NAN_STEPS": "1,3", "PATH": "/bin"}).nan_steps == {1, 3}
    assert Faults.from_env({"PATH": "/bin"}) is None


def test_a_run_gives_back_threads_deterministic_mode_and_logger(tmp_path):
    log = logging.getLogger("nkd")
    mine = logging.NullHandler()
    log.addHandler(mine)
    threads, propagate = torch.get_num_threads(), log.propagate
    try:
        cfg = load_config(_cfg(tmp_path, train={"threads": threads + 1, "deterministic": True, "progress": False,
                                                "tensorboard": False}))
        Trainer(cfg).fit()
        assert torch.get_num_threads() == threads
        assert not torch.are_deterministic_algorithms_enabled()
        assert mine in log.handlers and log.propagate == propagate
    finally:
        log.removeHandler(mine)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trainer_with_mixed_precision_on_cpu(tmp_path, amp):
    cfg = load_config(_cfg(tmp_path, teacher={"name": "resnet8", "num_classes": 10}, method={"name": "nkd"},
                           train={"amp": amp, "progress": False, "tensorboard": False}))
    summary = Trainer(cfg).fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["last_top1"] is not None and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    if amp == "fp16":  # the GradScaler is on and its scale is checkpointed
        ck = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
        assert ck["scaler"]["scale"] > 0


def test_every_dataset_is_one_registry_entry_the_config_and_loaders_read():
    from nkd.config import DataConfig
    from nkd.data import build
    from nkd.data.facts import DATASETS

    names = set(typing.get_args(typing.get_type_hints(DataConfig)["name"]))
    assert names == set(DATASETS)
    for name, facts in DATASETS.items():
        assert facts.folder or name in build.ARRAY_SOURCES, name  # every in-memory dataset has a loader
        assert (name in build.DEFAULT_STATS) == (facts.stats is not None)
