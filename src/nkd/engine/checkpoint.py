"""Atomic checkpoints of the full training state.

``save_atomic`` writes to ``<path>.tmp-<pid>``, fsyncs, then ``os.replace``s it over ``path``:
a crash at any point leaves either the previous complete file or the new complete file, never a
half-written one under the real name. Loading uses ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..models.checkpoint import read_checkpoint
from ..typed import first_line


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous file at that path is untouched."""


CHECKPOINT_NAMES = ("last.pt", "prev.pt", "best.pt")


def used_run_dir_error(run_dir: str | os.PathLike) -> str | None:
    """Why a *fresh* run may not start in ``run_dir`` (it holds checkpoints), or None if it may."""
    ck = Path(run_dir) / "checkpoints"
    found = [n for n in CHECKPOINT_NAMES if (ck / n).is_file()]
    if not found:
        return None
    return (f"output_dir {run_dir} already holds checkpoints ({', '.join(found)}): pass --resume to continue that "
            "run, --overwrite to delete them and start again, or choose another output_dir")


def save_atomic(obj: Any, path: str | os.PathLike, before_rename: Callable[[], None] | None = None) -> None:
    """Write ``obj`` to ``path`` atomically; on failure raise :class:`CheckpointWriteError`
    (naming the file and the cause, e.g. a full disk) and leave any previous ``path`` intact.
    ``before_rename`` (fault injection, :mod:`nkd.engine.faults`) runs between the write and the rename."""

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a short write as RuntimeError
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is untouched" if path.exists() else ""
        cause = getattr(e, "strerror", None) or first_line(e)
        raise CheckpointWriteError(f"cannot write checkpoint {path} (disk full or not writable?): {cause}{kept}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load with ``weights_only=True``; an empty, truncated/corrupt or pickle-bearing file is a
    ValueError saying which."""
    path = Path(path)
    obj = read_checkpoint(path)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.frombuffer(np.random.get_state()[1].tobytes(), dtype=np.uint8).copy()),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    keys = np.frombuffer(state["numpy"].numpy().tobytes(), dtype=np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with every global RNG (Python, NumPy, torch CPU and CUDA) seeded from ``seed``,
    and give the caller back the states it had: what is built inside depends on ``seed`` alone,
    and nothing outside sees the draws made inside."""
    saved = rng_state()
    seed_everything(seed)
    try:
        yield
    finally:
        set_rng_state(saved)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
