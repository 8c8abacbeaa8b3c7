"""Text → ``[n, L]`` token blocks through any ``tokenizers`` or ``transformers`` tokenizer."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["read_texts", "encode_texts", "pack_blocks", "text_blocks", "tokenizer_vocab_size", "check_vocab"]


def read_texts(source) -> list[str]:
    """Texts from a file, a folder (its ``*.txt``/``*.py``/``*.md`` files, sorted), a list of paths,
    a list of strings, or a ``datasets.Dataset`` (its ``text`` column)."""
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset
        if "text" not in source.column_names:
            raise ValueError(f"corpus: the dataset has no 'text' column (columns: {source.column_names})")
        return list(source["text"])
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    out = []
    for item in source:
        if isinstance(item, str) and (item == "" or not os.path.exists(item) and ("\n" in item or len(item) > 4096)):
            out.append(item)  # a text, not a path
            continue
        p = Path(item)
        if p.is_dir():
            files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".txt", ".py", ".md"))
            out += [q.read_text(encoding="utf-8", errors="replace") for q in files]
        elif p.is_file():
            out.append(p.read_text(encoding="utf-8", errors="replace"))
        else:
            raise ValueError(f"corpus: not a file or folder: {item}")
    return out


def tokenizer_vocab_size(tokenizer) -> int:
    """Vocabulary size of a ``tokenizers.Tokenizer`` or ``transformers`` tokenizer (added tokens included)."""
    if hasattr(tokenizer, "get_vocab_size"):
        return int(tokenizer.get_vocab_size(with_added_tokens=True))
    return len(tokenizer)


def encode_texts(tokenizer, texts: Iterable[str], eot_id: int | None = None) -> list[int]:
    """One id stream: each text's ids, followed by ``eot_id`` when given."""
    texts = list(texts)
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        seqs = [e.ids for e in tokenizer.encode_batch(texts)]
    else:  # transformers tokenizer
        seqs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for s in seqs:
        out += list(s)
        if eot_id is not None:
            out.append(int(eot_id))
    return out


def pack_blocks(ids, block_length: int) -> Tensor:
    """Non-overlapping blocks ``[n, block_length]`` (int64) of an id stream; the tail is dropped."""
    if not isinstance(block_length, int) or block_length < 2:
        raise ValueError(f"block_length must be an int >= 2, got {block_length!r}")
    ids = torch.as_tensor(ids, dtype=torch.int64).flatten()
    n = len(ids) // block_length
    if n == 0:
        raise ValueError(f"corpus: {len(ids)} tokens, fewer than one block of block_length={block_length}")
    return ids[: n * block_length].reshape(n, block_length).clone()


def text_blocks(source, tokenizer, block_length: int, eot_token: str | None = None) -> Tensor:
    """Pack a corpus (see :func:`read_texts`) into ``[n, block_length]`` int64 token blocks.
    ``eot_token``: a token appended after every text (e.g. ``"<|endoftext|>"``)."""
    texts = [t for t in read_texts(source) if t]
    if not texts:
        raise ValueError("corpus: empty (no text found)")
    eot_id = None
    if eot_token is not None:
        eot_id = tokenizer.token_to_id(eot_token) if hasattr(tokenizer, "token_to_id") else tokenizer.convert_tokens_to_ids(eot_token)
        if eot_id is None:
            raise ValueError(f"eot_token: {eot_token!r} is not in the tokenizer's vocabulary")
    return pack_blocks(encode_texts(tokenizer, texts, eot_id), block_length)


def check_vocab(tokenizer, model, name: str = "model") -> None:
    """The tokenizer's vocabulary must be the model's (``config.vocab_size``): ValueError otherwise."""
    v_tok = tokenizer_vocab_size(tokenizer)
    v_model = int(getattr(getattr(model, "config", None), "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
    if v_tok != v_model:
        raise ValueError(f"tokenizer: vocabulary of {v_tok} tokens differs from {name}'s vocab_size={v_model}")
