r"""Token-level NKD and KD for language models, fused with the LM head and chunked over tokens.

For ``N`` tokens with student hidden states ``h`` ``[N, H]``, LM head ``W`` ``[V, H]`` (bias
``b``), and a teacher, the loss equals :func:`~nkd.losses.nkd_loss` / :func:`~nkd.losses.kd_loss`
on the materialized logits ``z = h Wᵀ + b`` — value and gradients w.r.t. ``h``, ``W``, ``b`` —
but the ``[N, V]`` logits are never held whole. Rows are processed ``chunk_size`` at a time;
for each chunk the per-row loss and its analytic gradient ``G = ∂L/∂z`` ``[chunk, V]`` (already
scaled by the reduction weight) are formed and immediately folded into

.. math::

    \partial L/\partial h_{chunk} = G\,W,\qquad
    \partial L/\partial W \mathrel{+}= G^\top h_{chunk},\qquad
    \partial L/\partial b \mathrel{+}= \textstyle\sum_{rows} G

inside the forward pass; backward only scales these by the incoming scalar gradient. Peak extra
memory is ``O(chunk_size × V)`` plus the gradients themselves (``[N, H]``, ``[V, H]``).

Per row (target ``t``, student logits ``z``, teacher logits ``u``, ``w = ce_weight``):

.. math::

    \mathrm{NKD} = -(T_t + w)\log S_t \;-\; \gamma\lambda^2\sum_{i\ne t}\hat T_i\log\hat S_i,
    \qquad
    \mathrm{KD} = \lambda^2\,\mathrm{KL}(T^\lambda\|S^\lambda) - w\log S_t

(the formulas of :mod:`nkd.losses.nkd` and :mod:`nkd.losses.kd`; the ``w`` term is the student's
cross-entropy with the hard label, computed in the same pass).

Teachers, exactly one of:

* ``teacher_hidden`` ``[..., H_t]`` + ``teacher_weight`` ``[V, H_t]`` (+ ``teacher_bias``): the
  teacher's logits are formed chunk by chunk too (its width ``H_t`` may differ from ``H``);
* ``teacher_logits`` ``[..., V]``: precomputed dense logits (read one chunk at a time);
* ``teacher_topk = (ids, logprobs)`` ``[..., k]``: a sparse teacher, the ``k`` token ids and
  their log-probabilities under the full teacher softmax (what offline teacher caches store).
  With ``m = Σ_{i∈K} p_i`` the stored mass, the teacher is the log-probability vector ``ũ``:

  - ``topk_rest="zero"``: mass outside ``K`` is zero, ``ũ_i = log p_i`` on ``K``, ``−∞`` elsewhere;
    as logits this is the top-k distribution renormalized, ``T_i = p_i / m`` on ``K``;
  - ``topk_rest="uniform"``: the missing mass ``r = 1 − m`` is spread evenly over the ``V − k``
    other tokens, ``ũ_i = log(r / (V − k))`` for ``i ∉ K`` (``r`` is clamped to the smallest
    positive normal number, so a top-k set holding all the mass stays well defined);

  and the dense loss is applied to ``ũ``. For NKD, ``T̂`` renormalizes over the non-target
  tokens, so with ``"zero"`` it is ``p_i / Σ_{j∈K, j≠t} p_j`` on ``K∖{t}``, and ``T_t = 0`` when
  the target is not among the top-k (``"uniform"``: ``T_t = r/(V−k)``). ``"zero"`` needs
  ``k ≥ 2`` for NKD (otherwise ``K∖{t}`` can be empty). Both equal the dense loss when ``k = V``;
  ``"uniform"`` also equals it whenever the teacher's logits are equal outside ``K``.

Teacher tensors are treated as constants: they are detached, whether or not they require grad
(compute the teacher under ``torch.no_grad()`` to avoid keeping its graph).

Precision: logits are formed by the matmul in the inputs' dtype (the autocast dtype under
autocast, as ``F.linear`` would) and the loss maths runs in float32 (float64 stays float64);
``∂L/∂W`` and ``∂L/∂b`` are accumulated over chunks in float32 (float64), and every gradient
comes back in its input's dtype. float16 gradients are held in float32 until backward has applied
the incoming gradient, so a loss scale (``GradScaler``'s 2**16) neither overflows nor underflows
them. The losses are once differentiable: backward with ``create_graph=True`` raises.

Hard integer labels only (``target`` ``[...]``, ``ignore_index`` rows left out of the mean). The
default ``chunk_size`` is ``max(1, min(512, 2**27 // (V·itemsize)))`` rows, ``itemsize`` that of the
matmul dtype: 512 rows, fewer where one ``[chunk, V]`` logits buffer would pass 128 MiB (float32:
512 rows at ``V = 32000``, 261 at ``V = 128256``; bf16: 512 at both). Fewer rows per chunk re-read
both LM heads more often (four matmuls per chunk), which costs more than the memory saved; the loss
maths runs on blocks of ``max(8, 2**20 // V)`` rows of a chunk, whose buffers stay in cache
(``benchmarks/RESULTS.md``, issue 19).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn

from .chunked import TOPK_REST, check_settings, check_topk_rest, default_chunk_size, fused_linear_loss, make_teacher
from .dkd import DKD
from .jsd import JSD
from .kd import KD
from .nkd import NKD
from .spec import LossSpec

__all__ = [
    "fused_linear_nkd_loss",
    "fused_linear_kd_loss",
    "fused_linear_dkd_loss",
    "FusedLinearNKDLoss",
    "FusedLinearKDLoss",
    "FusedLinearDKDLoss",
    "fused_linear_jsd_loss",
    "FusedLinearJSDLoss",
    "fused_forms",
    "TOPK_REST",
    "default_chunk_size",
]

_TEACHER_DOCS = [
    "hidden: student's last hidden states ``[..., H]`` (e.g. ``[B, T, H]``).",
    "weight: student LM head ``[V, H]``.",
    "teacher_hidden, teacher_weight: teacher hidden states ``[..., H_t]`` and head ``[V, H_t]`` (constants: detached).",
    "target: int64 next-token ids ``[...]`` (``ignore_index`` rows left out); required when the loss uses the label "
    "or ``ce_weight > 0``.",
]
_CALL_DOCS = [
    "ce_weight: w ≥ 0, weight of the student's cross-entropy computed in the same pass (default 0).",
    "bias, teacher_bias: optional head biases ``[V]``.",
    "teacher_logits: precomputed teacher logits ``[..., V]`` instead of hidden + head.",
    "teacher_topk: ``(ids, logprobs)`` ``[..., k]``, a sparse teacher; topk_rest: ``\"zero\"`` or ``\"uniform\"``, where "
    "the mass outside the top-k goes.",
    "ignore_index: an int, the label value whose rows are left out (default -100).",
    'reduction: ``"mean"`` over non-ignored rows, ``"sum"``, or ``"none"`` (``[...]``, ignored rows 0; its backward '
    "recomputes the logits chunk by chunk, ≈ 1.5× the time).",
    "chunk_size: rows per chunk; ``None`` → :func:`default_chunk_size`.",
]
_TEACHER_KW = ("bias", "teacher_bias", "teacher_logits", "teacher_topk")


def fused_forms(spec: type[LossSpec], function: str, module: str, **defaults: Any) -> tuple[Any, type[nn.Module]]:
    """The function and ``nn.Module`` that run ``spec`` fused with the LM head (teacher by keywords,
    :func:`~nkd.losses.chunked.make_teacher`), with ``defaults`` replacing the spec's defaults
    (e.g. temperature 1 for token-level KD)."""
    fields = spec.hyper_parameters()
    hyper = {f.name: defaults.get(f.name, f.default) for f in fields}
    P = inspect.Parameter
    params = [P("hidden", P.POSITIONAL_OR_KEYWORD), P("weight", P.POSITIONAL_OR_KEYWORD)]
    params += [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in ("teacher_hidden", "teacher_weight", "target")]
    params += [P(n, P.KEYWORD_ONLY, default=v) for n, v in hyper.items()]
    params += [P("ce_weight", P.KEYWORD_ONLY, default=0.0)] + [P(n, P.KEYWORD_ONLY, default=None) for n in _TEACHER_KW]
    params += [P("topk_rest", P.KEYWORD_ONLY, default="zero"), P("ignore_index", P.KEYWORD_ONLY, default=-100),
               P("reduction", P.KEYWORD_ONLY, default="mean"), P("chunk_size", P.KEYWORD_ONLY, default=None)]
    sig = inspect.Signature(params)

    def loss_fn(*args: Any, **kwargs: Any) -> Tensor:
        a = sig.bind(*args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        teacher = make_teacher(a["teacher_hidden"], a["teacher_weight"], a["teacher_bias"], a["teacher_logits"],
                               a["teacher_topk"], a["topk_rest"])
        return fused_linear_loss(spec(**{n: a[n] for n in hyper}), a["hidden"], a["weight"], teacher, a["target"],
                                 bias=a["bias"], ce_weight=a["ce_weight"], ignore_index=a["ignore_index"],
                                 reduction=a["reduction"], chunk_size=a["chunk_size"])

    hyper_docs = [f"{f.name}: {f.metadata['doc']} (default {hyper[f.name]!r})." for f in fields]
    body = inspect.cleandoc(spec.__doc__ or "")
    loss_fn.__signature__ = sig  # type: ignore[attr-defined]
    loss_fn.__name__ = loss_fn.__qualname__ = function
    loss_fn.__module__ = __name__
    loss_fn.__doc__ = (f"Token-level {spec.title} (+ ``ce_weight``·CE) on ``hidden @ weight.T + bias``, chunked: equals "
                       f"``{spec.function.__name__}`` + ``ce_weight·CE`` on the materialized logits without holding them."
                       f"\n\n{body}\n\nArgs:\n" + "\n".join("    " + d for d in _TEACHER_DOCS + hyper_docs + _CALL_DOCS)
                       + "\n\nReturns:\n    The loss in float32 (float64 for float64 input); 0 when no row is valid.\n")

    init_params = [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.POSITIONAL_OR_KEYWORD, default=v) for n, v in hyper.items()]
    init_params += [P("ce_weight", P.POSITIONAL_OR_KEYWORD, default=0.0), P("topk_rest", P.POSITIONAL_OR_KEYWORD, default="zero"),
                    P("ignore_index", P.POSITIONAL_OR_KEYWORD, default=-100),
                    P("reduction", P.POSITIONAL_OR_KEYWORD, default="mean"),
                    P("chunk_size", P.POSITIONAL_OR_KEYWORD, default=None)]
    init_sig = inspect.Signature(init_params)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        a = init_sig.bind(self, *args, **kwargs)
        a.apply_defaults()
        self.settings = {k: v for k, v in a.arguments.items() if k != "self"}
        st = self.settings  # checked at construction by the same checks its calls run
        check_settings(spec(**{n: st[n] for n in hyper}), st["ce_weight"], st["ignore_index"], st["reduction"],
                       st["chunk_size"])
        check_topk_rest(st["topk_rest"])
        for k, v in self.settings.items():
            setattr(self, k, v)

    def forward(self, hidden, weight, teacher_hidden=None, teacher_weight=None, target=None, **teacher) -> Tensor:
        """The loss of the student (``hidden`` ``[..., H]``, LM head ``weight`` ``[V, H]``) against the
        teacher (``teacher_hidden`` ``[..., H_t]`` + ``teacher_weight`` ``[V, H_t]``, or, in
        ``teacher``, ``teacher_logits`` / ``teacher_topk``; ``bias`` and ``teacher_bias`` go there
        too) for the next-token ids ``target`` ``[...]``."""
        return loss_fn(hidden, weight, teacher_hidden, teacher_weight, target, **self.settings, **teacher)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.settings.items() if k in hyper or k in ("ce_weight", "reduction"))

    __init__.__signature__ = init_sig  # type: ignore[attr-defined]
    doc = (f"Module form of :func:`{function}`: token-level {spec.title} (+ ``ce_weight``·CE) on ``hidden @ weight.T``, "
           f"chunked, with fixed hyper-parameters (no parameters are learned).\n\n{body}\n\nArgs:\n"
           + "\n".join("    " + d for d in hyper_docs + [_CALL_DOCS[0], _CALL_DOCS[3].split("; ")[1]] + _CALL_DOCS[4:]))
    cls = type(module, (nn.Module,), {"__init__": __init__, "forward": forward, "extra_repr": extra_repr,
                                      "__doc__": doc, "__module__": __name__})
    return loss_fn, cls


fused_linear_nkd_loss, FusedLinearNKDLoss = fused_forms(NKD, "fused_linear_nkd_loss", "FusedLinearNKDLoss")
# token-level KD defaults to temperature 1 (forward KL, the usual choice for language models), not kd_loss's 4
fused_linear_kd_loss, FusedLinearKDLoss = fused_forms(KD, "fused_linear_kd_loss", "FusedLinearKDLoss", temperature=1.0)
fused_linear_dkd_loss, FusedLinearDKDLoss = fused_forms(DKD, "fused_linear_dkd_loss", "FusedLinearDKDLoss")
fused_linear_jsd_loss, FusedLinearJSDLoss = fused_forms(JSD, "fused_linear_jsd_loss", "FusedLinearJSDLoss")
