r"""Hugging Face ``transformers`` causal LMs → the fused token-level losses.

A causal LM computes ``logits = lm_head(h)`` from its final (normed) hidden states ``h``
``[B, T, H]`` and trains position ``i`` to predict token ``i + 1``. This module takes ``h`` and
``lm_head`` from the model *without* the full ``[B, T, V]`` logits, applies the same label shift
as ``transformers``' causal-LM loss, and calls :func:`~nkd.losses.fused_linear_nkd_loss` or
:func:`~nkd.losses.fused_linear_kd_loss` or :func:`~nkd.losses.fused_linear_jsd_loss` (``method``
``"nkd"``, ``"kd"``, ``"jsd"``: the keys of :data:`LM_LOSSES`):

.. math::

    \text{target}_{b,i} = \text{labels}_{b,i+1}\ (i < T-1),\qquad
    \text{labels} = \text{input\_ids with } -100 \text{ where attention\_mask} = 0
    \ \text{(when not given)}

and positions whose label is ``-100`` (or whose label token is padding) are left out of the mean.

How the hidden states are obtained: the model is called through its own ``forward`` (so
``DistributedDataParallel`` and other wrappers see a normal forward pass) with
``logits_to_keep=1`` — the head runs on one position only — and a forward hook on the model's
decoder (``get_decoder()``) captures ``last_hidden_state``. Models whose logits are not
``lm_head(h)`` (final-logit soft-capping, logit scaling or multipliers, in the config or its text
config) are refused. Under FSDP2 (``fully_shard``) a head that is sharded at loss time is gathered
whole, its gradient averaged over the processes (:func:`_gathered`); tensor-parallel heads are not
supported.

``transformers`` is imported lazily: ``import nkd`` never needs it (extra ``nkd[lm]``).
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..losses.fused import fused_linear_jsd_loss, fused_linear_kd_loss, fused_linear_nkd_loss

__all__ = ["LM_LOSSES", "causal_lm_hidden", "shift_labels", "distillation_loss", "topk_distillation_loss"]  # + DistillationTrainer (lazy)

# the token-level losses by ``method`` name: the one list every LM entry point (and nkd.integrations.trl) accepts
LM_LOSSES: dict[str, Callable[..., Tensor]] = {"nkd": fused_linear_nkd_loss, "kd": fused_linear_kd_loss, "jsd": fused_linear_jsd_loss}
# keywords of the fused losses that are not a method's hyper-parameters
_CALL_KEYWORDS = frozenset({"ce_weight", "bias", "teacher_bias", "teacher_logits", "teacher_topk", "topk_rest", "ignore_index",
                            "reduction", "chunk_size"})


def hyper_parameters(method: str) -> tuple[str, ...]:
    """The hyper-parameters of ``LM_LOSSES[method]`` (e.g. ``("temperature", "gamma")`` for NKD), read from its signature."""
    params = inspect.signature(LM_LOSSES[method]).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _CALL_KEYWORDS)


# every keyword a trainer takes for its loss (the hyper-parameters of all methods, the top-k rest, the chunk size)
LOSS_KWARGS: tuple[str, ...] = tuple(dict.fromkeys(n for m in LM_LOSSES for n in hyper_parameters(m))) + ("topk_rest", "chunk_size")


def check_method(method: str) -> None:
    """``method`` must be a key of :data:`LM_LOSSES`."""
    if method not in LM_LOSSES:
        raise ValueError(f"method must be one of {sorted(LM_LOSSES)}, got {method!r}")


def check_loss(method: str, loss_kwargs: dict, options: tuple[str, ...] = ("ce_weight", "topk_rest", "chunk_size")) -> None:
    """``method`` a key of :data:`LM_LOSSES`, ``loss_kwargs`` among its hyper-parameters and ``options``, with values
    the loss accepts — checked by the loss itself on an empty batch, so a bad setting fails before training."""
    check_method(method)
    allowed = hyper_parameters(method) + options
    for name in loss_kwargs:
        if name not in allowed:
            raise ValueError(f"{name} is not an option of method={method!r}; its options are {list(allowed)}")
    empty, head = torch.zeros(0, 1), torch.zeros(2, 1)
    LM_LOSSES[method](empty, head, empty, head, torch.zeros(0, dtype=torch.long), **loss_kwargs)


# config attributes that put something between lm_head(h) and the logits, with their neutral value
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,
    "logit_softcapping": None,
    "logit_scale": 1.0,
    "logits_scaling": 1.0,
    "lm_head_multiplier": 1.0,  # Falcon-H1
    "logits_mup_width_multiplier": 1.0,  # hidden divided by it before the head
    "output_multiplier": 1.0,
}


def _unwrap(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside DDP / DataParallel wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class LMHead(NamedTuple):
    """The LM head the fused losses see: ``logits = hidden @ weight.T + bias``."""

    weight: Tensor
    bias: Tensor | None


def _lora_parts(name: str, head: nn.Module) -> list[tuple[nn.Module, nn.Module, float]] | None:
    """``[(A, B, scaling)]`` of a PEFT LoRA layer wrapping an ``nn.Linear`` head (``None`` if ``head``
    is not one); refuses what the effective weight ``W + s·B·A`` cannot express."""
    base = getattr(head, "base_layer", None)
    if not (isinstance(base, nn.Linear) and hasattr(head, "lora_A") and hasattr(head, "lora_B")):
        return None
    if getattr(head, "disable_adapters", False) or getattr(head, "merged", False):
        return []  # the base layer is the head (adapters off, or already merged into it)
    parts = []
    for a in getattr(head, "active_adapters", []):
        if a not in head.lora_A:
            continue
        if getattr(head, "fan_in_fan_out", False) or len(getattr(head, "lora_magnitude_vector", {}) or {}) or \
                (getattr(head, "lora_bias", {}) or {}).get(a, False):
            raise ValueError(f"{name}'s LoRA LM head uses DoRA, a LoRA bias or fan_in_fan_out: the fused losses take "
                             "W + s·B·A only (plain LoRA)")
        drop = head.lora_dropout[a]
        if head.training and isinstance(drop, nn.Dropout) and drop.p > 0:
            raise ValueError(f"{name}'s LoRA LM head has lora_dropout={drop.p} in training: dropout on the head's input "
                             "is not a weight, so the fused losses cannot apply it; use lora_dropout=0 for lm_head")
        parts.append((head.lora_A[a], head.lora_B[a], float(head.scaling[a])))
    return parts


def _gathered(t: Tensor | None) -> Tensor | None:
    """A parameter as one whole tensor: an FSDP2-sharded ``DTensor`` is all-gathered with
    ``full_tensor()``. Its gradient is each process's own (the loss is over the local batch), so the
    backward reduce-scatters it as a *mean* over the processes (``Partial("avg")``) — the data-parallel
    average FSDP applies to every other parameter. (Plain ``full_tensor()`` would hand each process
    only its local gradient's slice; a data-parallel mesh is assumed, not a tensor-parallel one.)"""
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(t, DTensor):
        return t
    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


def _effective_head(name: str, head: nn.Module, gather: bool = True) -> nn.Linear | LMHead:
    """An ``nn.Linear`` head as it is, or a LoRA head as ``W + Σ_a s_a·B_a A_a`` (gradients reach
    ``A`` and ``B`` through this weight). A head whose parameters FSDP2 left sharded (a separately
    wrapped or resharded ``lm_head``) is gathered whole for the loss, as TRL does under ZeRO-3/FSDP2."""
    parts = _lora_parts(name, head)
    if isinstance(head, nn.Linear) and parts is None:
        if not gather or _gathered(head.weight) is head.weight:
            return head
        return LMHead(_gathered(head.weight), _gathered(head.bias))
    if parts is None:
        raise TypeError(f"{name}'s output embeddings must be an nn.Linear LM head (or a PEFT LoRA layer on one), "
                        f"got {type(head).__name__}")
    if not gather:
        return head
    weight = _gathered(head.base_layer.weight)
    for lora_a, lora_b, scale in parts:
        weight = weight + scale * (_gathered(lora_b.weight) @ _gathered(lora_a.weight))
    return LMHead(weight, _gathered(head.base_layer.bias))


def _check_model(name: str, inner: nn.Module) -> tuple[nn.Module, nn.Module]:
    for attr in ("get_decoder", "get_output_embeddings"):
        if not callable(getattr(inner, attr, None)):
            raise TypeError(f"{name} must be a transformers causal LM (it has no {attr}()), got {type(inner).__name__}")
    head = inner.get_output_embeddings()
    _effective_head(name, head, gather=False)  # a head the fused losses can take (checked, nothing gathered)
    config = getattr(inner, "config", None)
    # multimodal models keep their language model's settings in a sub-config (get_text_config())
    configs = [config] + [getattr(config, sub) for sub in ("text_config", "decoder", "generator") if getattr(config, sub, None) is not None]
    for cfg in configs:
        for attr, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(cfg, attr, neutral)
            if value is not None and value != neutral:
                raise ValueError(
                    f"{name}'s config sets {attr}={value!r}: its logits are not lm_head(hidden), which the fused losses assume"
                )
    return inner.get_decoder(), head


_CAUSAL_CHECKED: weakref.WeakSet = weakref.WeakSet()


def check_causal(name: str, model: nn.Module, input_ids: Tensor) -> None:
    """Refuse a model that sees the future: a masked LM (``BertForMaskedLM``) or a decoder class
    built with ``is_decoder=False`` has ``get_decoder()`` and an LM head, but its hidden state at a
    position changes when only later tokens change — next-token distillation on it leaks the
    targets. Checked once per model with two small forwards in ``eval()`` mode (no dropout)."""
    inner = _unwrap(model)
    if inner in _CAUSAL_CHECKED or input_ids.shape[-1] < 2:
        return
    probe = input_ids[:1, : min(input_ids.shape[-1], 16)]
    later = probe.clone()
    vocab = inner.get_output_embeddings().out_features
    later[0, -1] = (later[0, -1] + 1) % vocab
    was = inner.training
    inner.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, _ = causal_lm_hidden(inner, probe)
            b, _ = causal_lm_hidden(inner, later)
    finally:
        inner.train(was)
    if not torch.allclose(a[:, :-1].float(), b[:, :-1].float(), rtol=1e-4, atol=1e-5):
        hint = " (its config has is_decoder=False)" if getattr(getattr(inner, "config", None), "is_decoder", None) is False else ""
        raise ValueError(
            f"{name} is not a causal LM: its hidden states at earlier positions change when only the last token changes "
            f"— {type(inner).__name__}{hint} sees the future, so next-token distillation would see its targets"
        )
    _CAUSAL_CHECKED.add(inner)


def causal_lm_hidden(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **forward_kwargs
) -> tuple[Tensor, nn.Linear | LMHead]:
    """Final hidden states ``[B, T, H]`` of a causal LM and its LM head (``.weight``, ``.bias``),
    without the full logits.

    ``model`` may be wrapped (DDP, a PEFT model); it is called through its own forward with
    ``logits_to_keep=1`` and ``use_cache=False`` (a PEFT model passes them to its base model);
    extra keyword arguments go to that forward. A LoRA layer on the LM head is returned as its
    effective weight ``W + s·B·A`` (:class:`LMHead`), so the fused loss's gradient reaches ``A`` and ``B``.
    """
    inner = _unwrap(model)
    decoder, head_module = _check_model("model", inner)
    captured: list[Tensor] = []

    def hook(_module, _args, output):
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    kwargs = dict(forward_kwargs)
    base = inner.get_base_model() if callable(getattr(inner, "get_base_model", None)) else inner  # PEFT: the model inside
    params = inspect.signature(base.forward).parameters
    if "logits_to_keep" in params:
        kwargs.setdefault("logits_to_keep", 1)
    else:
        warnings.warn(
            f"{type(base).__name__}.forward has no logits_to_keep: its full logits are computed (and dropped)", stacklevel=2
        )
    if "use_cache" in params:
        kwargs.setdefault("use_cache", False)
    handle = decoder.register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(inner).__name__}.get_decoder() was not called by its forward; cannot capture the hidden states")
    # after the forward: FSDP2 has unsharded what it keeps unsharded; a head it resharded is gathered here
    return captured[-1], _effective_head("model", head_module)


