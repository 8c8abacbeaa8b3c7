"""Run under torchrun by tests/test_fsdp.py: two SGD steps of NKD distillation with the student (and,
in mode ``both``, the teacher) sharded by FSDP2 (``fully_shard``) on CPU/gloo, each process on its
half of the batch; rank 0 saves the student's full weights to ``argv[1]``.

Modes: ``root`` — the decoder layers and the root are sharded, the LM head in the root's group;
``head`` — the LM head is its own FSDP2 unit too (sharded again after its forward, so the loss
gathers it); ``both`` — as ``head``, and the teacher is sharded the same way."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lm_tiny import tiny_blocks, tiny_llama  # noqa: E402
from nkd.integrations.hf import distillation_loss  # noqa: E402


def models():
    return tiny_llama(hidden=16, layers=2, seed=3).train(), tiny_llama(hidden=32, layers=2, seed=4).eval()


def shard(model: torch.nn.Module, head: bool) -> None:
    for layer in model.model.layers:
        fully_shard(layer)
    if head:
        fully_shard(model.lm_head)
    fully_shard(model)


def train(student, teacher, rank: int = 0, world: int = 1) -> None:
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    blocks = tiny_blocks(n=8, length=12)
    for step in range(2):
        ids = blocks[step * 4:(step + 1) * 4].chunk(world)[rank]
        loss = distillation_loss(student, teacher, ids, method="nkd", ce_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(out: str, mode: str) -> None:
    dist.init_process_group("gloo")
    student, teacher = models()
    shard(student, head=mode in ("head", "both"))
    if mode == "both":
        shard(teacher, head=True)
    train(student, teacher, dist.get_rank(), dist.get_world_size())
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in student.state_dict().items()}
    if dist.get_rank() == 0:
        torch.save(full, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
