"""Typed experiment configuration: dataclasses + YAML + ``key=value`` overrides.

One experiment per YAML file. Unknown or misspelled keys, wrong types, non-finite or
out-of-range values, unknown models or model arguments, bad method parameters and settings
that contradict each other are collected into one :class:`ConfigError` that lists every
problem with its dotted path, before anything is created. Method hyper-parameters live under
``method.params`` and are checked by the chosen method's own parameter dataclass
(:mod:`nkd.methods`); the loaded config holds them resolved (defaults filled in), so a run's
``config.yaml`` says exactly what ran. Every key is documented in ``docs/config.md``
(generated from these dataclasses by :func:`config_reference`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from .data.facts import DATASET_NAMES, DATASETS
from .methods import validate_method
from .typed import ConfigError, DuplicateKeyError, build_dataclass, describe, first_line, load_yaml

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "MethodConfig", "OptimConfig", "ScheduleConfig",
           "TrainConfig", "load_config", "dump_config", "config_reference", "RUN_KEYS_SAFE_TO_CHANGE"]


def opt(default: Any, doc: str, *, factory: bool = False, shared: bool | None = None, resume_safe: bool = False) -> Any:
    """A config field with its documentation (the config reference is generated from it) and two
    properties, declared here and nowhere else:

    * ``shared``: must agree between the students of a lockstep group (they share the batches and
      the teacher's output); ``None`` takes the section's ``LOCKSTEP_SHARED`` (a section whose
      ``LOCKSTEP_SHARED`` is ``None`` makes every field declare it);
    * ``resume_safe``: may change between a run and its ``--resume`` without changing what is
      trained (paths, logging, speed settings); every other key is refused unless ``--allow-changes``.
    """
    meta = {"doc": doc, "shared": shared, "resume_safe": resume_safe}
    if factory:
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)




@dataclass
class DataConfig:
    """Dataset, batching and augmentation."""

    LOCKSTEP_SHARED: ClassVar[bool | None] = True  # a group shares one data pipeline

    name: Literal[DATASET_NAMES] = opt(
        "cifar100", "dataset kind: `cifar100`/`cifar10` (the official python archives), `image_folder_small` "
        "(`root/{train,test}/<class>/<image>`, decoded once into memory, CIFAR-style augmentation), "
        "`imagenet_folder` (`root/{train,val}/<class>/<image>` read by worker processes, ImageNet augmentation), "
        "`synthetic` (random learnable images, for tests), `digits` (scikit-learn's 8×8 digits)")
    root: str | None = opt(None, "dataset folder (CIFAR: where `cifar-100-python/` lies or is downloaded to; "
                                 "default `data`)", resume_safe=True)
    batch_size: int = opt(64, "training batch size per process")
    global_batch_size: int | None = opt(None, "if set, the batch size summed over all processes: each process "
                                              "takes `global_batch_size / world_size` (keeps a recipe's batch "
                                              "whatever the GPU count)")
    eval_batch_size: int = opt(256, "evaluation batch size per process", resume_safe=True)
    num_workers: int = opt(4, "loader worker processes (`imagenet_folder` only)", resume_safe=True)
    image_size: int | None = opt(None, "image side in pixels. `image_folder_small`: every image is resized to "
                                       "image_size×image_size when decoded (Pillow bilinear, antialiased; aspect not "
                                       "kept; null: keep the images' own size, which must then be equal), then "
                                       "random-cropped with `crop_padding` and flipped; `imagenet_folder`: the "
                                       "RandomResizedCrop / centre-crop size (null: 224); `synthetic`: the side "
                                       "(null: 32). CIFAR (32) and digits (8) are not resized: setting another size "
                                       "there is an error")
    drop_last: bool = opt(True, "drop each epoch's last partial training batch. nkd's default keeps every step's "
                                "batch full (one BatchNorm batch size, equal steps on every process); the CRD / "
                                "mdistiller / torchdistill CIFAR pipelines keep it (`false`: ⌈N/B⌉ steps per epoch, "
                                "the last one smaller; under DDP it is kept when every process gets an image of it)")
    crop_padding: int = opt(4, "random-crop zero padding in pixels (small-image datasets; 0 disables the crop)")
    flip: bool = opt(True, "random horizontal flip (small-image datasets)")
    train_subset: int | None = opt(None, "train on a random subset of this many training images "
                                         "(drawn with `subset_seed`)")
    subset_seed: int = opt(0, "seed of the `train_subset` draw (fixed across runs of different seeds)")
    randaugment: bool = opt(False, "`imagenet_folder`: torchvision RandAugment (2 ops, magnitude 9)")
    mixup: float = opt(0.0, "MixUp alpha (0: off); labels become soft `[N, C]`")
    cutmix: float = opt(0.0, "CutMix alpha (0: off); with both on, one of the two per batch (p = 0.5)")
    label_smoothing: float = opt(0.0, "smooth the (mixed) labels: `y·(1−ε) + ε/C`")
    download: bool = opt(False, "CIFAR: download the archive (checksummed) when it is missing", resume_safe=True)
    verify_checksums: bool = opt(True, "CIFAR: check the files against the official md5 sums", resume_safe=True)
    cache_dir: str | None = opt(None, "where decoded image folders are cached (default `$NKD_CACHE_DIR` or "
                                      "`~/.cache/nkd`)", resume_safe=True)
    synthetic_samples: int = opt(512, "`synthetic`: number of training images (test split: a quarter)")
    synthetic_classes: int = opt(10, "`synthetic`: number of classes")
    synthetic_seed: int = opt(0, "`synthetic`: seed of the class patterns and samples")
    mean: list[float] | None = opt(None, "per-channel RGB mean on the 0–1 scale, x ↦ (x/255 − mean)/std (null: "
                                         "the known statistics of CIFAR-10/100, ImageNet, digits and synthetic; "
                                         "`image_folder_small` computes it from its decoded training split, cached "
                                         "with the decode and logged)")
    std: list[float] | None = opt(None, "per-channel RGB std, 3 positive values (null: as for `mean`)")


@dataclass
class ModelConfig:
    """A network: the student (`model`) or the frozen teacher (`teacher`)."""

    LOCKSTEP_SHARED: ClassVar[bool | None] = False

    name: str = opt("resnet8x4", "a zoo name (`resnet8 … resnet110`, `resnet8x4`, `resnet32x4`, `wrn_16_1 … "
                                 "wrn_40_2`, `vgg8 … vgg19`, `mobilenetv2`, `shufflev1`, `shufflev2`, `resnet50`, "
                                 "`resnet18_cifar`, `resnet34_cifar`), `timm/<name>` or `tv/<name>`")
    num_classes: int = opt(100, "number of classes (must match the dataset and the teacher)")
    checkpoint: str | None = opt(None, "weights to load (a bare state_dict or one under `model`/`state_dict`/"
                                       "`student`, nkd checkpoints included); required for a teacher in practice")
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "doc": "extra constructor arguments, e.g. timm's `drop_path_rate`; checked against the model"})


@dataclass
class MethodConfig:
    """The training objective."""

    LOCKSTEP_SHARED: ClassVar[bool | None] = False

    name: str = opt("ce", "`ce`, `kd`, `dkd`, `nkd`, `uskd`, `ls`, `zipf_ls`, `tfkd` (see docs/methods.md)")
    params: dict[str, Any] = field(default_factory=dict, metadata={
        "doc": "the method's hyper-parameters (table below); a run's config.yaml lists them all, defaults included"})


@dataclass
class OptimConfig:
    """Optimizer."""

    LOCKSTEP_SHARED: ClassVar[bool | None] = False

    name: Literal["sgd", "adamw"] = opt("sgd", "`sgd` (momentum) or `adamw`")
    lr: float = opt(0.05, "base learning rate (the schedule scales it)")
    momentum: float = opt(0.9, "SGD momentum, in [0, 1)")
    nesterov: bool = opt(False, "SGD Nesterov momentum")
    weight_decay: float = opt(5e-4, "weight decay (decoupled for AdamW)")
    no_decay_norm_bias: bool = opt(False, "no weight decay on biases and 1-D (normalization) weights")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas", factory=True)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, a pure function of the (fractional) epoch."""

    LOCKSTEP_SHARED: ClassVar[bool | None] = False

    name: Literal["multistep", "cosine", "exponential", "linear", "constant"] = opt(
        "multistep", "`multistep` (×gamma at each milestone), `cosine` (to `min_lr`), `exponential` "
        "(×gamma per epoch), `linear` (to `min_lr`), `constant`")
    epochs: int = opt(240, "number of training epochs", shared=True)
    milestones: list[int] = opt([150, 180, 210], "`multistep`: epochs at which the lr is multiplied by gamma "
                                                  "(each must be ≤ epochs)", factory=True)
    gamma: float = opt(0.1, "`multistep`/`exponential` decay factor")
    warmup_epochs: float = opt(0.0, "linear warm-up length in epochs (per step; fractions allowed)")
    warmup_start_factor: float = opt(0.001, "warm-up starts at this fraction of the lr")
    min_lr: float = opt(0.0, "`cosine`/`linear`: final lr")


@dataclass
class TrainConfig:
    """The training loop."""

    LOCKSTEP_SHARED: ClassVar[bool | None] = None  # mixed: every field says

    device: str = opt("auto", "`auto` (CUDA if available), `cuda`, `cpu`", shared=True, resume_safe=True)
    threads: int | None = opt(None, "CPU threads for this process (default: torch's choice, normally all "
                                    "cores; also set by `OMP_NUM_THREADS`). Bitwise reproducibility on the CPU "
                                    "needs the same thread count", shared=True, resume_safe=True)
    amp: Literal["none", "bf16", "fp16"] = opt("none", "mixed precision (losses always compute in float32)", shared=True)
    channels_last: bool = opt(False, "channels-last memory format (faster convolutions on recent GPUs)", shared=True)
    sync_bn: bool = opt(False, "under torchrun: BatchNorm statistics over the global batch "
                               "(torch's SyncBatchNorm on CUDA, nkd's own on CPU/gloo)", shared=True)
    compile: bool = opt(False, "torch.compile the student and the teacher", shared=True, resume_safe=True)
    compile_mode: str = opt("default", "torch.compile mode: `default`, `reduce-overhead` (CUDA graphs), "
                                       "`max-autotune`, `max-autotune-no-cudagraphs`", shared=True, resume_safe=True)
    log_every: int = opt(50, "steps between progress lines/TensorBoard step scalars, non-finite checks "
                             "(policy `stop`) and, under torchrun, stop-signal agreement", shared=True, resume_safe=True)
    grad_clip: float | None = opt(None, "clip the gradient norm to this value (null: no clipping)", shared=False)
    ema_decay: float | None = opt(None, "keep an exponential moving average of the student's weights with this "
                                        "decay, in (0, 1), evaluated each epoch as `ema_top1` (null: off)", shared=False)
    eval_every: int = opt(1, "evaluate every N epochs (and always after the last)", shared=False, resume_safe=True)
    nan_policy: Literal["stop", "skip"] = opt("stop", "a non-finite loss or gradient: `stop` the run (exit 1, "
                                                      "last good checkpoint kept) or `skip` the step", shared=False)
    max_steps_per_epoch: int | None = opt(None, "cap the steps per epoch (quick trials)", shared=True)
    checkpoint_every_steps: int = opt(0, "also write last.pt every N steps inside an epoch, so --resume continues "
                                         "from there (0: at epoch ends only)", shared=True, resume_safe=True)
    deterministic: bool = opt(False, "torch.use_deterministic_algorithms (GPU; slower)", shared=True)
    progress: bool = opt(True, "progress bar when stdout is a terminal (otherwise a plain line every log_every "
                               "steps)", shared=False, resume_safe=True)
    console: bool = opt(True, "log lines on stdout (train.log is always written)", shared=False, resume_safe=True)
    tensorboard: bool = opt(True, "TensorBoard event files in `output_dir/tb`", shared=False, resume_safe=True)


@dataclass
class Config:
    """One experiment."""

    LOCKSTEP_SHARED: ClassVar[bool | None] = None

    seed: int = opt(0, "seeds everything: initialization, data order, augmentation", shared=True)
    output_dir: str = opt("runs/default", "the run directory (checkpoints, metrics, logs)", shared=False, resume_safe=True)
    label: str | None = opt(None, "free-text name of the run shown by `nkd report` (e.g. `kd, CE weight 1.0 "
                                  "(control)`); runs with the same label and settings are seeds of one row", shared=False, resume_safe=True)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = field(default=None, metadata={
        "doc": "the frozen teacher (required by the distillation methods kd, dkd, nkd, dist, kd_zscore, dkd_zscore)"})
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- loading
def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([f"override {item!r}: expected key=value (e.g. optim.lr=0.1)"])
    key, raw = item.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError([f"override {item!r}: the value is not valid YAML ({e})"]) from e
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


#: seeds are used modulo 2**32 in places (NumPy): larger ones would repeat smaller ones' runs
SEED_MAX = 2**32 - 1


def check_seeds(cfg: Config, problems: list[str]) -> None:
    """Every seed within ``[0, SEED_MAX]``: NumPy takes seeds modulo 2**32 and torch at most 64
    bits, so ``seed=4294967296`` would silently train ``seed=0``'s run again."""
    for path, value in (("seed", cfg.seed), ("data.subset_seed", cfg.data.subset_seed),
                        ("data.synthetic_seed", cfg.data.synthetic_seed)):
        if isinstance(value, int) and not 0 <= value <= SEED_MAX:
            problems.append(f"{path}: must lie in [0, {SEED_MAX}] (2**32 − 1: larger seeds would repeat a smaller "
                            f"one's run), got {value}")


def check_ranges(cfg: Config, problems: list[str]) -> None:
    """Value ranges and settings that contradict each other (on the fields that parsed)."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    o, sch, d, t = cfg.optim, cfg.schedule, cfg.data, cfg.train
    check_seeds(cfg, problems)
    need(o.lr > 0, f"optim.lr: must be > 0, got {o.lr}")
    need(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    need(0 <= o.momentum < 1, f"optim.momentum: must lie in [0, 1), got {o.momentum}")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas: two numbers in [0, 1), got {o.betas}")
    need(sch.epochs >= 1, f"schedule.epochs: must be >= 1, got {sch.epochs}")
    need(sch.warmup_epochs >= 0, f"schedule.warmup_epochs: must be >= 0, got {sch.warmup_epochs}")
    need(sch.warmup_epochs <= sch.epochs, f"schedule.warmup_epochs: the warm-up ({sch.warmup_epochs} epochs) is "
                                          f"longer than the run (schedule.epochs={sch.epochs})")
    late = [m for m in sch.milestones if m > sch.epochs]
    need(sch.name != "multistep" or not late,
         f"schedule.milestones: {late} lie beyond the last epoch (schedule.epochs={sch.epochs}), so the lr would never "
         f"drop there; set schedule.milestones for a {sch.epochs}-epoch run")
    need(d.batch_size >= 1, f"data.batch_size: must be >= 1, got {d.batch_size}")
    need(d.global_batch_size is None or d.global_batch_size >= 1,
         f"data.global_batch_size: must be >= 1 or null, got {d.global_batch_size}")
    need(d.eval_batch_size >= 1, f"data.eval_batch_size: must be >= 1, got {d.eval_batch_size}")
    need(d.image_size is None or d.image_size >= 1, f"data.image_size: must be >= 1 or null, got {d.image_size}")
    need(d.train_subset is None or d.train_subset >= 1, f"data.train_subset: must be >= 1 or null, got {d.train_subset}")
    need(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")
    need(d.mixup >= 0 and d.cutmix >= 0, "data.mixup / data.cutmix: must be >= 0")
    need(0 <= d.label_smoothing < 1, f"data.label_smoothing: must lie in [0, 1), got {d.label_smoothing}")
    need(d.crop_padding >= 0, f"data.crop_padding: must be >= 0, got {d.crop_padding}")
    for key in ("mean", "std"):
        v = getattr(d, key)
        need(v is None or len(v) == 3, f"data.{key}: three per-channel values (RGB), got {v}")
    need(d.std is None or all(x > 0 for x in d.std), f"data.std: must be > 0, got {d.std}")
    need(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip: must be > 0 or null")
    need(t.log_every >= 1, f"train.log_every: must be >= 1, got {t.log_every}")
    need(t.eval_every >= 1, f"train.eval_every: must be >= 1, got {t.eval_every}")
    need(t.threads is None or t.threads >= 1, f"train.threads: must be >= 1 or null, got {t.threads}")
    need(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1,
         f"train.max_steps_per_epoch: must be >= 1 or null, got {t.max_steps_per_epoch}")
    need(t.checkpoint_every_steps >= 0,
         f"train.checkpoint_every_steps: must be >= 0 (0 = at epoch ends only), got {t.checkpoint_every_steps}")
    need(t.compile_mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
         f"train.compile_mode: unknown mode {t.compile_mode!r}")
    need(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay: must lie in (0, 1) or null")
    need(cfg.model.num_classes >= 2, f"model.num_classes: must be >= 2, got {cfg.model.num_classes}")
    if cfg.teacher is not None:
        need(cfg.teacher.num_classes == cfg.model.num_classes,
             f"teacher.num_classes: {cfg.teacher.num_classes} differs from model.num_classes {cfg.model.num_classes}")


def check_dataset(cfg: Config, problems: list[str]) -> None:
    """Settings against the dataset: ``data.image_size`` where images are not resized, and
    ``model.num_classes`` against the class count, known without decoding (image folders: their
    class sub-folders are counted)."""
    from .data.build import dataset_num_classes

    d = cfg.data
    native = DATASETS[d.name].native_size
    if native is not None and d.image_size not in (None, native):
        problems.append(f"data.image_size: {d.name} images are {native}×{native} and are not resized; remove "
                        f"data.image_size (got {d.image_size})")
    known = dataset_num_classes(d)
    if known is not None and cfg.model.num_classes != known:
        what = {"synthetic": "data.synthetic_classes"}.get(d.name, f"{d.name} at {d.root}" if d.root else d.name)
        problems.append(f"model.num_classes: {cfg.model.num_classes} does not match the dataset's {known} classes "
                        f"({what})")


def check_model(mc: ModelConfig, path: str, problems: list[str]) -> None:
    """Build the model on the ``meta`` device (no memory, no weights): an unknown name or a
    constructor argument the model does not take is a config problem, not a crash later."""
    import torch

    from .models import create_model

    try:
        with torch.device("meta"):
            create_model(mc.name, mc.num_classes, **mc.kwargs)
    except ImportError as e:
        problems.append(f"{path}.name: {mc.name!r} needs a package that is not installed ({e})")
    except (TypeError, ValueError, RuntimeError, KeyError, AssertionError) as e:
        text = first_line(e).strip("\"'")
        key = "kwargs" if mc.kwargs and isinstance(e, TypeError) else "name"
        problems.append(f"{path}.{key}: cannot build {mc.name!r}{f' with {mc.kwargs}' if mc.kwargs else ''}: {text}")


def check_paths(cfg: Config, problems: list[str]) -> None:
    if cfg.teacher is not None and cfg.teacher.checkpoint and not Path(cfg.teacher.checkpoint).is_file():
        problems.append(f"teacher.checkpoint: file not found: {cfg.teacher.checkpoint}")
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        problems.append(f"model.checkpoint: file not found: {cfg.model.checkpoint}")
    facts = DATASETS[cfg.data.name]
    if facts.needs_root and cfg.data.root and not Path(cfg.data.root).exists() and not cfg.data.download:
        problems.append(f"data.root: path not found: {cfg.data.root}")
    if facts.folder and not cfg.data.root:
        problems.append(f"data.root: required for data.name={cfg.data.name!r}")


def read_yaml_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{p}: not UTF-8 text (byte {e.start}: {e.reason}); save the config as UTF-8"]) from e
    try:
        data = load_yaml(text) or {}
    except DuplicateKeyError as e:
        raise ConfigError([f"{p}: {e}"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"{p}: not valid YAML: {e}"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: expected a mapping of config sections, got {type(data).__name__}"])
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = False) -> Config:
    """Read YAML (or start from defaults), apply ``key=value`` overrides, validate everything,
    and return the config with the method's parameters resolved (defaults filled in).

    ``check_files=True`` also checks that checkpoints and dataset paths exist.
    """
    data = read_yaml_file(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    problems: list[str] = []
    cfg = build_dataclass(Config, data, "", problems)
    check_ranges(cfg, problems)  # on the fields that parsed (defaults stand in for broken ones)
    name_ok = not any(p.startswith("data.name:") for p in problems)
    if name_ok:  # a wrong data.name is the problem; checks against the dataset would only follow from it
        check_dataset(cfg, problems)
    params = validate_method(cfg, problems)
    if params is not None:
        cfg.method.params = asdict(params)
    for mc, where in ((cfg.model, "model"), (cfg.teacher, "teacher")):
        if mc is not None and not any(p.startswith(f"{where}.") for p in problems):
            check_model(mc, where, problems)
    if check_files:
        check_paths(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- resuming
def field_keys(prop: str, root: type | None = None) -> tuple[str, ...]:
    """The dotted keys of the config's leaf fields whose property ``prop`` (``"shared"`` or
    ``"resume_safe"``, see :func:`opt`) is true. Raises when a field of a section without a
    ``LOCKSTEP_SHARED`` default does not declare ``shared`` (so a new field is never silently
    allowed to differ inside a lockstep group)."""
    out: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            if cls is top and f.name == "teacher":  # a group's teacher is compared as a whole (trainer)
                continue
            if prop == "shared":
                value = f.metadata.get("shared")
                if value is None:
                    value = cls.LOCKSTEP_SHARED
                if value is None:
                    raise TypeError(f"config field {prefix}{f.name} must declare shared=True/False: section "
                                    f"{cls.__name__} has no LOCKSTEP_SHARED default")
            else:
                value = f.metadata.get(prop, False)
            if value:
                out.append(f"{prefix}{f.name}")

    top = Config if root is None else root
    walk(top, "")
    return tuple(out)


#: keys that must agree between the students of a lockstep group (declared on the fields)
LOCKSTEP_SHARED_KEYS = field_keys("shared")
#: keys that may change between a run and its ``--resume`` without altering what is trained (declared on the fields)
RUN_KEYS_SAFE_TO_CHANGE = field_keys("resume_safe")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists and scalars are leaves)."""
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ between two config dicts (``{key: (old, new)}``), leaving out
    :data:`RUN_KEYS_SAFE_TO_CHANGE`."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not any(k == s or k.startswith(s + ".") for s in RUN_KEYS_SAFE_TO_CHANGE)}


