"""PEFT students: LoRA on attention without full logits, LoRA on the LM head through its effective
weight ``W + s·B·A`` — the fused loss equals the materialized loss on the PEFT model's own logits,
and its gradients reach every LoRA matrix."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lm_tiny import tiny_blocks, tiny_llama  # noqa: E402
from nkd.integrations.hf import LMHead, causal_lm_hidden, distillation_loss, shift_labels  # noqa: E402
from nkd.losses import kd_loss, nkd_loss  # noqa: E402


def _peft(targets, dropout=0.0, seed=0):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(hidden=32, layers=1, seed=seed).double()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout))
    torch.manual_seed(5)
    for name, p in pm.named_parameters():  # B starts at 0: make every LoRA matrix matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return pm


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]], ids=["attention", "lm_head"])
@pytest.mark.parametrize("method", ["nkd", "kd"])
def test_lora_student_equals_the_materialized_loss_and_gradients(targets, method):
    student, teacher = _peft(targets), tiny_llama(hidden=48, layers=1, seed=7).double()
    ids = tiny_blocks(n=3, length=12)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "full logits are computed" warning for a PEFT model
        ours = distillation_loss(student, teacher, ids, mask, method=method, ce_weight=1.0)
    # reference: the PEFT model's own logits (its LoRA head applied by peft itself)
    z = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        u = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    t = shift_labels(ids, mask)
    keep = t != -100
    dense = nkd_loss(z, u, t) if method == "nkd" else kd_loss(z, u, t, temperature=1.0)
    ref = dense + torch.nn.functional.cross_entropy(z[keep], t[keep])
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    lora = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    assert any("lm_head" in n for n, _ in lora) == ("lm_head" in targets)
    g_ours = torch.autograd.grad(ours, [p for _, p in lora])
    g_ref = torch.autograd.grad(ref, [p for _, p in lora])
    for (n, _), a, b in zip(lora, g_ours, g_ref):
        assert a.abs().sum() > 0, n
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=n)


def test_lora_head_is_its_effective_weight_and_dropout_on_it_is_refused():
    student = _peft(["lm_head"])
    _, head = causal_lm_hidden(student, tiny_blocks(n=1, length=4))
    layer = student.get_output_embeddings()
    assert isinstance(head, LMHead)
    expected = layer.base_layer.weight + layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
    torch.testing.assert_close(head.weight, expected)
    dropped = _peft(["lm_head"], dropout=0.1).train()
    with pytest.raises(ValueError, match="lora_dropout"):
        causal_lm_hidden(dropped, tiny_blocks(n=1, length=4))
