"""nkd.integrations.hf with tiny config-built Llama models (no hub access): hidden-state capture,
label shift, equality with the materialized losses, a Trainer step, and the docs' code blocks."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import procs

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from nkd.integrations.hf import causal_lm_hidden, distillation_loss, shift_labels  # noqa: E402
from nkd.losses import kd_loss, nkd_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V = 96


def tiny(hidden=32, layers=2, seed=0, **over):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(over)
    return LlamaForCausalLM(LlamaConfig(**cfg)).double()


def batch(b=3, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, 4] = -100  # a masked-out label inside the text (e.g. a prompt token)
    return ids, mask, labels


def test_captured_hidden_states_times_the_head_are_the_models_logits():
    model = tiny()
    ids, mask, _ = batch()
    hidden, head = causal_lm_hidden(model, ids, mask)
    assert hidden.shape == (3, 10, 32) and head is model.lm_head
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hidden @ head.weight.T, logits, rtol=1e-10, atol=1e-10)


def test_shift_matches_the_transformers_causal_lm_loss():
    model = tiny()
    ids, mask, labels = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    target = shift_labels(ids, mask, labels)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), target.reshape(-1))
    torch.testing.assert_close(ce.float(), out.loss)
    # without labels: input_ids with padding left out
    assert torch.equal(shift_labels(ids, mask), ids.masked_fill(mask == 0, -100)[:, 1:])


@pytest.mark.parametrize("method", ["nkd", "kd"])
def test_distillation_loss_equals_the_materialized_loss_and_gradients(method):
    student, teacher = tiny(32, seed=1), tiny(48, layers=3, seed=2)
    ids, mask, labels = batch(seed=3)
    kw = dict(temperature=2.0, ce_weight=0.5, chunk_size=7) | (dict(gamma=1.3) if method == "nkd" else {})
    loss = distillation_loss(student, teacher, ids, mask, labels, method=method, **kw)
    ours = torch.autograd.grad(loss, list(student.parameters()))
    assert all(p.grad is None for p in teacher.parameters())

    z = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        u = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    t = shift_labels(ids, mask, labels)
    ref_fn = (lambda z, u, t: nkd_loss(z, u, t, temperature=2.0, gamma=1.3)) if method == "nkd" else (
        lambda z, u, t: kd_loss(z, u, t, temperature=2.0))
    ref = ref_fn(z, u, t) + 0.5 * F.cross_entropy(z.reshape(-1, V), t.reshape(-1))
    refs = torch.autograd.grad(ref, list(student.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_num_items_in_batch_gives_sum_over_count_and_tied_heads_work():
    student, teacher = tiny(32, seed=4, tie_word_embeddings=True), tiny(32, seed=5)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    ids, mask, labels = batch(seed=6)
    mean = distillation_loss(student, teacher, ids, mask, labels)
    n = int((shift_labels(ids, mask, labels) != -100).sum())
    total = distillation_loss(student, teacher, ids, mask, labels, num_items_in_batch=2 * n)
    torch.testing.assert_close(total * 2, mean)
    total.backward()
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0


def test_refuses_models_whose_logits_are_not_the_head_and_bad_arguments():
    student, teacher = tiny(seed=7), tiny(seed=8)
    ids, mask, labels = batch()
    student.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        distillation_loss(student, teacher, ids, mask, labels)
    student.config.logit_scale = 1.0
    with pytest.raises(ValueError, match="method"):
        distillation_loss(student, teacher, ids, mask, labels, method="ce")
    with pytest.raises(ValueError, match="reduction"):
        distillation_loss(student, teacher, ids, mask, labels, reduction="sum")
    with pytest.raises(ValueError, match="labels must have the shape"):
        distillation_loss(student, teacher, ids, mask, labels[:, :5])
    with pytest.raises(TypeError, match="transformers causal LM"):
        causal_lm_hidden(torch.nn.Linear(3, 3), ids)
    wide = tiny(seed=9, vocab_size=V + 1)
    with pytest.raises(ValueError, match=f"teacher_weight has V={V + 1}, weight has V={V}"):
        distillation_loss(student, wide, ids, mask, labels)


def test_nkd_imports_without_transformers():
    code = "import sys; sys.modules['transformers'] = None; import nkd, nkd.losses, nkd.integrations.hf; print('ok')"
    out = procs.run([sys.executable, "-c", code], capture_output=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_one_trainer_step_with_gradient_accumulation_matches_a_manual_step(tmp_path):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    student, teacher = tiny(32, seed=10).float(), tiny(48, seed=11).float().eval()
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(0, V, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(4)]

    # expected: one SGD step (lr 1) on the mean NKD+CE over all valid tokens of the 4 sequences
    ref = tiny(32, seed=10).float()
    loss = distillation_loss(ref, teacher, ids, mask, labels, ce_weight=1.0)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    expected = [p.detach() - gr for p, gr in zip(ref.parameters(), grads)]

    class NKDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = distillation_loss(model, teacher, inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"),
                                    ce_weight=1.0, num_items_in_batch=num_items_in_batch)
            return (out, {}) if return_outputs else out

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    NKDTrainer(model=student, args=args, train_dataset=data).train()
    for (name, p), e in zip(student.named_parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-4, atol=1e-5, msg=name)


def _doc_blocks() -> list[str]:
    """The docs' code blocks, less the TRL section's (they need trl: tests/test_trl.py runs them)."""
    text = (ROOT / "docs" / "lm.md").read_text()
    head, trl = text.split("## On-policy distillation with TRL", 1)
    text = head + trl.split("\n## ", 1)[1]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_code_blocks_run(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    blocks = _doc_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for code in blocks:
        exec(compile(code, "docs/lm.md", "exec"), ns)  # noqa: S102
    assert torch.isfinite(ns["loss"]) and ns["hidden"].grad is not None
