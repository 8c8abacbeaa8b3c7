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
default ``chunk_size`` keeps one ``[chunk, V]`` float32 buffer near 32 MiB:
``max(1, 2**23 // V)`` rows (262 rows at ``V = 32000``, 65 at ``V = 128256``).
"""

from __future__ import annotations

from torch import Tensor, nn

from .chunked import TOPK_REST, default_chunk_size, fused_linear_loss, make_teacher
from .kd import KD
from .nkd import NKD

__all__ = [
    "fused_linear_nkd_loss",
    "fused_linear_kd_loss",
    "FusedLinearNKDLoss",
    "FusedLinearKDLoss",
    "TOPK_REST",
    "default_chunk_size",
]


def fused_linear_nkd_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    target: Tensor | None = None,
    *,
    temperature: float = 1.0,
    gamma: float = 1.5,
    ce_weight: float = 0.0,
    bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    topk_rest: str = "zero",
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Token-level NKD (+ optional cross-entropy) on ``hidden @ weight.T + bias``, chunked.

    Equals ``nkd_loss(z, u, target, temperature=λ, gamma=γ) + ce_weight · CE(z, target)`` on the
    materialized logits ``z`` (module docstring for the maths, the teacher kinds and the
    sparse-teacher definitions) without ever holding ``z`` ``[N, V]`` whole.

    Args:
        hidden: student's last hidden states ``[..., H]`` (e.g. ``[B, T, H]``).
        weight: student LM head ``[V, H]``.
        teacher_hidden, teacher_weight: teacher hidden states ``[..., H_t]`` and head ``[V, H_t]``.
        target: int64 next-token ids ``[...]`` (required; ``ignore_index`` rows left out).
        temperature: λ > 0 of the non-target term.  gamma: γ ≥ 0.  ce_weight: w ≥ 0.
        bias, teacher_bias: optional head biases ``[V]``.
        teacher_logits: precomputed teacher logits ``[..., V]`` instead of hidden + head.
        teacher_topk: ``(ids, logprobs)`` ``[..., k]``, a sparse teacher; ``topk_rest`` in
            ``{"zero", "uniform"}`` says where the mass outside the top-k goes (``k ≥ 2``).
        ignore_index: label value whose rows are left out.
        reduction: ``"mean"`` over non-ignored rows, ``"sum"``, or ``"none"`` (``[...]``, ignored
            rows 0; its backward recomputes the logits chunk by chunk, ≈ 1.5× the time).
        chunk_size: rows per chunk; ``None`` → :func:`default_chunk_size`.

    Returns:
        The loss in float32 (float64 for float64 input); 0 when no row is valid.
    """
    spec = NKD(temperature=temperature, gamma=gamma)
    teacher = make_teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk, topk_rest)
    return fused_linear_loss(spec, hidden, weight, teacher, target, bias=bias, ce_weight=ce_weight,
                             ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)


