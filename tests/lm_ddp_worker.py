"""Run under torchrun by tests/test_lm_train.py: one DistillationTrainer step from a teacher cache,
rank 0 saves the student's weights to ``argv[2]``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformers import TrainingArguments  # noqa: E402

from lm_tiny import tiny_llama  # noqa: E402
from nkd.integrations.hf import DistillationTrainer  # noqa: E402
from nkd.lm import TeacherCache, cache_dataset  # noqa: E402


def main(cache_dir: str, out: str) -> None:
    cache = TeacherCache(cache_dir)
    blocks, mask = torch.load(Path(cache_dir).parent / "blocks.pt")
    student = tiny_llama(hidden=16, layers=1, seed=3)
    args = TrainingArguments(output_dir=str(Path(out).parent / "trainer"), max_steps=1, per_device_train_batch_size=2,
                             learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    DistillationTrainer(model=student, args=args, train_dataset=cache_dataset(blocks, attention_mask=mask), cache=cache,
                        method="nkd", ce_weight=1.0).train()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        torch.save({k: v.detach().clone() for k, v in student.state_dict().items()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
