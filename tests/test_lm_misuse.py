"""Misuse hunt of the language-model surface (nkd.losses.fused_linear_*, nkd.integrations.hf):
each test is a minimal reproduction of a finding, checked against the materialized losses."""

from __future__ import annotations

import pytest
import torch

from nkd.losses import fused_linear_kd_loss, fused_linear_nkd_loss, nkd_loss

D = torch.float64


def _problem(n=7, h=5, ht=6, v=11, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dtype).requires_grad_()
    t_hidden = torch.randn(n, ht, generator=g, dtype=dtype)
    t_weight = torch.randn(v, ht, generator=g, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, t_hidden, t_weight, target


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------- double backward
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss_fn", [fused_linear_nkd_loss, fused_linear_kd_loss])
def test_double_backward_raises_instead_of_silently_dropping_the_second_order_term(loss_fn, reduction):
    """A gradient penalty ``loss + ‖∂loss/∂hidden‖²`` needs second derivatives. On the materialized
    logits it works; the fused loss returned a first-order gradient with no graph, so the penalty's
    contribution to ∂/∂weight was silently missing (off by ~50 % here). It must fail loudly."""
    hidden, weight, t_hidden, t_weight, target = _problem()
    loss = loss_fn(hidden, weight, t_hidden, t_weight, target, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="(?i)twice|once|double|second"):  # at either step
        (g,) = torch.autograd.grad(loss, hidden, create_graph=True)
        torch.autograd.grad(loss + (g**2).sum(), weight)


# ----------------------------------------------------------------------------- float16 gradients
def test_float16_grads_survive_the_default_grad_scaler_scale():
    """``torch.amp.GradScaler``'s initial scale is 2**16 = 65536, which overflows float16 (max 65504).
    Backward cast the incoming scalar gradient to float16 before multiplying: every gradient became
    inf/NaN. The materialized loss gives finite gradients for the same scaled loss."""
    hidden, weight, _, _, target = _problem(n=8, h=4, v=10)
    hidden = hidden.detach().half().requires_grad_()
    weight = weight.detach().half().requires_grad_()
    u = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    (fused_linear_nkd_loss(hidden, weight, teacher_logits=u, target=target) * 65536.0).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()

    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (nkd_loss((h2 @ w2.t()).float(), u, target) * 65536.0).backward()
    assert torch.isfinite(h2.grad).all()  # the reference is fine
    torch.testing.assert_close(hidden.grad.float(), h2.grad.float(), rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp16-inputs", "fp32-inputs-fp16-autocast"])
def test_float16_hidden_gradient_keeps_its_precision_under_loss_scaling(autocast):
    """The ∂L/∂hidden saved in forward was formed in float16 already multiplied by 1/N: for a
    real-sized batch it lies in float16's subnormal range (or flushes to 0), so loss scaling cannot
    rescue it. Materialized (the same float16 matmul, scaled gradient) the relative error is ~3e-4;
    fused it was ~5e-3 here, and grows with N and V (3e-2 at N = V = 2000)."""
    n, h, v, scale = 512, 32, 500, 2.0**15
    g = torch.Generator().manual_seed(0)
    h16 = torch.randn(n, h, generator=g, dtype=D).half()
    w16 = (torch.randn(v, h, generator=g, dtype=D) * 0.02).half()
    u = torch.randn(n, v, generator=g)
    target = torch.randint(0, v, (n,), generator=g)
    hd, wd = h16.double().requires_grad_(), w16.double()
    (truth,) = torch.autograd.grad(nkd_loss(hd @ wd.t(), u.double(), target), hd)

    in_dtype = torch.float32 if autocast else torch.float16
    hf, wf = h16.to(in_dtype).clone().requires_grad_(), w16.to(in_dtype)
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        loss = fused_linear_nkd_loss(hf, wf, teacher_logits=u, target=target)
    (loss * scale).backward()
    hr = h16.clone().requires_grad_()
    (nkd_loss((hr @ w16.t()).float(), u, target) * scale).backward()

    ref_err = _rel(hr.grad.double() / scale, truth)
    assert ref_err < 1e-3
    assert _rel(hf.grad.double() / scale, truth) < 3 * ref_err


# ----------------------------------------------------------------------------- argument validation
def test_invalid_topk_rest_is_refused_with_a_dense_teacher_too():
    """``topk_rest="unifrom"`` (a typo) was accepted silently unless a top-k teacher was given
    (the module forms already refuse it at construction)."""
    hidden, weight, t_hidden, t_weight, target = _problem()
    with pytest.raises(ValueError, match="topk_rest"):
        fused_linear_nkd_loss(hidden, weight, t_hidden, t_weight, target, topk_rest="unifrom")
    with pytest.raises(ValueError, match="topk_rest"):
        fused_linear_kd_loss(hidden, weight, teacher_logits=t_hidden @ t_weight.t(), target=target, topk_rest="unifrom")


# ----------------------------------------------------------------------------- Hugging Face adapter
def _qwen(hidden=16, vocab=32, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    return transformers.Qwen2ForCausalLM(cfg).double()


def test_distillation_loss_with_zero_num_items_in_batch_is_zero_not_nan():
    """A Trainer step whose whole (accumulated) batch has every label masked passes
    ``num_items_in_batch=0``: the loss was 0/0 = NaN and its gradients NaN, which poisons the
    weights. The docs promise 0 (with zero gradients) when no row is valid."""
    from nkd.integrations.hf import distillation_loss

    student, teacher = _qwen(seed=0), _qwen(hidden=24, seed=1).eval()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    for n in (0, torch.tensor(0)):
        student.zero_grad()
        loss = distillation_loss(student, teacher, ids, None, labels, num_items_in_batch=n)
        loss.backward()
        assert float(loss.detach()) == 0.0
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_falcon_h1_lm_head_multiplier_is_refused():
    """Falcon-H1 computes ``logits = lm_head(h) * lm_head_multiplier`` (released checkpoints use
    values far from 1). The adapter only refused softcapping / logit_scale / logits_scaling, so a
    Falcon-H1 student or teacher was silently distilled on the wrong logits."""
    transformers = pytest.importorskip("transformers")
    from nkd.integrations.hf import causal_lm_hidden

    cfg = transformers.FalconH1Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, mamba_d_ssm=32, mamba_n_heads=4,
                                      mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8,
                                      lm_head_multiplier=0.25)
    torch.manual_seed(0)
    model = transformers.FalconH1ForCausalLM(cfg).eval()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert not torch.allclose(logits, logits * 4)  # the multiplier really changes the logits
    with pytest.raises(ValueError, match="lm_head_multiplier"):
        causal_lm_hidden(model, ids)


def test_softcapping_in_a_nested_text_config_is_refused():
    """Multimodal causal LMs (PaliGemma 2, Gemma 3n, Gemma 4 ...) read ``final_logit_softcapping``
    from ``config.get_text_config()``; the adapter only looked at the top-level config, so their
    soft-capped logits were silently replaced by ``lm_head(h)``."""
    transformers = pytest.importorskip("transformers")
    from nkd.integrations.hf import causal_lm_hidden

    v = 40
    text = transformers.Gemma2Config(vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             image_size=16, patch_size=8)
    cfg = transformers.PaliGemmaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_index=v - 1,
                                       projection_dim=16)
    cfg.text_config.final_logit_softcapping = 0.5
    torch.manual_seed(0)
    model = transformers.PaliGemmaForConditionalGeneration(cfg).eval()
    ids = torch.randint(0, v - 1, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_hidden(model, ids)


def test_distillation_loss_names_the_model_that_is_not_a_causal_lm():
    """Both models were checked under the name "model", so ``distillation_loss(student, bad)``
    said "model must be a transformers causal LM" without saying which one."""
    from nkd.integrations.hf import distillation_loss

    student = _qwen()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="teacher"):
        distillation_loss(student, torch.nn.Linear(3, 3), ids)
    with pytest.raises(TypeError, match="student"):
        distillation_loss(torch.nn.Linear(3, 3), student, ids)
