"""Offline teacher caches: per position, the teacher's top-k token ids and log-probabilities.

Layout of a cache directory::

    manifest.json              format, fingerprint, shape, and per shard: file, rows, bytes, CRC32
    shard-00000.safetensors    ids [m, L, k] (int16 when V <= 32768, else int32), logprobs [m, L, k]
    shard-00001.safetensors    (float32 / float16 / bfloat16), rest [m, L] (log of the mass outside
    ...                        the top-k, same dtype)

Storage: safetensors shards. They are memory-mapped by ``safe_open`` (no full load, zero-copy
reads of any row range), are the LM ecosystem's tensor format (``transformers``, ``datasets``
and ``huggingface_hub`` read them), and the file bytes depend only on the tensors, so a rerun
writes the same bytes.

Crash safety: each shard is written to a temporary name, fsynced, renamed into place, and only
then listed in the manifest (itself written to a temporary name, fsynced and renamed). A reader
only opens shards the manifest lists, with their size and CRC32 checked on first use, so a
half-written, truncated or bit-flipped shard is never read silently. Calling
:func:`write_teacher_cache` again on an unfinished cache continues after the last listed shard;
the teacher's outputs are deterministic on CPU, so the result is byte-identical to an
uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["FORMAT", "CacheError", "TeacherCache", "write_teacher_cache", "teacher_topk", "teacher_fingerprint",
           "blocks_digest", "cache_dataset"]

FORMAT = "nkd-teacher-cache/1"
MANIFEST = "manifest.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(ValueError):
    """A cache that cannot be used: fingerprint mismatch, missing/truncated/corrupt shard."""


# ----------------------------------------------------------------------------- fingerprints
def _digest_tensor(h, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    h.update(t.numpy().tobytes())


def blocks_digest(input_ids: Tensor, attention_mask: Tensor | None = None) -> str:
    """sha256 of the token blocks (as int64) and the attention mask (as int8), shapes included."""
    h = hashlib.sha256()
    _digest_tensor(h, input_ids.to(torch.int64))
    if attention_mask is not None:
        _digest_tensor(h, attention_mask.to(torch.int8))
    return h.hexdigest()


def teacher_fingerprint(teacher: nn.Module) -> dict:
    """The teacher's architecture (class, config without volatile fields) and a sha256 of its weights."""
    cfg = getattr(teacher, "config", None)
    arch: dict = {"class": type(teacher).__name__}
    if cfg is not None and hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
        for k in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "_attn_implementation_autoset",
                  "_attn_implementation", "architectures"):
            d.pop(k, None)
        arch["config"] = json.loads(json.dumps(d, sort_keys=True, default=str))
    h = hashlib.sha256()
    for name, t in sorted(teacher.state_dict().items()):
        h.update(name.encode())
        _digest_tensor(h, t)
    return {"architecture": arch, "weights_sha256": h.hexdigest()}


def _vocab(teacher: nn.Module) -> int:
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(teacher.config.vocab_size)


