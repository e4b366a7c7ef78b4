"""Offline data: tokenizers, corpora, the token cache, packing, batching and synthetic tasks
(the built-in ``copy`` and ``passkey`` training tasks are registered when
``longreach.data.synthetic`` is imported, as ``get_synthetic_task`` does).

Typical use::

    tok = load_tokenizer("byte")
    cache = build_token_cache("builtin", tok)
    train = BatchLoader(PackedSequences(cache.train, 1024), batch_size=8, seed=0)
    val = eval_batches(PackedSequences(cache.val, 1024), batch_size=8, n_batches=4)
"""

import importlib

# name -> the module that defines it: imported on first use, so that `longreach.data.prompts`
# or `.synthetic` (numpy only) can be imported without the tokenizer's transformers and the
# loader's torch
_EXPORTS = {
    "iter_documents": "corpus",
    "source_fingerprint": "corpus",
    "BatchLoader": "loader",
    "PackedSequences": "loader",
    "eval_batches": "loader",
    "get_synthetic_task": "synthetic",
    "register_synthetic_task": "synthetic",
    "TokenCache": "token_cache",
    "build_token_cache": "token_cache",
    "byte_tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "tokenizer_fingerprint": "tokenizer",
    "train_bpe_tokenizer": "tokenizer",
    "vocab_bound": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
