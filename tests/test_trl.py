"""nkd.integrations.trl: TRL's GKDTrainer and DistillationTrainer with nkd's fused losses, on tiny config-built
Llama models and a character tokenizer (nothing downloaded, ``transformers`` generation, no vLLM): equality with
TRL's own loss and with the losses on materialized logits — on dataset batches and on student-generated ones, where
the target is the sampled token — gradients, training steps, bad input, and the docs' example."""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import procs

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DistillationConfig, DistillationTrainer  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from nkd.integrations.trl import NKDDistillationTrainer, NKDGKDTrainer  # noqa: E402
from nkd.losses import kd_loss, nkd_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPECIAL = ["<pad>", "<eos>", "<user>", "<assistant>"]
VOCAB = {t: i for i, t in enumerate(SPECIAL + list("abcdefghijklmnopqrstuvwxyz .?"))}
V = len(VOCAB)
CHAT = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}<eos>{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
PAIRS = [("hi", "hello there"), ("how are you", "fine"), ("what is it", "a cat sat"), ("yes or no", "no")]
MESSAGES = Dataset.from_dict({"messages": [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in PAIRS]})
PROMPTS = Dataset.from_dict({"prompt": [q for q, _ in PAIRS]})


def tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, the chat roles and <eos> as special tokens, left padding (TRL's generation)."""
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>",
                                  additional_special_tokens=["<user>", "<assistant>"], padding_side="left")
    tok.chat_template = CHAT
    return tok


TOK = tokenizer()


def tiny(hidden: int, seed: int, dtype=torch.float64, vocab: int = V) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                      initializer_range=0.2,  # sharper distributions than the default 0.02: losses far from 0
                      bos_token_id=None)
    return LlamaForCausalLM(cfg).to(dtype)


COMMON = dict(report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, per_device_train_batch_size=2, logging_steps=1,
              bf16=False, seed=0)


def gkd(cls, student, teacher, tmp_path, *, method_kw=None, **cfg):
    args = GKDConfig(output_dir=str(tmp_path / "gkd"), max_new_tokens=6, **(COMMON | cfg))
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=MESSAGES, processing_class=TOK, **(method_kw or {}))


def distill(cls, student, teacher, tmp_path, *, method_kw=None, **cfg):
    args = DistillationConfig(output_dir=str(tmp_path / "distill"), max_completion_length=6, **(COMMON | cfg))
    return cls(model=student, teacher_model=teacher, args=args, train_dataset=PROMPTS, processing_class=TOK, **(method_kw or {}))


def student_batch(trainer, seed=0):
    """A GKD batch the student generated from the prompts (as GKDTrainer's training_step makes with lmbda=1)."""
    batch = trainer.data_collator([MESSAGES[i] for i in range(len(MESSAGES))])
    torch.manual_seed(seed)
    with torch.no_grad():
        ids, mask, labels = GKDTrainer.generate_on_policy_outputs(trainer.model, batch, trainer.generation_config)
    return batch, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def record_generations(trainer) -> list[bool]:
    """Records, per generated batch, whether the teacher (True) or the student (False) generated it."""
    who, generate = [], trainer.generate_on_policy_outputs

    def recorded(model, inputs, config):
        who.append(model is trainer.teacher_model)
        return generate(model, inputs, config)

    trainer.generate_on_policy_outputs = recorded
    return who


def value_and_grads(trainer, model, inputs, n=None):
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=n)
    return loss.detach(), torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def materialized(student, teacher, ids, mask, labels):
    """Full logits of both models ``[B, T-1, V]`` and the next-token targets: the sampled/dataset token, -100 where
    the label is -100 (the prompt, padding, after EOS)."""
    z = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        u = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return z, u, ids[:, 1:].masked_fill(labels[:, 1:] == -100, -100)


def assert_close_all(a, b, rtol, atol):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("beta,dtype", [(0.0, torch.float64), (0.5, torch.float64), (1.0, torch.float64), (0.5, torch.float32)])
def test_gkd_jsd_equals_trls_own_compute_loss_on_dataset_and_generated_batches(tmp_path, beta, dtype):
    student, teacher = tiny(32, 0, dtype), tiny(48, 1, dtype)
    ours = gkd(NKDGKDTrainer, student, teacher, tmp_path, beta=beta)
    theirs = gkd(GKDTrainer, student, teacher, tmp_path, beta=beta)
    assert ours.loss_kwargs == {"beta": beta, "temperature": 1.0, "ce_weight": 0.0}
    batch, generated = student_batch(ours)
    assert generated["input_ids"].shape[1] > batch["prompts"].shape[1]
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    for inputs, n in ((batch, None), (generated, None), (batch, 40), (generated, 40)):
        a, ga = value_and_grads(ours, student, inputs, n)
        b, gb = value_and_grads(theirs, student, inputs, n)
        assert a > 0
        torch.testing.assert_close(a, b, **tol)
        assert_close_all(ga, gb, **tol)