def fused_linear_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    target: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    topk_rest: str = "zero",
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Token-level KD ``λ²·KL(T^λ ‖ S^λ)`` (+ optional cross-entropy) on ``hidden @ weight.T + bias``, chunked.

    Equals ``kd_loss(z, u, target, temperature=λ) + ce_weight · CE(z, target)`` on the
    materialized logits. ``target`` is optional: KD uses it only to leave out ``ignore_index``
    rows (and for the cross-entropy, which needs it). The default temperature is 1 (forward KL,
    the usual choice for language models), not :func:`~nkd.losses.kd_loss`'s 4.

    Per token with teacher/student softmax ``T^λ``/``S^λ`` at temperature λ and ``w = ce_weight``::

        L = λ²·Σ_i T^λ_i (log T^λ_i − log S^λ_i) − w·log S_t,   ∂L/∂z = λ(S^λ − T^λ) + w(S − e_t)

    Args:
        hidden: student's last hidden states ``[..., H]``.  weight: student LM head ``[V, H]``.
        teacher_hidden, teacher_weight: teacher hidden states ``[..., H_t]`` and head ``[V, H_t]``
            (constants: detached).
        target: int64 next-token ids ``[...]``; optional unless ``ce_weight > 0``; ``ignore_index``
            rows are left out.
        temperature: λ > 0 (default 1.0).  ce_weight: w ≥ 0 (default 0: KD alone).
        bias, teacher_bias: optional head biases ``[V]``.
        teacher_logits: precomputed teacher logits ``[..., V]`` instead of hidden + head.
        teacher_topk: ``(ids, logprobs)`` ``[..., k]``, a sparse teacher; ``topk_rest`` in
            ``{"zero", "uniform"}`` says where the mass outside the top-k goes (any ``k ≥ 1``).
        ignore_index: label value whose rows are left out.
        reduction: ``"mean"`` over non-ignored rows, ``"sum"``, or ``"none"`` (``[...]``).
        chunk_size: rows per chunk; ``None`` → :func:`default_chunk_size`.

    Returns:
        The loss in float32 (float64 for float64 input); 0 when no row is valid.
    """
    spec = KD(temperature=temperature)
    teacher = make_teacher(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_topk, topk_rest)
    return fused_linear_loss(spec, hidden, weight, teacher, target, bias=bias, ce_weight=ce_weight,
                             ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size)



class FusedLinearNKDLoss(nn.Module):
    """Module form of :func:`fused_linear_nkd_loss`: token-level ``NKD + w·CE`` on
    ``hidden @ weight.T``, chunked, with fixed hyper-parameters (no parameters are learned).

    Per token: ``−(T_t + w)·log S_t − γλ²·Σ_{i≠t} T̂_i log Ŝ_i``.

    Args:
        temperature: λ > 0 of the non-target term (default 1.0).
        gamma: γ ≥ 0, weight of the non-target term (default 1.5).
        ce_weight: w ≥ 0, weight of the student's cross-entropy computed in the same pass
            (default 0; NKD's usual objective is ``ce_weight=1.0``).
        topk_rest: ``"zero"`` or ``"uniform"``: the mass outside a sparse top-k teacher.
        ignore_index: label value whose rows are left out (default -100).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        chunk_size: rows per chunk; ``None`` → :func:`default_chunk_size`.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        gamma: float = 1.5,
        ce_weight: float = 0.0,
        topk_rest: str = "zero",
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ):
        super().__init__()
        _check_module(NKD(temperature=temperature, gamma=gamma), ce_weight, topk_rest, ignore_index, reduction, chunk_size)
        self.temperature, self.gamma, self.ce_weight = float(temperature), float(gamma), float(ce_weight)
        self.topk_rest, self.ignore_index, self.reduction, self.chunk_size = topk_rest, ignore_index, reduction, chunk_size

    def forward(self, hidden, weight, teacher_hidden=None, teacher_weight=None, target=None, **teacher) -> Tensor:
        """The loss of the student (``hidden`` ``[..., H]``, LM head ``weight`` ``[V, H]``) against the
        teacher (``teacher_hidden`` ``[..., H_t]`` + ``teacher_weight`` ``[V, H_t]``, or, in
        ``teacher``, ``teacher_logits`` / ``teacher_topk``; ``bias`` and ``teacher_bias`` go there
        too) for the next-token ids ``target`` ``[...]``."""
        return fused_linear_nkd_loss(
            hidden, weight, teacher_hidden, teacher_weight, target, temperature=self.temperature, gamma=self.gamma,
            ce_weight=self.ce_weight, topk_rest=self.topk_rest, ignore_index=self.ignore_index,
            reduction=self.reduction, chunk_size=self.chunk_size, **teacher,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}, ce_weight={self.ce_weight}, reduction={self.reduction!r}"


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`fused_linear_kd_loss`: token-level ``λ²·KL(T^λ ‖ S^λ) + w·CE`` on
    ``hidden @ weight.T``, chunked, with fixed hyper-parameters (no parameters are learned).

    Args:
        temperature: λ > 0 (default 1.0, forward KL).
        ce_weight: w ≥ 0, weight of the student's cross-entropy computed in the same pass (default 0).
        topk_rest: ``"zero"`` or ``"uniform"``: the mass outside a sparse top-k teacher.
        ignore_index: label value whose rows are left out (default -100).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``.
        chunk_size: rows per chunk; ``None`` → :func:`default_chunk_size`.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        topk_rest: str = "zero",
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ):
        super().__init__()
        _check_module(KD(temperature=temperature), ce_weight, topk_rest, ignore_index, reduction, chunk_size)
        self.temperature, self.ce_weight = float(temperature), float(ce_weight)
        self.topk_rest, self.ignore_index, self.reduction, self.chunk_size = topk_rest, ignore_index, reduction, chunk_size

    def forward(self, hidden, weight, teacher_hidden=None, teacher_weight=None, target=None, **teacher) -> Tensor:
        """The loss of the student (``hidden`` ``[..., H]``, LM head ``weight`` ``[V, H]``) against the
        teacher (``teacher_hidden`` ``[..., H_t]`` + ``teacher_weight`` ``[V, H_t]``, or, in
        ``teacher``, ``teacher_logits`` / ``teacher_topk``; ``bias`` and ``teacher_bias`` go there
        too) for the next-token ids ``target`` ``[...]``."""
        return fused_linear_kd_loss(
            hidden, weight, teacher_hidden, teacher_weight, target, temperature=self.temperature,
            ce_weight=self.ce_weight, topk_rest=self.topk_rest, ignore_index=self.ignore_index,
            reduction=self.reduction, chunk_size=self.chunk_size, **teacher,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, ce_weight={self.ce_weight}, reduction={self.reduction!r}"



def _check_module(spec, ce_weight: float, topk_rest: str, ignore_index: int, reduction: str, chunk_size: int | None) -> None:
    """A fused module's settings, checked at construction by the same checks its calls run."""
    from . import _common, chunked
    from .spec import common_checks

    _common.check_nonnegative("ce_weight", ce_weight)
    if topk_rest not in TOPK_REST:
        raise ValueError(f"topk_rest must be one of {TOPK_REST}, got {topk_rest!r}")
    common_checks(spec, reduction, ignore_index)
    chunked._check_chunk_size(chunk_size)
