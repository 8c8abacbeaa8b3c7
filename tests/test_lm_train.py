"""Training from a teacher cache equals training from the live teacher's top-k; DistillationTrainer;
text → blocks; evaluate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from lm_tiny import FILES, tiny_blocks, tiny_llama, tiny_tokenizer  # noqa: E402
from nkd.integrations.hf import distillation_loss, topk_distillation_loss  # noqa: E402
from nkd.lm import cache_dataset, check_vocab, evaluate, teacher_topk, text_blocks, write_teacher_cache  # noqa: E402


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                report_to=[], save_strategy="no", use_cpu=True, seed=0, logging_steps=1, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def _train(tmp_path, blocks, **trainer_kw):
    from nkd.integrations.hf import DistillationTrainer

    student = tiny_llama(hidden=16, layers=1, seed=3)
    tr = DistillationTrainer(model=student, args=_args(tmp_path), train_dataset=cache_dataset(blocks), **trainer_kw)
    tr.train()
    return student, tr


@pytest.mark.parametrize("method", ["nkd", "kd"])
def test_training_on_the_cache_is_bitwise_training_on_the_live_teachers_topk(tmp_path, method):
    teacher, blocks = tiny_llama(), tiny_blocks(n=12)
    cache = write_teacher_cache(teacher, blocks, tmp_path / "cache", top_k=8, batch_size=4)
    s_cache, tr = _train(tmp_path, blocks, cache=cache, method=method)
    assert tr.teacher is None
    s_live, _ = _train(tmp_path, blocks, teacher=teacher, top_k=8, method=method)
    s0 = tiny_llama(hidden=16, layers=1, seed=3)
    for (name, a), b, c in zip(s_cache.named_parameters(), s_live.parameters(), s0.parameters()):
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name  # it did train


@pytest.mark.parametrize("method", ["nkd", "kd"])
def test_full_vocabulary_topk_equals_the_dense_loss_in_float64(method):
    teacher, student = tiny_llama(vocab=60).double(), tiny_llama(hidden=16, layers=1, vocab=60, seed=2).double()
    blocks = tiny_blocks(n=4, vocab=60)
    mask = torch.ones_like(blocks)
    mask[1, 10:] = 0
    ids, lp, _ = teacher_topk(teacher, blocks, 60, mask)  # temperature 1: the loss applies its own
    assert lp.dtype == torch.float64
    kw = dict(temperature=2.0, ce_weight=1.0)
    sparse = topk_distillation_loss(student, (ids, lp), blocks, mask, method=method, **kw)
    dense = distillation_loss(student, teacher, blocks, mask, method=method, **kw)
    assert torch.allclose(sparse, dense, rtol=1e-7, atol=0)
    g_s = torch.autograd.grad(sparse, list(student.parameters()), allow_unused=True)
    g_d = torch.autograd.grad(distillation_loss(student, teacher, blocks, mask, method=method, **kw), list(student.parameters()),
                              allow_unused=True)
    for a, b in zip(g_s, g_d):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-7, atol=1e-12)


def test_trainer_refuses_no_or_two_teachers_and_nkd_topk_below_2(tmp_path):
    from nkd.integrations.hf import DistillationTrainer

    teacher, blocks = tiny_llama(), tiny_blocks(n=4)
    data = cache_dataset(blocks)
    cache = write_teacher_cache(teacher, blocks, tmp_path / "c", top_k=1)
    with pytest.raises(ValueError, match="teacher.*cache"):
        DistillationTrainer(model=tiny_llama(hidden=16), args=_args(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="teacher.*cache"):
        DistillationTrainer(model=tiny_llama(hidden=16), args=_args(tmp_path), train_dataset=data, teacher=teacher, cache=cache)
    with pytest.raises(ValueError, match="cache: written for V=200"):
        DistillationTrainer(model=tiny_llama(hidden=16, vocab=100), args=_args(tmp_path), train_dataset=data, cache=cache)
    tr = DistillationTrainer(model=tiny_llama(hidden=16), args=_args(tmp_path, max_steps=1), train_dataset=data, cache=cache)
    with pytest.raises(ValueError, match="teacher_topk"):
        tr.train()


def test_text_blocks_from_files_and_a_tokenizer():
    tok = tiny_tokenizer(300)
    blocks = text_blocks(FILES, tok, 32, eot_token="<|endoftext|>")
    assert blocks.dtype == torch.int64 and blocks.shape[1] == 32 and len(blocks) > 50
    stream = []
    for p in FILES:
        stream += tok.encode(p.read_text()).ids + [tok.token_to_id("<|endoftext|>")]
    assert torch.equal(blocks.flatten(), torch.tensor(stream[: blocks.numel()]))
    check_vocab(tok, tiny_llama(vocab=300))
    with pytest.raises(ValueError, match="tokenizer: vocabulary of 300 .* vocab_size=200"):
        check_vocab(tok, tiny_llama(vocab=200))
    with pytest.raises(ValueError, match="corpus: empty"):
        text_blocks([""], tok, 32)
    with pytest.raises(ValueError, match="corpus: not a file"):
        text_blocks(["no/such/file.txt"], tok, 32)
    with pytest.raises(ValueError, match="eot_token"):
        text_blocks(FILES, tok, 32, eot_token="<nope>")


def test_text_blocks_from_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    tok = tiny_tokenizer(300)
    ds = datasets.Dataset.from_dict({"text": [p.read_text() for p in FILES]})
    assert torch.equal(text_blocks(ds, tok, 32), text_blocks(FILES, tok, 32))


def test_evaluate_is_token_weighted_and_padding_aware():
    model, blocks = tiny_llama(), tiny_blocks(n=5)
    mask = torch.ones_like(blocks)
    mask[2, 6:] = 0
    mask[4, 12:] = 0
    res = evaluate(model, blocks, mask, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=blocks, attention_mask=mask).logits[:, :-1]
    valid = mask[:, 1:].bool()
    nll = F.cross_entropy(logits[valid], blocks[:, 1:][valid])
    top1 = (logits[valid].argmax(-1) == blocks[:, 1:][valid]).double().mean() * 100
    assert res["tokens"] == int(valid.sum()) == 5 * 15 - 10 - 4
    assert math.isclose(res["perplexity"], math.exp(float(nll)), rel_tol=1e-5)
    assert math.isclose(res["top1"], float(top1), rel_tol=1e-9)
    assert model.training is False
    full = evaluate(model, blocks)
    assert full["tokens"] == 75 and full["perplexity"] != res["perplexity"]


@pytest.mark.parametrize("method,parts", [("nkd", ("loss_target", "loss_non_target", "loss_ce")), ("kd", ("loss_kd", "loss_ce"))])
def test_trainer_logs_the_loss_parts_and_they_add_up(tmp_path, method, parts):
    from nkd.integrations.hf import DistillationTrainer

    teacher, blocks = tiny_llama(), tiny_blocks(n=4)
    cache = write_teacher_cache(teacher, blocks, tmp_path / "c", top_k=8)
    student = tiny_llama(hidden=16, layers=1, seed=3)
    args = _args(tmp_path, max_steps=1, learning_rate=0.0)
    tr = DistillationTrainer(model=student, args=args, train_dataset=cache_dataset(blocks), cache=cache, method=method, ce_weight=0.5)
    tr.train()
    row = next(r for r in tr.state.log_history if "loss" in r)
    assert all(k in row for k in parts)
    total = sum(row[k] for k in parts if k != "loss_ce") + 0.5 * row["loss_ce"]
    assert math.isclose(total, row["loss"], rel_tol=1e-4)
    ref = topk_distillation_loss(student, cache.topk(slice(None)), blocks, method=method, ce_weight=0.0, gamma=0.0) \
        if method == "nkd" else None
    if ref is not None:
        assert math.isclose(row["loss_target"], float(ref.detach()), rel_tol=1e-5)


@pytest.mark.parametrize("source", ["cache", "live"])
def test_distillation_trainer_with_gradient_accumulation_is_one_step_on_the_whole_batch(tmp_path, source):
    pytest.importorskip("accelerate")
    from nkd.integrations.hf import DistillationTrainer

    teacher, blocks = tiny_llama(), tiny_blocks(n=4)
    mask = torch.ones_like(blocks)
    mask[1, -blocks.shape[1] // 2:] = 0  # the micro-batches hold different numbers of valid tokens, so a mean of
    mask[2, -2:] = 0                      # per-micro-batch means would differ from the mean over the whole batch
    cache = write_teacher_cache(teacher, blocks, tmp_path / "cache", top_k=8, attention_mask=mask, batch_size=4)
    # expected: one SGD step (lr 1) on the mean NKD+CE over every valid token of the 4 blocks
    ref = tiny_llama(hidden=16, layers=1, seed=3)
    ids, lp = cache.topk(slice(0, 4))
    labels = blocks.masked_fill(mask == 0, -100)
    loss = topk_distillation_loss(ref, (ids, lp), blocks, mask, labels, ce_weight=1.0)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    expected = [p.detach() - g for p, g in zip(ref.parameters(), grads)]
    student = tiny_llama(hidden=16, layers=1, seed=3)
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1.0,
                 optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0)
    teacher_kw = {"cache": cache} if source == "cache" else {"teacher": teacher, "top_k": 8}
    DistillationTrainer(model=student, args=args, train_dataset=cache_dataset(blocks, attention_mask=mask), method="nkd",
                        ce_weight=1.0, **teacher_kw).train()
    for (name, p), e in zip(student.named_parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_distillation_trainer_on_two_processes_is_one_step_on_the_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo), 2 blocks each of unequal valid-token counts = one SGD step on
    the mean over the 4 blocks' valid tokens."""
    pytest.importorskip("accelerate")
    import os
    import sys
    from pathlib import Path

    import procs

    teacher, blocks = tiny_llama(), tiny_blocks(n=4)
    mask = torch.ones_like(blocks)
    mask[1, -blocks.shape[1] // 2:] = 0
    mask[2, -2:] = 0
    cache = write_teacher_cache(teacher, blocks, tmp_path / "cache", top_k=8, attention_mask=mask, batch_size=4)
    torch.save((blocks, mask), tmp_path / "blocks.pt")
    ref = tiny_llama(hidden=16, layers=1, seed=3)
    ids, lp = cache.topk(slice(0, 4))
    loss = topk_distillation_loss(ref, (ids, lp), blocks, mask, blocks.masked_fill(mask == 0, -100), ce_weight=1.0)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    expected = {n: p.detach() - g for (n, p), g in zip(ref.named_parameters(), grads)}
    worker = Path(__file__).resolve().parent / "lm_ddp_worker.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path / "cache"), str(tmp_path / "student.pt")]
    res = procs.run(cmd, env=procs.nkd_env(OMP_NUM_THREADS="1"), capture_output=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = torch.load(tmp_path / "student.pt")
    for name, e in expected.items():
        torch.testing.assert_close(got[name], e, rtol=1e-4, atol=1e-5, msg=name)
    assert os.path.getsize(tmp_path / "student.pt") > 0
