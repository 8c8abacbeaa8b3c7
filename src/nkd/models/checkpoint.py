"""Loading model weights from the checkpoint files users already have."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..typed import first_line

STATE_KEYS = ("model", "state_dict", "student")


def extract_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """The model ``state_dict`` inside a loaded checkpoint object (see ``STATE_KEYS``)."""
    if isinstance(obj, Mapping):
        if isinstance(obj.get("trainable"), Mapping):  # nkd training checkpoint: student + weak head
            return {k[len("student."):]: v for k, v in obj["trainable"].items() if k.startswith("student.")}
        for key in STATE_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return extract_state_dict(obj[key], source)
        if obj and all(isinstance(v, Tensor) for v in obj.values()):
            sd = dict(obj)
            if all(k.startswith("module.") for k in sd):
                sd = {k[len("module."):]: v for k, v in sd.items()}
            return sd
    raise ValueError(
        f"{source} holds no state_dict: expected a mapping of tensors or a dict with one under {STATE_KEYS}"
    )


def describe_mismatch(model: nn.Module, sd: Mapping[str, Tensor]) -> str | None:
    """Missing/unexpected keys and shape mismatches between ``model`` and ``sd`` (None if none)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(sd))
        if tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return None

    def head(items: list[str]) -> str:
        return ", ".join(items[:12]) + (f" … (+{len(items) - 12} more)" if len(items) > 12 else "")

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {head(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {head(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches ({len(shapes)}): {head(shapes)}")
    return "; ".join(parts)


def archive_problem(path: str | os.PathLike) -> str | None:
    """Why a torch zip checkpoint fails its own CRC-32 checks (a flipped bit, a bad sector), or
    None when every record matches — or the file is no zip archive (legacy torch files, which
    ``torch.load`` judges itself). ``torch.load`` does not check the CRCs."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        return f"not a complete zip archive ({first_line(e)})"
    except Exception as e:  # noqa: BLE001 - e.g. zlib errors inside a damaged record
        return f"a damaged record ({first_line(e)})"
    if bad is not None:
        return f"the CRC-32 of its record {bad!r} does not match its contents (a flipped bit or damaged storage)"
    return None


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> object:
    """``torch.load`` of a checkpoint file (``weights_only`` unless ``allow_pickle``) whose every
    failure is a ``ValueError`` naming the file and the reason (empty, truncated/corrupt, or
    holding pickled objects); a missing file is a ``FileNotFoundError``."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"checkpoint not found: {source}")
    if os.path.getsize(source) == 0:
        raise ValueError(f"checkpoint {source} is unreadable: the file is empty (0 bytes; a torn write)")
    problem = archive_problem(source)
    if problem:
        raise ValueError(f"checkpoint {source} is corrupt: {problem}")
    try:
        return torch.load(source, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        why = "truncated or corrupt" if allow_pickle else ("truncated, corrupt, or holds arbitrary pickled objects, "
                                                           "which weights_only loading refuses")
        raise ValueError(f"checkpoint {source} is unreadable ({why}): {first_line(e)}") from e


def load_weights(model: nn.Module, checkpoint: str | os.PathLike | Mapping, *, allow_pickle: bool = False,
                 source: str | None = None) -> nn.Module:
    """Load weights strictly into ``model``; raise ``ValueError`` naming every mismatch.

    ``allow_pickle=True`` is the explicit opt-in for files that ``weights_only`` loading rejects
    (arbitrary pickles: only for files you trust).
    """
    source = source or "checkpoint"
    if not isinstance(checkpoint, Mapping):
        source = os.fspath(checkpoint)
        checkpoint = read_checkpoint(source, allow_pickle)
    sd = extract_state_dict(checkpoint, source)
    target = model
    inner = getattr(model, "model", None)  # timm wrapper: accept plain timm state_dicts
    if inner is not None and not any(k.startswith("model.") for k in sd):
        target = inner
    problem = describe_mismatch(target, sd)
    if problem:
        raise ValueError(f"{source} does not fit {type(target).__name__}: {problem}")
    target.load_state_dict(sd, strict=True)
    return model
