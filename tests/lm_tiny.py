"""Tiny config-built causal LMs and a tiny tokenizer trained on stdlib sources, for the nkd.lm tests
(nothing downloaded); the writer subprocess of the kill test imports them too."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch


def tiny_llama(hidden=32, layers=2, vocab=200, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_blocks(n=12, length=16, vocab=200, seed=1):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = [STDLIB / f for f in ("textwrap.py", "colorsys.py", "bisect.py", "keyword.py")]


def tiny_tokenizer(vocab: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((p.read_text() for p in FILES), trainer=trainer)
    return tok
