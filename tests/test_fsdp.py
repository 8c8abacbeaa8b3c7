"""The HF adapter and the fused losses under FSDP2 (``fully_shard``): two real processes on CPU
(gloo), each on half the batch, end on the weights of one process on the whole batch — with the LM
head in the root's group, as its own sharded unit (gathered whole for the loss, gradient averaged
over the processes), and with the teacher sharded too."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import procs

pytest.importorskip("transformers")
pytest.importorskip("torch.distributed.fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["root", "head", "both"])
def test_fsdp2_two_processes_equal_one_process(tmp_path, mode):
    from lm_fsdp_worker import models, train

    student, teacher = models()
    train(student, teacher)
    expected = {k: v.detach() for k, v in student.state_dict().items()}
    worker = Path(__file__).resolve().parent / "lm_fsdp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path / "student.pt"), mode]
    res = procs.run(cmd, env=procs.nkd_env(OMP_NUM_THREADS="1"), capture_output=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = torch.load(tmp_path / "student.pt")
    assert got.keys() == expected.keys()
    moved = [k for k in expected if not torch.equal(expected[k], models()[0].state_dict()[k])]
    assert "lm_head.weight" in moved  # the steps changed the head: its gradient is part of the check
    for name, e in expected.items():
        torch.testing.assert_close(got[name], e, rtol=1e-5, atol=1e-6, msg=name)
