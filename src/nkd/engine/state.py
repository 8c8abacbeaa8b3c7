"""Training state of one student: what a checkpoint holds, saving it, and resuming from it.

``last.pt`` is written atomically and the previous one is kept as ``prev.pt`` (a hard link), so
a torn or unreadable ``last.pt`` falls back to ``prev.pt``. A resume refuses a config that
changes the run (batch size, seed, optimizer, method parameters, teacher, schedule, …: every
key except :data:`nkd.config.RUN_KEYS_SAFE_TO_CHANGE`) and lists each change ``old → new``,
unless ``allow_changes`` — then the changes are recorded in the state's history of changes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import config_changes
from .checkpoint import load_checkpoint, save_atomic

FORMAT = "nkd-train-v1"


@dataclass
class InEpoch:
    """A checkpoint written inside an epoch: ``step`` of the ``steps`` steps of ``epoch`` (0-based)
    are done, over ``seen`` samples, with the epoch's loss ``sums`` so far (summed over ranks).
    The one reader and writer of the checkpoint's ``partial`` entry (a plain dict on disk)."""

    epoch: int
    step: int
    seen: int
    sums: dict[str, float]
    steps: int | None = None  # absent in checkpoints of older versions

    @classmethod
    def read(cls, d: dict[str, Any] | None) -> InEpoch | None:
        if not d:
            return None
        return cls(int(d["epoch"]), int(d["step"]), int(d["seen"]), dict(d["sums"]),
                   None if d.get("steps") is None else int(d["steps"]))

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "steps": self.steps, "seen": self.seen, "sums": self.sums}


def checkpoint_position(ck: dict[str, Any]) -> tuple[int, int]:
    """(epoch to train next, steps of it already done) of a checkpoint dict."""
    return Progress.from_state(ck).position()


@dataclass
class Progress:
    """Where a student's run stands: ``epoch`` is the last *complete* epoch (0-based; -1: none);
    ``partial`` when the checkpoint was written inside an epoch (:class:`InEpoch`)."""

    epoch: int = -1
    global_step: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"top1": -1.0, "epoch": -1})
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    partial: InEpoch | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)

    def position(self) -> tuple[int, int]:
        """(epoch to train next, steps of it already done)."""
        if self.partial is not None:
            return self.partial.epoch, self.partial.step
        return self.epoch + 1, 0

    def to_state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "global_step": self.global_step, "best": dict(self.best),
                "history": json.dumps(self.history), "skipped_steps": self.skipped_steps,
                "partial": None if self.partial is None else self.partial.to_dict(),
                "config_changes": json.dumps(self.changes)}

    @classmethod
    def from_state(cls, ck: dict[str, Any]) -> Progress:
        return cls(epoch=int(ck["epoch"]), global_step=int(ck["global_step"]), best=dict(ck["best"]),
                   history=json.loads(ck["history"]), skipped_steps=int(ck.get("skipped_steps", 0)),
                   partial=InEpoch.read(ck.get("partial")), changes=json.loads(ck.get("config_changes", "[]")))


def describe_position(epoch: int, step: int, steps: int | None = None) -> str:
    """``"after epoch 3"`` or ``"inside epoch 4 (after step 20 of its 42)"`` (1-based epochs)."""
    if step == 0:
        return f"after epoch {epoch}" if epoch else "at the start"
    of = f" of its {steps}" if steps else ""
    return f"inside epoch {epoch + 1} (after step {step}{of})"


def save_checkpoint(ckpt_dir: Path, state: dict[str, Any], is_best: bool,
                    before_rename: Callable[[], None] | None = None) -> None:
    """``last.pt`` (and ``best.pt``) atomically; the previous ``last.pt`` becomes ``prev.pt``
    (``before_rename``: see :func:`~nkd.engine.checkpoint.save_atomic`)."""
    last = ckpt_dir / "last.pt"
    if last.is_file():  # keep the previous complete checkpoint as prev.pt (hard link, atomic)
        tmp = ckpt_dir / f"prev.pt.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(last, tmp)
            os.replace(tmp, ckpt_dir / "prev.pt")
        except OSError:
            tmp.unlink(missing_ok=True)
    if is_best:  # best.pt first: if it cannot be written, last.pt does not claim a best it lacks
        save_atomic(state, ckpt_dir / "best.pt", before_rename)
    save_atomic(state, last, before_rename)


