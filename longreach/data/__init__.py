"""Offline data: tokenizers, corpora, the token cache, packing, batching and synthetic tasks
(the built-in ``copy`` and ``passkey`` training tasks are registered on import).

Typical use::

    tok = load_tokenizer("byte")
    cache = build_token_cache("builtin", tok)
    train = BatchLoader(PackedSequences(cache.train, 1024), batch_size=8, seed=0)
    val = eval_batches(PackedSequences(cache.val, 1024), batch_size=8, n_batches=4)
"""

from .corpus import iter_documents, source_fingerprint
from .loader import BatchLoader, PackedSequences, eval_batches
from .synthetic import get_synthetic_task, register_synthetic_task
from .token_cache import TokenCache, build_token_cache
from .tokenizer import (
    byte_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
    vocab_bound,
)

__all__ = [
    "BatchLoader",
    "PackedSequences",
    "TokenCache",
    "build_token_cache",
    "byte_tokenizer",
    "eval_batches",
    "get_synthetic_task",
    "iter_documents",
    "load_tokenizer",
    "register_synthetic_task",
    "source_fingerprint",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
    "vocab_bound",
]