# ----------------------------------------------------------------------------- reference
def config_reference() -> str:
    """Markdown reference of every key: dotted path, type, default, meaning (docs/config.md)."""
    from .methods import METHODS

    lines = ["# Configuration reference", "",
             "Generated from the dataclasses in `src/nkd/config.py` and `src/nkd/methods/` by "
             "`python -m nkd.config > docs/config.md` (a test checks that this file is up to date).",
             "", "A config is one YAML file; any key can be overridden on the command line as `key=value` "
             "(e.g. `optim.lr=1e-3 data.batch_size=128`). Unknown keys, wrong types and out-of-range values are "
             "errors listed together before anything runs.", ""]

    def section(cls: type, prefix: str) -> None:
        lines.extend([f"## `{prefix.rstrip('.') or '(top level)'}` — {cls.__doc__.strip()}", "",
                      "| key | type | default | meaning |", "|---|---|---|---|"])
        hints = typing.get_type_hints(cls)
        subs = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            sub = next((a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)), None)
            if sub is not None and f.name != "teacher":
                subs.append((sub, f"{prefix}{f.name}."))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "null" if default is None else yaml.safe_dump(default, default_flow_style=True).strip()
            shown = shown.removesuffix("...").strip()
            kind = "model section (as `model`) or null" if f.name == "teacher" else describe(tp)
            lines.append(f"| `{prefix}{f.name}` | {kind.replace('|', 'or')} | `{shown}` | {f.metadata.get('doc', '')} |")
        lines.append("")
        for sub, p in subs:
            section(sub, p)

    section(Config, "")
    lines.extend(["## `method.params` per method", "",
                  "Defaults are the loss functions' defaults (the ImageNet settings of the papers); the published "
                  "CIFAR-100 settings are in the shipped configs and in docs/methods.md.", "",
                  "| method | key | type | default | meaning |", "|---|---|---|---|---|"])
    for name in sorted(METHODS):
        cls = METHODS[name].Params
        hints = typing.get_type_hints(cls)
        fields = dataclasses.fields(cls)
        if not fields:
            lines.append(f"| `{name}` | — | | | |")
        for f in fields:
            doc = f.metadata.get("doc", "").replace("|", "or")
            lines.append(f"| `{name}` | `{f.name}` | {describe(hints[f.name])} | `{f.default}` | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