def restore_best(ckpt_dir: Path, path: Path, ck: dict[str, Any], log) -> None:
    """A resumed checkpoint whose best epoch is its own epoch, while ``best.pt`` is missing or
    holds another epoch (a write that failed, e.g. on a full disk, before best.pt came first):
    rewrite ``best.pt`` from it, so ``summary.json`` and the files agree."""
    best = ck.get("best") or {}
    if ck.get("partial") or best.get("epoch") != int(ck["epoch"]) + 1:
        return
    target = ckpt_dir / "best.pt"
    try:
        current = load_checkpoint(target) if target.is_file() else None
    except ValueError:
        current = None
    if current is not None and int(current.get("epoch", -2)) == int(ck["epoch"]):
        return
    save_atomic(ck, target)
    log.info("rewrote %s from %s: the run's best epoch is %s and best.pt %s", target, path, best["epoch"],
             "held another epoch" if current is not None else "was missing")


def read_checkpoints(ckpt_dir: Path, log) -> list[tuple[Path, dict[str, Any]]]:
    """The readable resume candidates, newest first: ``last.pt`` then ``prev.pt``. An unreadable
    ``last.pt`` (torn, empty) is logged and skipped; ``[]`` when there is none at all.
    Raises ``ValueError`` when checkpoints exist but none can be read."""
    found, errors = [], []
    for name in ("last.pt", "prev.pt"):
        path = ckpt_dir / name
        if not path.is_file():
            continue
        try:
            found.append((path, load_checkpoint(path)))
        except ValueError as e:
            errors.append(str(e))
            log.info("%s%s", e, "; trying the previous checkpoint" if name == "last.pt" else "")
    if errors and not found:
        raise ValueError(f"cannot resume: {'; '.join(errors)}")
    return found


def with_new_defaults(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's stored config (flattened) with the keys added to nkd since it was written
    filled in with their defaults — what the older code did — so they are no phantom change
    ``None → default``. A key the new config sets to another value is still a change."""
    from dataclasses import asdict

    from ..config import Config, ModelConfig, flatten
    from ..methods import METHODS

    defaults = flatten(Config().to_dict())
    defaults.update({f"teacher.{k}": v for k, v in flatten(asdict(ModelConfig())).items()})
    method = METHODS.get(str(new.get("method", {}).get("name")))
    if method is not None:
        try:
            defaults.update({f"method.params.{k}": v for k, v in asdict(method.Params()).items()})
        except TypeError:  # a method whose parameters have no defaults: nothing to fill
            pass
    flat_old, flat_new = flatten(old), flatten(new)
    if flat_old.get("teacher") is None and flat_new.get("teacher") is None:
        defaults = {k: v for k, v in defaults.items() if not k.startswith("teacher.")}
    added = {k: defaults[k] for k in flat_new if k not in flat_old and k in defaults
             and not any(o.startswith(k + ".") or k.startswith(o + ".") for o in flat_old if o != k)}
    return {**flat_old, **added}


def data_root_change(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``data.root`` is a change of the run when it names another folder of a dataset read from
    disk (another train and test set); the same folder spelled differently is not."""
    a, b = (d.get("data", {}).get("root") for d in (old, new))
    from ..data.facts import DATASETS

    facts = DATASETS.get(str(new.get("data", {}).get("name")))
    if (facts is not None and not facts.needs_root) or a == b:
        return {}
    if a is not None and b is not None and os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b)):
        return {}
    return {"data.root": (a, b)}


def check_compatible(path: Path, ck: dict[str, Any], cfg_dict: dict[str, Any], allow_changes: bool
                     ) -> dict[str, tuple[Any, Any]]:
    """Refuse a checkpoint written for another run; return the accepted config changes."""
    if ck.get("format") != FORMAT:
        raise ValueError(f"cannot resume from {path}: not an nkd training checkpoint (format {ck.get('format')!r})")
    for key, want in (("method", cfg_dict["method"]["name"]), ("model_name", cfg_dict["model"]["name"]),
                      ("num_classes", cfg_dict["model"]["num_classes"])):
        if ck.get(key) != want:
            raise ValueError(f"cannot resume from {path}: it was written for {key}={ck.get(key)!r}, "
                             f"the config says {want!r}")
    old = yaml.safe_load(ck.get("config") or "{}") or {}
    changes = config_changes(with_new_defaults(old, cfg_dict), cfg_dict)
    changes.update(data_root_change(old, cfg_dict))
    if changes and not allow_changes:
        listed = "; ".join(f"{k}: {a!r} → {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
        raise ValueError(f"cannot resume from {path}: the config changes the run ({listed}); resume with the "
                         "config it was started with, or pass --allow-changes to continue with these changes "
                         "(they are recorded in the run's history)")
    return changes
