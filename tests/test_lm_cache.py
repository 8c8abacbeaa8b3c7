"""nkd.lm teacher caches: exact values, crash-resume (real kill -9), fingerprints, corruption, bad input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lm_tiny import tiny_blocks, tiny_llama  # noqa: E402
from nkd.lm import CacheError, TeacherCache, teacher_topk, write_teacher_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_float32_cache_holds_the_teachers_own_values_bitwise(tmp_path):
    teacher, blocks = tiny_llama(), tiny_blocks(n=10)
    cache = write_teacher_cache(teacher, blocks, tmp_path / "c", top_k=8, batch_size=4, shard_size=4)
    assert len(cache) == 10 and cache.top_k == 8 and len(cache.manifest["shards"]) == 3
    for lo, hi in ((0, 4), (4, 8), (8, 10)):  # the writer's batches
        ids, lp, rest = teacher_topk(teacher, blocks[lo:hi], 8)
        c_ids, c_lp = cache.topk(slice(lo, hi))
        assert c_ids.dtype == torch.int64 and c_lp.dtype == torch.float32 and c_ids.shape == (hi - lo, 16, 8)
        assert torch.equal(c_ids, ids) and torch.equal(c_lp, lp) and torch.equal(cache.rest(slice(lo, hi)), rest)
    # every index form, rows across shard borders, in any order
    full_ids, full_lp = cache.topk(slice(None))
    idx = torch.tensor([9, 3, 4, 5, 0])
    assert torch.equal(cache.topk(idx)[1], full_lp[idx]) and torch.equal(cache.topk([9, 3])[0], full_ids[[9, 3]])
    assert torch.equal(cache.topk(-1)[1], full_lp[9:10])
    # the mass adds up: top-k mass + rest = 1
    total = torch.logaddexp(full_lp.double().logsumexp(-1), cache.rest(slice(None)).double())
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-5)
    with pytest.raises(IndexError):
        cache.topk(10)


def test_full_vocabulary_cache_is_the_teachers_softmax(tmp_path):
    teacher, blocks = tiny_llama(vocab=50), tiny_blocks(n=3, vocab=50)
    cache = write_teacher_cache(teacher, blocks, tmp_path / "c", top_k=50, temperature=2.0)
    ids, lp = cache.topk(slice(None))
    with torch.no_grad():
        ref = torch.log_softmax(teacher(input_ids=blocks).logits.float() / 2.0, -1)
    assert torch.equal(lp, ref.gather(-1, ids)) and torch.equal(ids.sort(-1).values, torch.arange(50).expand_as(ids))
    assert torch.isneginf(cache.rest(slice(None))).all()


@pytest.mark.parametrize("dtype,bound", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_half_precision_storage_error_and_size(tmp_path, dtype, bound):
    teacher, blocks = tiny_llama(), tiny_blocks(n=4)
    f32 = write_teacher_cache(teacher, blocks, tmp_path / "a", top_k=16)
    half = write_teacher_cache(teacher, blocks, tmp_path / "b", top_k=16, dtype=dtype)
    a, b = f32.topk(slice(None))[1], half.topk(slice(None))[1]
    assert torch.equal(f32.topk(slice(None))[0], half.topk(slice(None))[0])
    rel = ((a - b).abs() / a.abs().clamp(min=1e-3)).max()
    assert 0 < rel < bound
    assert half.nbytes() < 0.7 * f32.nbytes()


WRITER = '''
import sys, time
from lm_tiny import tiny_blocks, tiny_llama
from nkd.lm import write_teacher_cache
slow = sys.argv[2] == "slow"
def progress(done, total):
    if slow:
        time.sleep(0.4)
write_teacher_cache(tiny_llama(), tiny_blocks(n=12), sys.argv[1], top_k=8, batch_size=2, shard_size=2, progress=progress)
'''


def _writer(path: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), mode], env=env)


def test_writer_killed_with_sigkill_resumes_to_a_byte_identical_cache(tmp_path):
    ref = tmp_path / "ref"
    assert _writer(ref, "fast").wait(timeout=120) == 0
    part = tmp_path / "part"
    proc = _writer(part, "slow")
    deadline = time.time() + 120
    while time.time() < deadline and not (part / "shard-00001.safetensors").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    with pytest.raises(CacheError, match="unfinished"):  # a half-finished cache is never read
        TeacherCache(part)
    assert 0 < len(list(part.glob("shard-*.safetensors"))) < 6
    (part / "shard-00099.safetensors.tmp-1").write_bytes(b"half a shard")  # what a kill mid-write leaves
    cache = write_teacher_cache(tiny_llama(), tiny_blocks(n=12), part, top_k=8, batch_size=2, shard_size=2)
    assert len(cache) == 12
    assert _files(part) == _files(ref)


def test_fingerprint_refuses_other_teacher_blocks_or_settings(tmp_path):
    teacher, blocks = tiny_llama(), tiny_blocks()
    write_teacher_cache(teacher, blocks, tmp_path / "c", top_k=8)
    TeacherCache(tmp_path / "c", teacher=teacher, input_ids=blocks)  # the right ones pass
    with pytest.raises(CacheError, match="teacher: .*weights"):
        TeacherCache(tmp_path / "c", teacher=tiny_llama(seed=5))
    with pytest.raises(CacheError, match="teacher: .*architecture"):
        TeacherCache(tmp_path / "c", teacher=tiny_llama(layers=1))
    other = blocks.clone()
    other[3, 4] = (other[3, 4] + 1) % 200
    with pytest.raises(CacheError, match="input_ids"):
        TeacherCache(tmp_path / "c", input_ids=other)
    with pytest.raises(CacheError, match="input_ids"):
        TeacherCache(tmp_path / "c", input_ids=blocks, attention_mask=torch.ones_like(blocks))
    before = _files(tmp_path / "c")
    with pytest.raises(CacheError, match="another fingerprint.*top_k"):  # writing other settings into it
        write_teacher_cache(teacher, blocks, tmp_path / "c", top_k=4)
    assert _files(tmp_path / "c") == before


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_truncated_or_bit_flipped_shard_is_detected(tmp_path, damage):
    teacher, blocks = tiny_llama(), tiny_blocks()
    write_teacher_cache(teacher, blocks, tmp_path / "c", top_k=8, shard_size=4)
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[:-7]
    else:
        data[len(data) - 100] ^= 0x10
    shard.write_bytes(bytes(data))
    cache = TeacherCache(tmp_path / "c")
    cache.topk(slice(0, 4))  # an intact shard still reads
    with pytest.raises(CacheError, match="shard-00001"):
        cache.topk(5)
    with pytest.raises(CacheError, match="shard-00001"):  # nor is a resume built on it
        write_teacher_cache(teacher, blocks, tmp_path / "c", top_k=8, shard_size=4)


def test_bad_input_is_refused_naming_the_argument_and_writes_nothing(tmp_path):
    teacher, blocks = tiny_llama(), tiny_blocks()
    for kwargs, msg in [(dict(top_k=201), "top_k"), (dict(top_k=0), "top_k"), (dict(top_k=4, temperature=0.0), "temperature"),
                        (dict(top_k=4, dtype="int8"), "dtype")]:
        with pytest.raises(ValueError, match=msg):
            write_teacher_cache(teacher, blocks, tmp_path / "x", **kwargs)
    with pytest.raises(ValueError, match="input_ids.*V=200"):
        write_teacher_cache(teacher, blocks + 150, tmp_path / "x", top_k=4)
    with pytest.raises(ValueError, match="input_ids: empty"):
        write_teacher_cache(teacher, [], tmp_path / "x", top_k=4)
    assert not (tmp_path / "x").exists()
    with pytest.raises(CacheError, match="not a teacher cache"):
        TeacherCache(tmp_path)


def test_iterable_of_batches_equals_one_tensor(tmp_path):
    teacher, blocks = tiny_llama(), tiny_blocks(n=6)
    write_teacher_cache(teacher, blocks, tmp_path / "a", top_k=4, batch_size=2)
    write_teacher_cache(teacher, iter(blocks.split(2)), tmp_path / "b", top_k=4, batch_size=2)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