def shift_labels(input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Next-token targets ``[B, T-1]``: ``labels[:, 1:]`` (``input_ids`` when ``labels`` is None),
    with ``ignore_index`` where the label token is padding (``attention_mask == 0``)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    target = labels[:, 1:]
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        target = target.masked_fill(attention_mask[:, 1:] == 0, ignore_index)
    return target


def distillation_loss(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    method: str = "nkd",
    *,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    **loss_kwargs,
) -> Tensor:
    """Token-level distillation loss of ``student`` to ``teacher`` on one batch.

    The teacher runs under ``torch.no_grad()`` (put it in ``eval()`` mode yourself); both models
    must share the vocabulary (their heads may differ in width). ``method`` is ``"nkd"``,
    ``"kd"`` or ``"jsd"``; ``loss_kwargs`` go to the loss (``temperature``, ``gamma``, ``beta``,
    ``ce_weight``, ``chunk_size``...). The result is the mean over the valid next-token positions, or — when
    ``num_items_in_batch`` is given, as ``transformers.Trainer`` passes it — their sum divided by
    it (the Trainer's normalization for gradient accumulation).
    """
    target, reduction = _prepare("distillation_loss", student, method, loss_kwargs, input_ids, attention_mask, labels,
                                 ignore_index, num_items_in_batch)
    loss, _, _ = _pair_loss(student, teacher, input_ids, attention_mask, target, method, reduction, ignore_index, loss_kwargs)
    return _per_item(loss, num_items_in_batch)


def _pair_loss(student: nn.Module, teacher: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, target: Tensor,
               method: str, reduction: str, ignore_index: int, loss_kwargs: dict) -> tuple[Tensor, Tensor, nn.Linear | LMHead]:
    """``LM_LOSSES[method]`` of the student's hidden states ``[:, :-1]`` against the teacher's (run under
    ``no_grad``) for the next-token ``target`` ``[B, T-1]``; returns ``(loss, student hidden [B, T, H], student head)``."""
    _check_model("teacher", _unwrap(teacher))
    check_causal("teacher", teacher, input_ids)
    hidden, head = causal_lm_hidden(student, input_ids, attention_mask)
    with torch.no_grad():
        t_hidden, t_head = causal_lm_hidden(teacher, input_ids, attention_mask)
    loss = LM_LOSSES[method](
        hidden[:, :-1],
        head.weight,
        t_hidden[:, :-1],
        t_head.weight,
        target,
        bias=head.bias,
        teacher_bias=t_head.bias,
        ignore_index=ignore_index,
        reduction=reduction,
        **loss_kwargs,
    )
    return loss, hidden, head


def _prepare(fname: str, student: nn.Module, method: str, loss_kwargs: dict, input_ids: Tensor,
             attention_mask: Tensor | None, labels: Tensor | None, ignore_index: int,
             num_items_in_batch: Tensor | int | None, check_count: bool = True) -> tuple[Tensor, str]:
    """The checks the LM losses share (method, reduction, a causal student, and — with ``check_count`` —
    ``num_items_in_batch`` at least this batch's valid positions) and the next-token targets;
    returns ``(target, reduction)``."""
    check_method(method)
    if "reduction" in loss_kwargs:
        raise ValueError(f"reduction is set by {fname} (mean, or sum / num_items_in_batch)")
    target = shift_labels(input_ids, attention_mask, labels, ignore_index)
    _check_model("student", _unwrap(student))
    check_causal("student", student, input_ids)
    if num_items_in_batch is not None and check_count:
        n_items = int(num_items_in_batch.item() if isinstance(num_items_in_batch, Tensor) else num_items_in_batch)
        valid = int((target != ignore_index).sum())
        if n_items < valid:
            raise ValueError(
                f"num_items_in_batch must count the valid next-token positions of the whole (accumulated) batch, at least "
                f"this batch's {valid}, got {n_items}"
            )
    return target, "mean" if num_items_in_batch is None else "sum"


def _per_item(loss: Tensor, num_items_in_batch: Tensor | int | None) -> Tensor:
    """``sum / num_items_in_batch`` (the Trainer's normalization for gradient accumulation), or the mean as is.
    0 when no position of the whole (accumulated) batch is valid: the sum is 0 then, and 0/0 would be NaN."""
    if num_items_in_batch is None:
        return loss
    n = num_items_in_batch.clamp(min=1) if isinstance(num_items_in_batch, Tensor) else max(num_items_in_batch, 1)
    return loss / n


def topk_distillation_loss(
    student: nn.Module,
    teacher_topk: tuple[Tensor, Tensor],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    method: str = "nkd",
    *,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    **loss_kwargs,
) -> Tensor:
    """As :func:`distillation_loss`, with a sparse teacher: ``teacher_topk = (ids, logprobs)``
    ``[B, T, k]`` per input position (e.g. ``TeacherCache.topk``); position ``i``'s entry is the
    teacher's distribution of token ``i + 1``, so the last position's is unused."""
    ids, lp = teacher_topk
    if ids.shape[:2] != input_ids.shape:
        raise ValueError(f"teacher_topk must be [B, T, k] for input_ids {tuple(input_ids.shape)}, got {tuple(ids.shape)}")
    target, reduction = _prepare("topk_distillation_loss", student, method, loss_kwargs, input_ids, attention_mask, labels,
                                 ignore_index, num_items_in_batch)
    hidden, head = causal_lm_hidden(student, input_ids, attention_mask)
    loss = LM_LOSSES[method](
        hidden[:, :-1], head.weight, target=target, bias=head.bias, teacher_topk=(ids[:, :-1], lp[:, :-1]),
        ignore_index=ignore_index, reduction=reduction, **loss_kwargs,
    )
    return _per_item(loss, num_items_in_batch)


_DISTILLATION_TRAINER_DOC = """\
A ``transformers.Trainer`` whose loss is token-level NKD, KD or JSD (+ ``ce_weight`` · CE).

    ``DistillationTrainer(model=student, args=..., train_dataset=..., teacher=None, cache=None,
    method="nkd", ce_weight=1.0, top_k=None, **loss_kwargs)``. The teacher is exactly one of:

    * ``teacher`` — a live causal LM (frozen, moved to the device, ``eval()``); dense loss on its
      hidden states, or with ``top_k`` its top-k on the fly (what a cache stores);
    * ``cache`` — a :class:`nkd.lm.TeacherCache` (or its path); the examples must carry
      ``cache_index`` (see :func:`nkd.lm.cache_dataset`); no teacher is in memory.

    ``loss_kwargs`` go to the fused loss (``temperature``, ``gamma``, ``beta``, ``topk_rest``, ``chunk_size``).
    With ``log_parts`` (default) every log line also carries the loss parts of its last step's
    batches (NKD: ``loss_target``, ``loss_non_target``, ``loss_ce``; KD: ``loss_kd``, ``loss_ce``;
    JSD: ``loss_jsd``, ``loss_ce``;
    means over valid positions, computed under ``no_grad`` on logging steps only).
    The loss's ``temperature`` is applied to the teacher's log-probabilities, so a cache for
    training is written at ``temperature=1.0`` (another is refused).
"""


def _make_distillation_trainer(Trainer):
    class DistillationTrainer(Trainer):
        __doc__ = _DISTILLATION_TRAINER_DOC

        def __init__(self, *args, teacher=None, cache=None, method="nkd", ce_weight=1.0, top_k=None, log_parts=True, **kwargs):
            loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
            if (teacher is None) == (cache is None):
                raise ValueError("give exactly one of teacher (a live causal LM) or cache (a TeacherCache)")
            check_loss(method, dict(loss_kwargs, ce_weight=ce_weight))
            super().__init__(*args, **kwargs)
            if cache is not None:
                from ..lm import TeacherCache

                cache = cache if isinstance(cache, TeacherCache) else TeacherCache(cache)
                if cache.temperature != 1.0:  # the loss applies its own temperature to the stored log-probabilities
                    raise ValueError(f"cache: written at temperature={cache.temperature}; training needs a cache written at "
                                     "temperature=1.0 (the loss's temperature is applied to its log-probabilities)")
                vocab = _unwrap(self.model).get_output_embeddings().weight.shape[0]
                if vocab != cache.vocab_size:
                    raise ValueError(f"cache: written for V={cache.vocab_size}, the student's head has V={vocab}")
            else:
                teacher = teacher.to(self.args.device).eval().requires_grad_(False)
                _check_model("teacher", _unwrap(teacher))
            self.teacher, self.cache, self.method, self.top_k = teacher, cache, method, top_k
            self.loss_kwargs = dict(loss_kwargs, ce_weight=ce_weight)
            self.log_parts, self._parts = log_parts, {}

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "cache_index" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "cache_index"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
            if self.cache is not None:
                if "cache_index" not in inputs:
                    raise ValueError("training from a cache: every example needs its cache_index (nkd.lm.cache_dataset)")
                t_ids, t_lp = self.cache.topk(inputs["cache_index"].cpu())
                topk = (t_ids.to(ids.device), t_lp.to(ids.device))
            elif self.top_k is not None:
                from ..lm import teacher_topk

                t_ids, t_lp, _ = teacher_topk(self.teacher, ids, self.top_k, mask)  # temperature 1, as a cache for training
                topk = (t_ids, t_lp)
            else:
                topk = None
            if topk is None:
                loss = distillation_loss(model, self.teacher, ids, mask, labels, method=self.method,
                                         num_items_in_batch=num_items_in_batch, **self.loss_kwargs)
            else:
                loss = topk_distillation_loss(model, topk, ids, mask, labels, method=self.method,
                                              num_items_in_batch=num_items_in_batch, **self.loss_kwargs)
            if model.training and self.log_parts and (self.state.global_step + 1) % max(int(self.args.logging_steps), 1) == 0:
                self._record_parts(model, ids, mask, labels, topk)
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does under DDP
            return (loss, {}) if return_outputs else loss

        @torch.no_grad()
        def _record_parts(self, model, ids, mask, labels, topk):
            """The loss parts (mean over valid positions) of this batch, for the next log line:
            NKD: target, non-target, CE; KD: KD, CE. RNG state is left as it was."""
            with torch.random.fork_rng(devices=[]):
                hidden, head = causal_lm_hidden(model, ids, mask)
                target = shift_labels(ids, mask, labels)
                if topk is None:
                    t_hidden, t_head = causal_lm_hidden(self.teacher, ids, mask)
                    teacher = dict(teacher_hidden=t_hidden[:, :-1], teacher_weight=t_head.weight, teacher_bias=t_head.bias)
                else:
                    teacher = dict(teacher_topk=(topk[0][:, :-1], topk[1][:, :-1]))
                kw = {k: v for k, v in self.loss_kwargs.items() if k != "ce_weight"}
                if topk is None:
                    kw.pop("topk_rest", None)
                fn = LM_LOSSES[self.method]

                def f(**extra):
                    return float(fn(hidden[:, :-1], head.weight, target=target, bias=head.bias, **teacher, **{**kw, **extra}))

                distill, with_ce = f(ce_weight=0.0), f(ce_weight=1.0)
                parts = {"loss_ce": with_ce - distill}
                if self.method == "nkd":
                    tgt = f(ce_weight=0.0, gamma=0.0)
                    parts.update(loss_target=tgt, loss_non_target=distill - tgt)
                else:
                    parts[f"loss_{self.method}"] = distill
            for k, v in parts.items():
                self._parts.setdefault(k, []).append(v)

        def log(self, logs, *args, **kwargs):
            if "loss" in logs and self._parts:
                logs = {**logs, **{k: sum(v) / len(v) for k, v in self._parts.items()}}
                self._parts = {}
            return super().log(logs, *args, **kwargs)

    DistillationTrainer.__qualname__ = DistillationTrainer.__name__
    return DistillationTrainer


_LAZY: dict[str, type] = {}


def __getattr__(name: str):
    """``DistillationTrainer`` is built on first access, so that importing this module does not
    import ``transformers``."""
    if name == "DistillationTrainer":
        if name not in _LAZY:
            from transformers import Trainer

            _LAZY[name] = _make_distillation_trainer(Trainer)
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
