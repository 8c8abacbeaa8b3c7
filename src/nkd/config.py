"""Typed experiment configuration: dataclasses + YAML + ``key=value`` overrides.

One experiment per YAML file. Unknown or misspelled keys, wrong types and out-of-range values
are collected into one :class:`ConfigError` that lists every problem with its dotted path.
Method hyper-parameters live under ``method.params`` and are checked against the chosen
method's own parameter dataclass (see :mod:`nkd.methods`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """Every problem found in a config, one per line, each with its dotted path."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class DataConfig:
    name: Literal["cifar100", "cifar10", "image_folder_small", "imagenet_folder", "synthetic", "digits"] = "cifar100"
    root: str | None = None
    batch_size: int = 64  # per process
    global_batch_size: int | None = None  # if set: batch_size = global_batch_size / world_size
    eval_batch_size: int = 256
    num_workers: int = 4
    image_size: int = 32
    crop_padding: int = 4  # random-crop zero padding (small-image datasets)
    flip: bool = True  # random horizontal flip (small-image datasets)
    train_subset: int | None = None
    subset_seed: int = 0
    randaugment: bool = False  # ImageNet folders: torchvision RandAugment (m=9, n=2)
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    download: bool = False
    verify_checksums: bool = True
    cache_dir: str | None = None
    synthetic_samples: int = 512
    synthetic_classes: int = 10
    synthetic_seed: int = 0
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class ModelConfig:
    name: str = "resnet8x4"
    num_classes: int = 100
    checkpoint: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the constructor (e.g. timm's drop_path_rate)


@dataclass
class MethodConfig:
    name: str = "ce"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_norm_bias: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    name: Literal["multistep", "cosine", "exponential", "linear", "constant"] = "multistep"
    epochs: int = 240
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.001
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    sync_bn: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode, e.g. "reduce-overhead" (CUDA graphs), "max-autotune"
    log_every: int = 50  # steps between progress-bar updates and non-finite checks (policy "stop")
    grad_clip: float | None = None
    ema_decay: float | None = None
    eval_every: int = 1
    nan_policy: Literal["stop", "skip"] = "stop"
    max_steps_per_epoch: int | None = None
    checkpoint_every_steps: int = 0  # also write last.pt every N steps inside an epoch (0: at epoch ends only)
    deterministic: bool = False
    progress: bool = True
    console: bool = True  # per-epoch log lines on stdout (train.log is always written)
    tensorboard: bool = True


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- building
def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")


def build_dataclass(cls: type, data: Any, path: str, problems: list[str]):
    """Instantiate ``cls`` from a mapping, recording every unknown key and type error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{path}{key}: unknown key{hint}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, tp = data[f.name], hints[f.name]
        sub = _dataclass_in(tp)
        if sub is not None and (value is not None or not _type_ok(None, tp)):
            kwargs[f.name] = build_dataclass(sub, value, f"{path}{f.name}.", problems)
        elif _type_ok(value, tp):
            kwargs[f.name] = float(value) if tp is float and isinstance(value, int) else value
        else:
            problems.append(f"{path}{f.name}: expected {_describe(tp)}, got {value!r}")
    return cls(**kwargs)


def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError([f"override {item!r}: expected key=value (e.g. optim.lr=0.1)"])
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


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


def check_ranges(cfg: Config, problems: list[str]) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            problems.append(msg)

    need(cfg.optim.lr > 0, f"optim.lr: must be > 0, got {cfg.optim.lr}")
    need(cfg.optim.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {cfg.optim.weight_decay}")
    need(0 <= cfg.optim.momentum < 1, f"optim.momentum: must lie in [0, 1), got {cfg.optim.momentum}")
    need(cfg.schedule.epochs >= 1, f"schedule.epochs: must be >= 1, got {cfg.schedule.epochs}")
    need(cfg.schedule.warmup_epochs >= 0, f"schedule.warmup_epochs: must be >= 0, got {cfg.schedule.warmup_epochs}")
    need(cfg.data.batch_size >= 1, f"data.batch_size: must be >= 1, got {cfg.data.batch_size}")
    need(cfg.data.eval_batch_size >= 1, f"data.eval_batch_size: must be >= 1, got {cfg.data.eval_batch_size}")
    need(cfg.model.num_classes >= 2, f"model.num_classes: must be >= 2, got {cfg.model.num_classes}")
    need(cfg.data.mixup >= 0 and cfg.data.cutmix >= 0, "data.mixup / data.cutmix: must be >= 0")
    need(0 <= cfg.data.label_smoothing < 1, f"data.label_smoothing: must lie in [0, 1), got {cfg.data.label_smoothing}")
    need(cfg.train.grad_clip is None or cfg.train.grad_clip > 0, "train.grad_clip: must be > 0 or null")
    need(cfg.train.log_every >= 1, f"train.log_every: must be >= 1, got {cfg.train.log_every}")
    need(cfg.train.checkpoint_every_steps >= 0,
         f"train.checkpoint_every_steps: must be >= 0 (0 = at epoch ends only), got {cfg.train.checkpoint_every_steps}")
    need(cfg.train.compile_mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
         f"train.compile_mode: unknown mode {cfg.train.compile_mode!r}")
    need(cfg.train.ema_decay is None or 0 < cfg.train.ema_decay < 1, "train.ema_decay: must lie in (0, 1) or null")
    if cfg.teacher is not None:
        need(cfg.teacher.num_classes == cfg.model.num_classes,
             f"teacher.num_classes: {cfg.teacher.num_classes} differs from model.num_classes {cfg.model.num_classes}")
    need(cfg.data.crop_padding >= 0, f"data.crop_padding: must be >= 0, got {cfg.data.crop_padding}")
    if cfg.data.name == "digits":
        need(cfg.model.num_classes == 10, f"model.num_classes: {cfg.model.num_classes} does not match digits (10 classes)")
    if cfg.data.name == "synthetic":
        need(cfg.data.synthetic_classes == cfg.model.num_classes,
             f"model.num_classes: {cfg.model.num_classes} does not match the dataset's {cfg.data.synthetic_classes} "
             "classes (data.synthetic_classes)")
    known = {"cifar100": 100, "cifar10": 10}
    if cfg.data.name in known:
        need(cfg.model.num_classes == known[cfg.data.name],
             f"model.num_classes: {cfg.model.num_classes} does not match {cfg.data.name} ({known[cfg.data.name]} classes)")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                check_files: bool = False) -> Config:
    """Read YAML (or start from defaults), apply ``key=value`` overrides, validate everything.

    ``check_files=True`` also checks that the teacher checkpoint and dataset paths exist.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file not found: {p}"])
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{p}: not valid YAML: {e}"]) from e
    data = apply_overrides(data, overrides or [])
    problems: list[str] = []
    cfg = build_dataclass(Config, data, "", problems)
    check_ranges(cfg, problems)  # on the fields that parsed (defaults stand in for broken ones)
    from .methods import validate_method  # late import: methods import losses/models

    validate_method(cfg, problems)
    if check_files:
        check_paths(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def check_paths(cfg: Config, problems: list[str]) -> None:
    if cfg.teacher is not None and cfg.teacher.checkpoint and not Path(cfg.teacher.checkpoint).is_file():
        problems.append(f"teacher.checkpoint: file not found: {cfg.teacher.checkpoint}")
    if cfg.model.checkpoint and not Path(cfg.model.checkpoint).is_file():
        problems.append(f"model.checkpoint: file not found: {cfg.model.checkpoint}")
    if cfg.data.name != "synthetic" and cfg.data.root and not Path(cfg.data.root).exists() and not cfg.data.download:
        problems.append(f"data.root: path not found: {cfg.data.root}")
    if cfg.data.name in ("image_folder_small", "imagenet_folder") and not cfg.data.root:
        problems.append(f"data.root: required for data.name={cfg.data.name!r}")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
