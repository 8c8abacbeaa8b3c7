"""Feature- and relation-based baselines: FitNet, AT, RKD and ReviewKD. Objectives (``e`` the
0-based epoch; the losses' formulas are in :mod:`nkd.losses.feature` and ``docs/baselines.md``):

* ``fitnet``: ``w_ce·CE + w_feat·mean((r(s) − t)²)`` on one hint layer (``r`` a trained regressor);
* ``at``: ``w_ce·CE + w_feat·Σ_stages AT(s, t)``;
* ``rkd``: ``w_ce·CE + w_feat·(w_d·RKD-D + w_a·RKD-A)`` on the pooled features;
* ``reviewkd``: ``w_ce·CE + w_feat·min((e+1)/W, 1)·HCL(ABF(s), t)``;
* ``crd``: ``w_ce·CE + w_feat·(NCE(h(v_s, M_t)) + NCE(h(v_t, M_s)))`` with memory banks over the
  training set (the batch's dataset indices come from the data layer: :class:`~nkd.methods.base.Sample`).

Where the features come from: ``student_layers`` / ``teacher_layers`` are lists of feature
references (:class:`nkd.models.hooks.FeatureReader`): ``@stage<i>`` / ``@pooled`` (the model's own
features) or any module path, optionally with ``:input`` — so a feature method runs on the CRD zoo,
timm and torchvision models without editing them. Left unset, each method takes its published
layers. The teacher's features come through ``teacher_outputs``, so one teacher forward serves
every student of a lockstep group; adapters (regressor, ABF) are sized from one probe forward of
each model in eval mode and are trained and checkpointed with the student.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from torch import Tensor, nn

from ..data.contrast import MODES, ContrastSampler
from ..losses.feature import ABF, ConvRegressor, CRDMemory, Embed, at_loss, crd_nce_loss, hcl_loss, hint_loss, rkd_loss
from ..losses.spec import hp, in_range, nonnegative, one_of, positive
from ..models.hooks import FeatureReader, parse_ref, stage_count
from .base import Method, Params, Sample, Setup, boolean, ce, ce_weight, positive_int, register, warmup_epochs
from .teacher import WarmupRamp


def feature_refs(name: str, value: Any) -> None:
    """``None`` or a non-empty list of feature references (``@stage2``, ``@pooled``, ``layer3.1.conv2:input``)."""
    if value is None:
        return
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be null or a non-empty list of feature references such as '@stage2' or "
                         f"'layer3.1.conv2', got {value!r}")
    for v in value:
        if not v.startswith("@"):
            parse_ref(v)


def _layers(role: str) -> Any:
    return hp(None, feature_refs, f"the {role}'s features, as feature references (`@stage<i>`, `@pooled`, a module "
                                  "path, `path:input`); null: the method's published layers")


@dataclasses.dataclass
class FeatureParams(Params):
    ce_weight: float = ce_weight(1.0)
    student_layers: list[str] | None = _layers("student")
    teacher_layers: list[str] | None = _layers("teacher")


def feat_weight(default: float, published: str) -> Any:
    return hp(default, nonnegative, f"w_feat ≥ 0, weight of the feature term ({published})")


class FeatureMethod(Method):
    """``ce_weight·CE + feat_weight·L(adapt(s), t)`` on the features named by the params.

    A subclass sets ``key`` (logged as ``loss_<key>``), ``layers`` (how many features, ``None``: any
    number), :meth:`default_refs`, and optionally :meth:`adapters` / :meth:`adapt` (its trained modules
    and how they map the student's features) and :meth:`term` (the loss).
    """

    teacher_outputs: ClassVar[tuple[str, ...]] = ("logits", "features")  # a marker: needs a teacher
    Params = FeatureParams
    key: ClassVar[str] = "feat"
    layers: ClassVar[int | None] = None
    loss_functions: ClassVar[tuple] = ()  # for the docs' method table

    @classmethod
    def default_refs(cls, model: nn.Module, input_shape: tuple[int, ...], role: str) -> list[str]:
        raise NotImplementedError

    @classmethod
    def refs(cls, params: Params, model: nn.Module, input_shape: tuple[int, ...], role: str) -> list[str]:
        given = getattr(params, f"{role}_layers")
        return list(given) if given is not None else cls.default_refs(model, input_shape, role)

    @classmethod
    def teacher_refs(cls, params, teacher, input_shape):
        return ("logits", *cls.refs(params, teacher, input_shape, "teacher"))

    @classmethod
    def config_problems(cls, params, cfg):
        s, t = params.student_layers, params.teacher_layers
        problems = [f"method.params.{role}_layers: {cls.name} distils exactly {cls.layers} feature(s), got {len(v)}"
                    for role, v in (("student", s), ("teacher", t)) if v is not None and cls.layers and len(v) != cls.layers]
        if s is not None and t is not None and len(s) != len(t):
            problems.append(f"method.params.student_layers: {len(s)} student features but {len(t)} teacher features "
                            "(teacher_layers); they are paired in order")
        return problems + super().config_problems(params, cfg)

    def __init__(self, params: Params, num_classes: int, setup: Setup | None = None):
        super().__init__(params, num_classes, setup)
        if self.setup.teacher is None or not self.setup.input_shape:
            raise ValueError(f"method {self.name!r} reads the teacher's features: build it with "
                             "setup=Setup(input_shape=(C, H, W), teacher=<the teacher model>)")
        self.t_refs = self.refs(params, self.setup.teacher, self.setup.input_shape, "teacher")
        self.teacher_outputs = ("logits", *self.t_refs)
        self.t_shapes = FeatureReader(self.setup.teacher, self.t_refs).shapes(self.setup.input_shape)

    def modules(self, student: nn.Module) -> dict[str, nn.Module]:
        self.s_refs = self.refs(self.p, student, self.setup.input_shape, "student")
        for refs, role in ((self.s_refs, "student"), (self.t_refs, "teacher")):
            if self.layers and len(refs) != self.layers:
                raise ValueError(f"{role}_layers: {self.name} distils exactly {self.layers} feature(s), got {refs}")
        if len(self.s_refs) != len(self.t_refs):
            raise ValueError(f"student_layers {self.s_refs} and teacher_layers {self.t_refs}: they are paired in order "
                             "and must have the same length")
        self.reader = FeatureReader(student, self.s_refs)
        s_shapes = self.reader.shapes(self.setup.input_shape)
        return self.adapters([s_shapes[r] for r in self.s_refs], [self.t_shapes[r] for r in self.t_refs])

    def adapters(self, s_shapes: list, t_shapes: list) -> dict[str, nn.Module]:
        """The method's trained modules, sized from the paired features' shapes (``[N, C, H, W]`` / ``[N, D]``)."""
        return {}

    def adapt(self, parts: nn.Module, feats: list[Tensor]) -> list[Tensor]:
        """The student's features as the loss compares them (inside the trained module's forward, so
        DDP sees the adapters' parameters used)."""
        return feats

    def forward(self, student, parts, x):
        logits, feats = self.reader(x)
        return {"logits": logits, "features": self.adapt(parts, [feats[r] for r in self.s_refs])}

    def term(self, s: list[Tensor], t: list[Tensor], epoch: int) -> Tensor:
        raise NotImplementedError

    def losses(self, out, teacher, target, epoch):
        t = [teacher[r] for r in self.t_refs]
        return {"loss_ce": self.p.ce_weight * ce(out["logits"], target),
                f"loss_{self.key}": self.p.feat_weight * self.term(out["features"], t, epoch)}


def _stages(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """The model's distillation stages, stem first: its ``feature_refs()`` where it defines them
    (MobileNetV2: the ends of the block groups mdistiller uses), else every ``@stage<i>``."""
    refs = getattr(model, "feature_refs", lambda: None)()
    return refs if refs else [f"@stage{i}" for i in range(stage_count(model, input_shape))]


@dataclasses.dataclass
class FitNetParams(FeatureParams):
    feat_weight: float = feat_weight(100.0, "mdistiller's CIFAR-100 setting: 100")


@register("fitnet")
class FitNetMethod(FeatureMethod):
    """FitNet: the student's hint layer, regressed (:class:`~nkd.losses.feature.ConvRegressor`) onto
    the teacher's; default: the third distillation stage counting the stem (mdistiller's
    ``hint_layer=2``; ``@stage2`` for the CIFAR ResNets)."""

    objective = "ce_weight·CE + feat_weight·mean((r(s) − t)²)"
    Params = FitNetParams
    key, layers = "fitnet", 1
    loss_functions = (hint_loss, ConvRegressor)

    @classmethod
    def default_refs(cls, model, input_shape, role):
        return [_stages(model, input_shape)[2]]

    def adapters(self, s_shapes, t_shapes):
        return {"regressor": ConvRegressor(s_shapes[0], t_shapes[0])}

    def adapt(self, parts, feats):
        return [parts.regressor(feats[0])]

    def term(self, s, t, epoch):
        return hint_loss(s[0], t[0])


@dataclasses.dataclass
class ATParams(FeatureParams):
    feat_weight: float = feat_weight(1000.0, "mdistiller's CIFAR-100 setting: 1000")
    p: float = hp(2.0, positive, "p > 0, the power of the attention map mean_c |f|^p (published: 2)")


@register("at")
class ATMethod(FeatureMethod):
    """AT on every stage but the stem (default ``@stage1 … @stage<last>``), pooled to the smaller side."""

    objective = "ce_weight·CE + feat_weight·Σ_stages mean((a(s) − a(t))²)"
    Params = ATParams
    key = "at"
    loss_functions = (at_loss,)

    @classmethod
    def default_refs(cls, model, input_shape, role):
        return _stages(model, input_shape)[1:]

    def term(self, s, t, epoch):
        return at_loss(s, t, self.p.p)


@dataclasses.dataclass
class RKDParams(FeatureParams):
    feat_weight: float = feat_weight(1.0, "mdistiller: 1")
    distance_weight: float = hp(25.0, nonnegative, "w_d ≥ 0, weight of the distance term (published: 25)")
    angle_weight: float = hp(50.0, nonnegative, "w_a ≥ 0, weight of the angle term (published: 50)")
    squared: bool = hp(False, boolean, "use squared distances (published: false)")
    eps: float = hp(1e-12, positive, "ε > 0, the squared distances' lower clamp")


@register("rkd")
class RKDMethod(FeatureMethod):
    """RKD on the pooled pre-logit features (default ``@pooled`` for both)."""

    objective = "ce_weight·CE + feat_weight·(distance_weight·RKD_D + angle_weight·RKD_A)"
    Params = RKDParams
    key, layers = "rkd", 1
    loss_functions = (rkd_loss,)

    @classmethod
    def default_refs(cls, model, input_shape, role):
        return ["@pooled"]

    def term(self, s, t, epoch):
        p = self.p
        return rkd_loss(s[0], t[0], distance_weight=p.distance_weight, angle_weight=p.angle_weight, squared=p.squared,
                        eps=p.eps)


@dataclasses.dataclass
class ReviewKDParams(FeatureParams):
    feat_weight: float = feat_weight(1.0, "mdistiller's default 1; its resnet32x4 → resnet8x4 config: 5")
    warmup_epochs: int = warmup_epochs()
    max_mid_channels: int = hp(512, positive_int, "the ABF's middle width: min(max_mid_channels, C of the deepest student feature)")


def _as_map(f: Tensor) -> Tensor:
    return f[:, :, None, None] if f.ndim == 2 else f


@register("reviewkd")
class ReviewKDMethod(WarmupRamp, FeatureMethod):
    """ReviewKD: every stage but the stem plus the pooled vector (as a 1×1 map), student after its
    activations and teacher before them (``preact_refs`` of the CIFAR ResNets; the activations'
    outputs for models that do not define it), fused deepest-first by :class:`~nkd.losses.feature.ABF`."""

    objective = "ce_weight·CE + feat_weight·min((e+1)/warmup_epochs, 1)·HCL(ABF(s), t)"
    Params = ReviewKDParams
    key, ramp_of = "reviewkd", "ReviewKD"
    loss_functions = (hcl_loss, ABF)

    @classmethod
    def default_refs(cls, model, input_shape, role):
        preact = getattr(model, "preact_refs", lambda: None)() if role == "teacher" else None
        return (preact or _stages(model, input_shape))[1:] + ["@pooled"]

    def adapters(self, s_shapes, t_shapes):
        cs = [s[1] for s in s_shapes]
        mid = min(self.p.max_mid_channels, cs[-1])
        levels = [ABF(c, mid, t[1], fuse=i < len(cs) - 1) for i, (c, t) in enumerate(zip(cs, t_shapes))]
        self.out_sides = [1 if len(t) == 2 else t[-1] for t in t_shapes]
        return {"abfs": nn.ModuleList(levels[::-1])}  # deepest first (mdistiller's order and initialization)

    def adapt(self, parts, feats):
        feats = [_as_map(f) for f in feats][::-1]
        sides = self.out_sides[::-1]
        out, residual = parts.abfs[0](feats[0], None, sides[0])
        results = [out]
        for f, abf, side in zip(feats[1:], parts.abfs[1:], sides[1:]):
            out, residual = abf(f, residual, side)
            results.insert(0, out)
        return results

    def term(self, s, t, epoch):
        return self.ramp(epoch) * hcl_loss(s, [_as_map(x) for x in t])


@dataclasses.dataclass
class CRDParams(FeatureParams):
    feat_weight: float = feat_weight(0.8, "CRD / mdistiller: 0.8")
    feat_dim: int = hp(128, positive_int, "d, the embedding width (published: 128)")
    nce_k: int = hp(16384, positive_int, "K, negatives per sample (published: 16384)")
    nce_t: float = hp(0.07, positive, "τ > 0, the score temperature (published: 0.07)")
    nce_momentum: float = hp(0.5, in_range(0.0, 1.0, False, True), "μ in [0, 1), the memory banks' momentum (published: 0.5)")
    mode: str = hp("exact", one_of(*MODES), "the positive: `exact` the sample itself (published), `relax` a sample of its class")


@register("crd")
class CRDMethod(FeatureMethod):
    """CRD on the pooled features (default ``@pooled`` for both): the student's and the teacher's
    embedding heads are trained with the student; the memory banks (``memory.*`` buffers, one row per
    training sample) are checkpointed with it. Needs each batch's dataset indices (in-memory datasets)."""

    objective = "ce_weight·CE + feat_weight·(NCE(h(v_s, M_t)) + NCE(h(v_t, M_s)))"
    Params = CRDParams
    key, layers = "crd", 1
    needs_index = True
    loss_functions = (crd_nce_loss, CRDMemory, Embed)

    @classmethod
    def default_refs(cls, model, input_shape, role):
        return ["@pooled"]

    @classmethod
    def config_problems(cls, params, cfg):
        problems = []
        if cfg.data.name == "imagenet_folder":
            problems.append("method.name: crd needs each sample's dataset index, which in-memory datasets give "
                            "(cifar10/cifar100/image_folder_small/synthetic/digits), not imagenet_folder")
        if cfg.data.mixup or cfg.data.cutmix:
            problems.append("method.name: crd's memory bank holds one embedding per sample: it cannot train on mixed "
                            "images (set data.mixup and data.cutmix to 0)")
        return problems + super().config_problems(params, cfg)

    def adapters(self, s_shapes, t_shapes):
        labels = self.setup.train_labels
        if labels is None:
            raise ValueError("crd needs the training set's labels: build it with Setup(train_labels=[N] labels)")
        p = self.p
        self.sampler = ContrastSampler(labels, p.nce_k, p.mode)
        self.parts = {"embed_s": Embed(math.prod(s_shapes[0][1:]), p.feat_dim),
                      "embed_t": Embed(math.prod(t_shapes[0][1:]), p.feat_dim),
                      "memory": CRDMemory(p.feat_dim, len(labels), p.nce_t, p.nce_momentum)}
        return self.parts

    def adapt(self, parts, feats):
        return [parts.embed_s(feats[0])]

    def losses(self, out, teacher, target, epoch, sample: Sample | None = None):
        if sample is None:
            raise ValueError("crd: losses(..., sample=Sample(index, seed)) — the batch's dataset indices are required")
        v_s, v_t = out["features"][0], self.parts["embed_t"](teacher[self.t_refs[0]])
        memory = self.parts["memory"]
        h_s, h_t = memory.scores(v_s, v_t, self.sampler.draw(sample.index, sample.seed))
        loss = crd_nce_loss(h_s, memory.num_data) + crd_nce_loss(h_t, memory.num_data)
        memory.update(v_s, v_t, sample.index)
        return {"loss_ce": self.p.ce_weight * ce(out["logits"], target), "loss_crd": self.p.feat_weight * loss}