@pytest.mark.parametrize("method", ["nkd", "kd"])
def test_on_a_student_generated_batch_the_target_is_the_sampled_token(tmp_path, method):
    student, teacher = tiny(32, 2), tiny(48, 3)
    kw = dict(temperature=2.0, ce_weight=0.3) | (dict(gamma=1.3) if method == "nkd" else {})
    tr = gkd(NKDGKDTrainer, student, teacher, tmp_path, lmbda=1.0, method_kw=dict(method=method, **kw))
    batch, gen = student_batch(tr, seed=1)
    ids, mask, labels = gen["input_ids"], gen["attention_mask"], gen["labels"]
    p = batch["prompts"].shape[1]
    completion = mask[:, p:] == 1
    # TRL's convention: the prompt is -100, the completion is its own label up to the first EOS
    assert (labels[:, :p] == -100).all() and torch.equal(labels[:, p:][completion], ids[:, p:][completion])
    assert (labels[:, p:][~completion] == -100).all()

    loss, grads = value_and_grads(tr, student, gen)
    z, u, t = materialized(student, teacher, ids, mask, labels)
    dense = nkd_loss(z, u, t, temperature=2.0, gamma=1.3) if method == "nkd" else kd_loss(z, u, t, temperature=2.0)
    ref = dense + 0.3 * F.cross_entropy(z.reshape(-1, V), t.reshape(-1))
    ref_grads = torch.autograd.grad(ref, list(student.parameters()))
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-9, atol=1e-12)
    assert_close_all(grads, ref_grads, rtol=1e-7, atol=1e-12)

    if method == "nkd":  # the target term alone (γ = 0, no CE, λ = 1): mean of −T_t·log S_t at the sampled t
        tr.loss_kwargs = dict(temperature=1.0, gamma=0.0, ce_weight=0.0)
        target_term = tr.compute_loss(student, gen).detach()
        valid = t != -100
        log_s, p_t = z.detach().log_softmax(-1), u.softmax(-1)

        def term(tok):
            return -(p_t.gather(-1, tok[..., None]) * log_s.gather(-1, tok[..., None]))[..., 0][valid].mean()

        torch.testing.assert_close(target_term, term(t.clamp(min=0)), rtol=1e-9, atol=1e-12)
        assert not torch.allclose(target_term, term(u.argmax(-1)), rtol=1e-3)  # not the teacher's top token


@pytest.mark.parametrize("lmbda,seq_kd,generations", [(0.0, False, 0), (0.5, False, None), (1.0, False, 3), (0.0, True, 3)])
def test_gkd_trains_off_policy_mixed_and_on_policy(tmp_path, lmbda, seq_kd, generations):
    student, teacher = tiny(32, 4, torch.float32), tiny(48, 5, torch.float32)
    tr = gkd(NKDGKDTrainer, student, teacher, tmp_path, lmbda=lmbda, seq_kd=seq_kd, max_steps=3, learning_rate=1e-2,
             method_kw=dict(method="nkd", ce_weight=0.0))
    who = record_generations(tr)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    t_before = [p.detach().clone() for p in teacher.parameters()]
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), losses
    assert all(not torch.equal(p, before[n]) for n, p in student.named_parameters() if "norm" not in n)
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters()))
    if generations is None:
        assert 0 < len(who) < 3, who  # mixed: some batches generated, some from the dataset
    else:
        assert len(who) == generations
    assert all(who) if seq_kd else not any(who)  # seq_kd: the teacher generates; lmbda: the student


def test_a_gkd_training_run_with_jsd_equals_trls_run(tmp_path):
    """Same seed, same models, lmbda=0.5 with gradient accumulation: nkd's trainer ends on TRL's weights."""
    runs = []
    for cls in (GKDTrainer, NKDGKDTrainer):
        student, teacher = tiny(32, 6, torch.float32), tiny(48, 7, torch.float32)
        tr = gkd(cls, student, teacher, tmp_path, lmbda=0.5, max_steps=2, learning_rate=1.0, optim="sgd", gradient_accumulation_steps=2,
                 per_device_train_batch_size=1)
        who = record_generations(tr)
        tr.train()
        assert 0 < len(who) < 4  # of the 4 micro-batches, some generated by the student, some from the dataset
        runs.append((student, [h["loss"] for h in tr.state.log_history if "loss" in h]))
    (ref, ref_losses), (ours, our_losses) = runs
    assert our_losses == pytest.approx(ref_losses, rel=1e-4)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(a, b) for a, b in zip(ours.parameters(), tiny(32, 6, torch.float32).parameters()))