# ----------------------------------------------------------------------------- the teacher's top-k
@torch.no_grad()
def teacher_topk(teacher: nn.Module, input_ids: Tensor, top_k: int, attention_mask: Tensor | None = None,
                 temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(ids [B, L, k] int64, logprobs [B, L, k], rest [B, L])`` (float32, float64 for a float64 teacher) of one batch: the
    top-k tokens of the teacher at every position, their log-probabilities under its full softmax
    at ``temperature``, and the log of the probability mass outside them (``-inf`` when k = V).
    This is what :func:`write_teacher_cache` stores and what a live teacher gives on the fly."""
    logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logp = torch.log_softmax(logits / temperature, dim=-1)
    lp, ids = torch.topk(logp, top_k, dim=-1)
    rest = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, lp, rest


# ----------------------------------------------------------------------------- writing
def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_bytes(m: dict) -> bytes:
    return (json.dumps(m, indent=1, sort_keys=True) + "\n").encode()


def _as_blocks(input_ids) -> Tensor:
    if isinstance(input_ids, Tensor):
        return input_ids
    batches = list(input_ids)
    if not batches:
        raise ValueError("input_ids: empty (no blocks)")
    return torch.cat([torch.as_tensor(b) for b in batches])


def write_teacher_cache(teacher: nn.Module, input_ids, path, top_k: int, attention_mask: Tensor | None = None,
                        batch_size: int = 8, temperature: float = 1.0, *, dtype: str | torch.dtype = "float32",
                        shard_size: int | None = None, progress=None) -> TeacherCache:
    """Run ``teacher`` (a causal LM, put in ``eval()`` here) under ``no_grad`` over the blocks
    ``input_ids`` ``[n, L]`` (or an iterable of ``[b, L]`` batches) and write its top-k cache to
    the directory ``path`` (see the module docstring). ``dtype``: storage of the log-probabilities
    (``float32`` = the teacher's values bitwise; ``float16``/``bfloat16`` halve the bytes).
    ``shard_size``: sequences per shard (default ``16 * batch_size``), the unit of resumption.
    An unfinished cache at ``path`` with the same fingerprint is continued; one with another
    fingerprint is refused. ``progress(done, total)`` is called after every shard. Returns the
    opened :class:`TeacherCache`."""
    blocks = _as_blocks(input_ids)
    if not isinstance(blocks, Tensor) or blocks.dim() != 2 or blocks.dtype.is_floating_point or blocks.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token blocks [n, L], got {getattr(blocks, 'shape', type(blocks))}")
    if len(blocks) == 0:
        raise ValueError("input_ids: empty (no blocks)")
    if attention_mask is not None and attention_mask.shape != blocks.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(blocks.shape)}, got {tuple(attention_mask.shape)}")
    vocab = _vocab(teacher)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be an int in [1, V={vocab}], got {top_k!r}")
    if int(blocks.min()) < 0 or int(blocks.max()) >= vocab:
        raise ValueError(f"input_ids: token ids must lie in [0, V={vocab}) of the teacher, got [{int(blocks.min())}, {int(blocks.max())}]")
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature == temperature and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    name = dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    shard_size = shard_size or 16 * batch_size
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    from safetensors.torch import save

    fp = {"format": FORMAT, "teacher": teacher_fingerprint(teacher), "blocks_sha256": blocks_digest(blocks, attention_mask),
          "shape": [int(blocks.shape[0]), int(blocks.shape[1])], "top_k": top_k, "temperature": float(temperature),
          "dtype": name, "vocab_size": vocab, "masked": attention_mask is not None}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for tmp in path.glob("*.tmp-*"):  # leftovers of a killed writer
        tmp.unlink(missing_ok=True)
    mpath = path / MANIFEST
    manifest = {"fingerprint": fp, "shard_size": shard_size, "shards": [], "complete": False}
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old.get("fingerprint") != fp or old.get("shard_size") != shard_size:
            raise CacheError(f"path: {path} holds a teacher cache with another fingerprint "
                             f"({_diff(old.get('fingerprint') or {}, fp)}); delete it or choose another path")
        manifest = old
        for s in manifest["shards"]:  # what is listed must still be intact before appending to it
            _check_shard(path, s)
    id_dtype = torch.int16 if vocab <= 32768 else torch.int32
    st = _DTYPES[name]
    was_training = teacher.training
    teacher.eval()
    n = len(blocks)
    try:
        start = sum(s["rows"] for s in manifest["shards"])
        while start < n:
            stop = min(start + shard_size, n)
            parts = []
            for i in range(start, stop, batch_size):
                j = min(i + batch_size, stop)
                mask = None if attention_mask is None else attention_mask[i:j]
                parts.append(teacher_topk(teacher, blocks[i:j], top_k, mask, temperature))
            ids, lp, rest = (torch.cat(p) for p in zip(*parts))
            data = save({"ids": ids.to(id_dtype).contiguous(), "logprobs": lp.to(st).contiguous(), "rest": rest.to(st).contiguous()})
            fname = f"shard-{len(manifest['shards']):05d}.safetensors"
            _fsync_write(path / fname, data)
            manifest["shards"].append({"file": fname, "rows": stop - start, "bytes": len(data), "crc32": zlib.crc32(data)})
            manifest["complete"] = stop == n
            _fsync_write(mpath, _manifest_bytes(manifest))
            start = stop
            if progress is not None:
                progress(start, n)
        if not manifest["complete"]:  # n was already covered (an empty remainder)
            manifest["complete"] = True
            _fsync_write(mpath, _manifest_bytes(manifest))
    finally:
        teacher.train(was_training)
    return TeacherCache(path)


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "differs in " + ", ".join(keys) if keys else "same"


def _check_shard(root: Path, s: dict) -> None:
    p = root / s["file"]
    if not p.is_file():
        raise CacheError(f"{p}: shard missing")
    size = p.stat().st_size
    if size != s["bytes"]:
        raise CacheError(f"{p}: truncated or altered shard ({size} bytes, the manifest says {s['bytes']})")
    crc = 0
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    if crc != s["crc32"]:
        raise CacheError(f"{p}: corrupt shard (CRC32 {crc:08x}, the manifest says {s['crc32']:08x})")


# ----------------------------------------------------------------------------- reading
class TeacherCache:
    """A finished teacher cache (see the module docstring), memory-mapped.

    ``len(cache)``: sequences; ``cache.topk(index)`` → ``(ids [m, L, k] int64, logprobs [m, L, k]
    float32)`` for an int (m = 1), a slice or an index tensor/list; ``cache.rest(index)`` → the log
    of the mass outside the top-k ``[m, L]``; ``cache.fingerprint``: the manifest's dict.
    ``teacher`` / ``input_ids`` (+ ``attention_mask``), when given, must be those the cache was
    written from (:class:`CacheError` naming the argument otherwise). Every shard's size and CRC32
    are checked the first time it is read (``verify()`` checks them all now).
    """

    def __init__(self, path, *, teacher: nn.Module | None = None, input_ids: Tensor | None = None,
                 attention_mask: Tensor | None = None):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise CacheError(f"path: {self.path} is not a teacher cache (no {MANIFEST})")
        try:
            m = json.loads(mpath.read_text())
        except ValueError as e:
            raise CacheError(f"{mpath}: not valid JSON ({e})") from e
        if m.get("fingerprint", {}).get("format") != FORMAT:
            raise CacheError(f"{mpath}: not an {FORMAT} cache")
        if not m.get("complete"):
            done = sum(s["rows"] for s in m["shards"])
            raise CacheError(f"path: the cache at {self.path} is unfinished ({done} of {m['fingerprint']['shape'][0]} sequences); "
                             "call write_teacher_cache again to complete it")
        self.manifest = m
        self.fingerprint: dict = m["fingerprint"]
        self.top_k: int = self.fingerprint["top_k"]
        self.temperature: float = self.fingerprint["temperature"]
        self.vocab_size: int = self.fingerprint["vocab_size"]
        self.shape = tuple(self.fingerprint["shape"])
        self._starts = [0]
        for s in m["shards"]:
            self._starts.append(self._starts[-1] + s["rows"])
        self._handles: dict[int, object] = {}
        self.check(teacher=teacher, input_ids=input_ids, attention_mask=attention_mask)

    def check(self, *, teacher: nn.Module | None = None, input_ids: Tensor | None = None,
              attention_mask: Tensor | None = None) -> None:
        """CacheError unless ``teacher`` / ``input_ids`` (those given) are the cache's."""
        if teacher is not None:
            fp = teacher_fingerprint(teacher)
            if fp != self.fingerprint["teacher"]:
                what = "architecture" if fp["architecture"] != self.fingerprint["teacher"]["architecture"] else "weights"
                raise CacheError(f"teacher: not the teacher of the cache at {self.path} (its {what} differ)")
        if input_ids is not None:
            masked = attention_mask is not None
            if tuple(input_ids.shape) != self.shape or blocks_digest(input_ids, attention_mask) != self.fingerprint["blocks_sha256"] \
                    or masked != self.fingerprint["masked"]:
                raise CacheError(f"input_ids: not the blocks the cache at {self.path} was written from "
                                 f"(shape {tuple(input_ids.shape)} vs {self.shape}, or other tokens / attention_mask)")

    def __len__(self) -> int:
        return self.shape[0]

    def verify(self) -> None:
        for i in range(len(self.manifest["shards"])):
            self._shard(i)

    def nbytes(self) -> int:
        return sum(s["bytes"] for s in self.manifest["shards"])

    def _shard(self, i: int):
        h = self._handles.get(i)
        if h is None:
            from safetensors import safe_open

            s = self.manifest["shards"][i]
            _check_shard(self.path, s)
            h = safe_open(str(self.path / s["file"]), framework="pt")
            self._handles[i] = h
        return h

    def _rows(self, index) -> Tensor:
        n = len(self)
        if isinstance(index, bool):
            raise TypeError("index must be an int, a slice or an index tensor, got a bool")
        if isinstance(index, int):
            if not -n <= index < n:
                raise IndexError(f"index {index} out of range for a cache of {n} sequences")
            return torch.tensor([index % n])
        if isinstance(index, slice):
            return torch.arange(n)[index]
        idx = torch.as_tensor(index)
        if idx.dtype.is_floating_point or idx.dim() != 1:
            raise TypeError(f"index must be an int, a slice or a 1-d integer tensor, got {getattr(index, 'shape', index)}")
        if len(idx) and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"index out of range for a cache of {n} sequences")
        return idx.to(torch.int64) % n

    def _gather(self, key: str, index) -> Tensor:
        rows = self._rows(index)
        starts = torch.tensor(self._starts[1:])
        shard = torch.bucketize(rows, starts, right=True)
        out = None
        # contiguous runs of rows in one shard are read as one slice
        i = 0
        pieces = []
        while i < len(rows):
            s = int(shard[i])
            j = i + 1
            while j < len(rows) and int(shard[j]) == s and int(rows[j]) == int(rows[j - 1]) + 1:
                j += 1
            lo = int(rows[i]) - self._starts[s]
            pieces.append(self._shard(s).get_slice(key)[lo : lo + (j - i)])
            i = j
        if pieces:
            out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        else:
            h = self._shard(0)
            out = h.get_slice(key)[0:0]
        return out

    def topk(self, index) -> tuple[Tensor, Tensor]:
        ids = self._gather("ids", index).to(torch.int64)
        lp = self._gather("logprobs", index)
        return ids, lp.float()

    def rest(self, index) -> Tensor:
        return self._gather("rest", index).float()

    def __repr__(self) -> str:
        f = self.fingerprint
        return (f"TeacherCache({str(self.path)!r}, {len(self)} × {self.shape[1]} positions, top_k={self.top_k}, "
                f"dtype={f['dtype']}, {self.nbytes() / 1e6:.1f} MB)")


def cache_dataset(input_ids: Tensor, cache: TeacherCache | None = None, attention_mask: Tensor | None = None) -> list[dict]:
    """Examples for :class:`nkd.integrations.hf.DistillationTrainer`: ``input_ids``, ``attention_mask``,
    ``labels`` and ``cache_index`` (the row of the cache). With ``cache``, the blocks are checked
    against its fingerprint first."""
    if cache is not None:
        cache.check(input_ids=input_ids, attention_mask=attention_mask)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    labels = input_ids.masked_fill(mask == 0, -100)
    return [{"input_ids": input_ids[i], "attention_mask": mask[i], "labels": labels[i], "cache_index": i} for i in range(len(input_ids))]
