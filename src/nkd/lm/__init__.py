"""Language-model distillation around the fused token-level losses: token blocks from text,
offline teacher caches (top-k log-probabilities per position), perplexity evaluation.
``transformers``/``tokenizers`` are needed only by the functions that use them (extra ``nkd[lm]``)."""

from .blocks import check_vocab, encode_texts, pack_blocks, read_texts, text_blocks, tokenizer_vocab_size
from .cache import CacheError, TeacherCache, blocks_digest, cache_dataset, teacher_fingerprint, teacher_topk, write_teacher_cache
from .evaluate import evaluate

__all__ = ["CacheError", "TeacherCache", "write_teacher_cache", "teacher_topk", "teacher_fingerprint", "blocks_digest",
           "cache_dataset", "evaluate", "text_blocks", "read_texts", "encode_texts", "pack_blocks", "tokenizer_vocab_size",
           "check_vocab"]
