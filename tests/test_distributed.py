"""DDP: 2 CPU processes (gloo) under torchrun equal one process with the same global batch.

The student is a small ViT (LayerNorm only) — or a BatchNorm CNN with ``train.sync_bn=true``
(nkd's CPU SyncBatchNorm); without it, batch-norm statistics are per process and a BN student
does not match a 1-process run. The teacher is a CNN in eval mode (per-sample), as in real KD runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import procs
from helpers import write_config
from nkd.config import load_config
from nkd.engine import Trainer
from nkd.engine.checkpoint import load_checkpoint
from nkd.engine.schedule import lr_at
from nkd.losses import uskd_loss

pytest.importorskip("timm")
pytestmark = pytest.mark.slow

STUDENT = {"name": "timm/test_vit", "num_classes": 10, "kwargs": {"img_size": 32}}
TEACHER = {"name": "resnet8", "num_classes": 10}


def base_config(tmp_path: Path, method: str, params: dict, teacher: bool) -> str:
    extra = {"teacher": TEACHER} if teacher else {}
    return write_config(tmp_path / f"{method}.yaml", model=STUDENT, method={"name": method, "params": params},
                        data={"image_size": 32, "synthetic_samples": 64, "batch_size": 8},
                        schedule={"name": "constant", "epochs": 1}, optim={"lr": 0.05},
                        train={"max_steps_per_epoch": 3, "progress": False, "tensorboard": False}, **extra)


def torchrun(cfg: str, nproc: int, *overrides: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "nkd",
           "train", cfg, *overrides]
    res = procs.run(cmd, env=env, capture_output=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")["trainable"]


@pytest.mark.parametrize("method,params", [("kd", {"temperature": 4.0}), ("nkd", {"temperature": 1.0})])
def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, method, params):
    cfg = base_config(tmp_path, method, params, teacher=True)
    torchrun(cfg, 2, f"output_dir={tmp_path / 'ddp'}")  # 2 x 8 per rank
    Trainer(load_config(cfg, [f"output_dir={tmp_path / 'one'}", "data.batch_size=16"])).fit()
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    assert a.keys() == b.keys()
    moved = 0
    init = Trainer(load_config(cfg, [f"output_dir={tmp_path / 'init'}"])).trainable.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=k)
        moved += int(not torch.equal(a[k], init[k]))
    assert moved > 10  # training really changed the weights
    summary = (tmp_path / "ddp" / "summary.json").read_text()
    assert '"world_size": 2' in summary


def test_uskd_batch_mean_is_taken_per_process(tmp_path):
    """USKD's soft target uses the batch mean of s_t^2 over each process's local batch (as the
    official code does). One DDP step equals averaging the USKD loss computed per half-batch."""
    params = {"alpha": 1.0, "beta": 0.5, "mu": 0.1}
    cfg = base_config(tmp_path, "uskd", params, teacher=False)
    torchrun(cfg, 2, f"output_dir={tmp_path / 'ddp'}", "train.max_steps_per_epoch=1")
    c = load_config(cfg, [f"output_dir={tmp_path / 'ref'}", "data.batch_size=16", "train.max_steps_per_epoch=1"])
    t = Trainer(c)
    x, y = next(iter(t.loaders.train))
    t.trainable.train()
    out = t.trainable(x)
    logits, weak = out["logits"], out["weak_logits"]
    halves = [uskd_loss(logits[s], weak[s], y[s], **params) for s in (slice(0, 8), slice(8, 16))]
    total = F.cross_entropy(logits, y) + 0.5 * (halves[0] + halves[1])
    for g in t.optimizer.param_groups:
        g["lr"] = lr_at(c.optim.lr, c.schedule, 0.0)
    total.backward()
    t.optimizer.step()
    ddp = weights(tmp_path / "ddp")
    for k, v in t.trainable.state_dict().items():
        torch.testing.assert_close(ddp[k], v, atol=2e-6, rtol=1e-5, msg=k)
    # and it is not the global-batch mean: a 1-process run with batch 16 differs
    Trainer(load_config(cfg, [f"output_dir={tmp_path / 'one'}", "data.batch_size=16",
                              "train.max_steps_per_epoch=1"])).fit()
    one = weights(tmp_path / "one")
    assert any(not torch.allclose(one[k], ddp[k], atol=1e-7, rtol=0) for k in one if k.startswith("student."))


@pytest.mark.parametrize("sync_bn", [True, False])
def test_batchnorm_student_equals_one_process_only_with_sync_bn(tmp_path, sync_bn):
    """resnet8 (BatchNorm): 2 processes with train.sync_bn=true give the 1-process weights (to float
    rounding); without it the per-process statistics make them differ."""
    cfg = write_config(tmp_path / "bn.yaml", model={"name": "resnet8", "num_classes": 10}, method={"name": "ce"},
                       data={"image_size": 16, "synthetic_samples": 64, "batch_size": 8},
                       schedule={"name": "constant", "epochs": 1}, optim={"lr": 0.05},
                       train={"max_steps_per_epoch": 3, "progress": False, "tensorboard": False,
                              "sync_bn": sync_bn})
    torchrun(cfg, 2, f"output_dir={tmp_path / 'ddp'}")
    Trainer(load_config(cfg, [f"output_dir={tmp_path / 'one'}", "data.batch_size=16"])).fit()
    a, b = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    if sync_bn:
        assert worst < 1e-4, worst
    else:
        assert worst > 1e-2, worst
