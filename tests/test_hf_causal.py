"""The HF adapter refuses models that see the future and a num_items_in_batch that cannot be the
batch's token count (issue 17, item 20). Tiny config-built models, no downloads."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForMaskedLM, BertLMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from nkd.integrations.hf import distillation_loss  # noqa: E402

V = 96


def llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False)).double()


def bert(cls, **over):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, **over)
    return cls(cfg).double()


def ids(b=3, t=10):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [lambda: bert(BertForMaskedLM), lambda: bert(BertLMHeadModel, is_decoder=False)],
                         ids=["BertForMaskedLM", "BertLMHeadModel(is_decoder=False)"])
@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_model_that_sees_the_future_is_refused(make, role):
    model, causal = make(), llama()
    student, teacher = (model, causal) if role == "student" else (causal, model)
    with pytest.raises(ValueError, match=f"{role} is not a causal LM"):
        distillation_loss(student, teacher, ids())


def test_a_causal_bert_decoder_is_accepted():
    loss = distillation_loss(bert(BertLMHeadModel, is_decoder=True), llama(), ids())
    assert torch.isfinite(loss)


@pytest.mark.parametrize("n", [-5, 0, 26])
def test_num_items_in_batch_below_the_batchs_valid_tokens_is_refused(n):
    x = ids()  # 3 rows of 10 tokens: 27 valid next-token positions
    with pytest.raises(ValueError, match="num_items_in_batch must count .* at least this batch's 27, got"):
        distillation_loss(llama(), llama(1), x, num_items_in_batch=n)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        distillation_loss(llama(), llama(1), x, num_items_in_batch=torch.tensor(n))


def test_num_items_in_batch_normalizes_the_sum():
    x = ids()
    s, t = llama(), llama(1)
    mean = distillation_loss(s, t, x)
    assert torch.allclose(distillation_loss(s, t, x, num_items_in_batch=27), mean)
    assert torch.allclose(distillation_loss(s, t, x, num_items_in_batch=54), mean / 2)  # accumulated over 2 batches
    labels = torch.full_like(x, -100)  # no valid position at all: 0 items is right, and the loss is 0
    assert distillation_loss(s, t, x, labels=labels, num_items_in_batch=0) == 0