def test_distillation_trainer_equals_trls_loss_and_the_materialized_nkd(tmp_path):
    student, teacher = tiny(32, 8), tiny(48, 9)
    ours = distill(NKDDistillationTrainer, student, teacher, tmp_path, beta=0.5, temperature=0.8)
    theirs = distill(DistillationTrainer, student, teacher, tmp_path, beta=0.5, temperature=0.8)
    assert ours.loss_kwargs == {"beta": 0.5, "temperature": 0.8, "ce_weight": 0.0}
    student.train()
    torch.manual_seed(0)
    inputs = ours._prepare_inputs([PROMPTS[i] for i in range(2)])  # the student generates the completions
    assert inputs["completion_mask"].sum() > 0
    a, ga = value_and_grads(ours, student, inputs)
    b, gb = value_and_grads(theirs, student, inputs)
    # TRL's chunked kernel computes in float32 also for float64 models: equal to float32 precision
    torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-7)
    assert_close_all(ga, gb, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours._metrics["train"]["entropy"][-1], theirs._metrics["train"]["entropy"][-1], rtol=1e-5, atol=0)

    # NKD on the same generated batch: the target is the sampled completion token
    ours.method, ours.loss_kwargs = "nkd", dict(temperature=1.0, gamma=1.5, ce_weight=0.0)
    loss, grads = value_and_grads(ours, student, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    completion = inputs["completion_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    labels = torch.cat([torch.full_like(inputs["prompt_ids"], -100), completion], 1)
    z, u, t = materialized(student, teacher, ids, mask, labels)
    ref = nkd_loss(z, u, t, temperature=1.0, gamma=1.5) * (t != -100).sum() / inputs["num_items_in_batch"]
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-9, atol=1e-12)
    assert_close_all(grads, torch.autograd.grad(ref, list(student.parameters())), rtol=1e-7, atol=1e-12)


def test_distillation_trainer_trains(tmp_path):
    student, teacher = tiny(32, 10, torch.float32), tiny(48, 11, torch.float32)
    tr = distill(NKDDistillationTrainer, student, teacher, tmp_path, max_steps=2, learning_rate=1e-2, method_kw=dict(method="nkd"))
    before = [p.detach().clone() for p in student.parameters()]
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and h["loss"] > 0 and h["entropy"] > 0 for h in logs), logs
    assert sum(not torch.equal(a, b) for a, b in zip(before, student.parameters())) > len(before) // 2


def test_bad_input_names_the_argument(tmp_path):
    student, teacher = tiny(32, 12, torch.float32), tiny(48, 13, torch.float32)
    cases = [(dict(method="ce"), "method must be one of"), (dict(gamma=1.0), "gamma is not an option of method='jsd'"),
             (dict(method="nkd", temperature=-1.0), "temperature"), (dict(method="kd", ce_weight=-1.0), "ce_weight"),
             (dict(topk_rest="uniform"), "topk_rest is not an option")]
    for kw, msg in cases:
        for make in (gkd, distill):
            with pytest.raises(ValueError, match=msg):
                make(NKDGKDTrainer if make is gkd else NKDDistillationTrainer, student, teacher, tmp_path, method_kw=kw)
    with pytest.raises(ValueError, match=f"teacher_model's LM head has V={V + 1} rows, the student's V={V}"):
        gkd(NKDGKDTrainer, student, tiny(48, 14, torch.float32, vocab=V + 1), tmp_path)
    with pytest.raises(ValueError, match="beta"):  # GKDConfig's beta reaches the loss's own check
        gkd(NKDGKDTrainer, student, teacher, tmp_path, beta=1.5)
    with pytest.raises(ValueError, match="teacher_model"):
        distill(NKDDistillationTrainer, student, None, tmp_path)
    tr = gkd(NKDGKDTrainer, student, teacher, tmp_path)
    batch = tr.data_collator([MESSAGES[0]])
    with pytest.raises(ValueError, match="needs labels"):
        tr.compute_loss(student, {k: batch[k] for k in ("input_ids", "attention_mask")})


def test_importing_the_module_needs_no_trl():
    code = ("import sys; sys.modules['trl'] = None; import nkd.integrations.trl as t\n"
            "try:\n    t.NKDGKDTrainer\nexcept ImportError as e:\n    print('nkd[trl]' in str(e))")
    out = procs.run([sys.executable, "-c", code], capture_output=True)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_docs_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "docs" / "lm.md").read_text()
    section = text.split("## On-policy distillation with TRL", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for code in blocks:
        exec(compile(code, "docs/lm.md", "exec"), ns)  # noqa: S102
    assert all(math.isfinite(h["loss"]) for h in ns["trainer"].state.log_history if "loss" in h)
