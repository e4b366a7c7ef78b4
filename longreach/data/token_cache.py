"""Token cache: a corpus tokenized once into flat token files, memory-mapped afterwards.

Layout: ``<cache_dir>/tokens-<key>/{train.bin, val.bin, meta.json}``. The key hashes the
source fingerprint (resolved paths, sizes, mtimes), the tokenizer fingerprint, the
validation fraction, the text field and the format version, so any change to one of them
builds a new cache and an unchanged setup loads instantly.

Each document is followed by the eos id. Held-out documents are chosen by position, not
by content (see ``is_held_out``): document 0 trains, document 1 is held out, and then one
document every ``1 / val_fraction`` (for ``val_fraction = 1/k``: documents ``i`` with
``i % k == 1``). So ``val`` gets at least one document whenever there are two or more. A
corpus of a single document is split by tokens instead: the last ``val_fraction`` of its
tokens (at least one) form ``val``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .corpus import describe, iter_documents, source_fingerprint, split_lines
from .tokenizer import plain_text_encoder, tokenizer_fingerprint, vocab_bound

FORMAT_VERSION = 2  # 2: documents longer than ENCODE_PIECE_CHARS are encoded in pieces
# Documents are encoded in batches of about this many characters (parallel in Rust).
BATCH_CHARS = 1 << 22
BATCH_DOCS = 1024
# A long document (a whole package's source) is encoded as pieces cut at line ends, so its
# pieces spread over the tokenizer's threads and memory stays bounded by one batch.
ENCODE_PIECE_CHARS = 1 << 16


def default_cache_dir() -> Path:
    return Path(os.environ.get("LONGREACH_CACHE") or "~/.cache/longreach").expanduser()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in it (ids < 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class TokenCache:
    """The tokenized corpus: ``train`` and ``val`` are read-only 1-D token arrays."""

    train: np.ndarray
    val: np.ndarray
    path: Path
    meta: dict = field(repr=False)
    hit: bool = False  # True when loaded from an existing cache, without tokenizing

    @classmethod
    def load(cls, path: str | os.PathLike, *, hit: bool = True) -> TokenCache:
        path = Path(path)
        meta = _read_meta(path)
        if meta is None:
            raise ValueError(f"{str(path)!r} is not a complete token cache")
        dtype = np.dtype(meta["dtype"])
        return cls(
            train=_map(path / "train.bin", dtype, meta["n_train_tokens"]),
            val=_map(path / "val.bin", dtype, meta["n_val_tokens"]),
            path=path,
            meta=meta,
            hit=hit,
        )

    @property
    def eos_id(self) -> int:
        return self.meta["eos_id"]


def _map(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:  # an empty file cannot be memory-mapped
        empty = np.empty(0, dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def _read_meta(path: Path) -> dict | None:
    """meta.json if ``path`` holds a complete cache of this format, else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            if (path / f"{split}.bin").stat().st_size != meta[f"n_{split}_tokens"] * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def cache_key(source_fp: str, tokenizer_fp: str, *, val_fraction: float, text_field: str) -> str:
    """The cache folder name for a source and tokenizer fingerprint and split settings."""
    payload = {
        "source": source_fp,
        "tokenizer": tokenizer_fp,
        "val_fraction": float(val_fraction),
        "text_field": text_field,
        "format_version": FORMAT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"tokens-{digest[:24]}"


def build_token_cache(
    source,
    tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.01,
    text_field: str = "text",
    progress: bool = True,
) -> TokenCache:
    """Tokenize ``source`` into ``cache_dir`` (or load the cache built before) and map it.

    ``cache_dir`` defaults to ``$LONGREACH_CACHE`` or ``~/.cache/longreach``. Safe to call
    from several processes at once: each builds in its own temporary folder and the first
    rename wins.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token (needed as the document separator)")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    fingerprints = {
        "source_fingerprint": source_fingerprint(source),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
    }
    key = cache_key(*fingerprints.values(), val_fraction=val_fraction, text_field=text_field)
    final = cache_dir / key
    if _read_meta(final) is not None:
        return TokenCache.load(final, hit=True)

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_dir))
    try:
        meta = tokenize_documents(
            source,
            tokenizer,
            tmp,
            val_fraction=val_fraction,
            text_field=text_field,
            progress=progress,
        )
        meta.update(key=key, **fingerprints)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists() and _read_meta(final) is None:
            shutil.rmtree(final, ignore_errors=True)  # a broken or outdated cache
        try:
            os.replace(tmp, final)
        except OSError:
            if _read_meta(final) is None:  # not another process's finished cache: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenCache.load(final, hit=False)


def is_held_out(index: int, val_fraction: float) -> bool:
    """Whether document ``index`` (0-based, in source order) goes to the validation split.

    Document 0 never does and document 1 always does (when ``val_fraction > 0``); after that
    a document is held out each time ``(index - 1) * val_fraction`` crosses an integer, so
    the held-out share tends to ``val_fraction``.
    """
    if val_fraction <= 0 or index == 0:
        return False
    if index == 1:
        return True
    return math.floor((index - 1) * val_fraction) > math.floor((index - 2) * val_fraction)


def _batches(documents: Iterable[str]) -> Iterator[list[tuple[str, bool]]]:
    """Batches of ``(piece, last piece of its document)``, documents in order."""
    batch, chars = [], 0
    for doc in documents:
        pieces = split_lines(doc, ENCODE_PIECE_CHARS)
        for i, piece in enumerate(pieces):
            batch.append((piece, i == len(pieces) - 1))
            chars += len(piece)
            if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def tokenize_documents(
    source,
    tokenizer,
    out_dir: Path,
    *,
    val_fraction: float,
    text_field: str = "text",
    progress: bool = True,
) -> dict:
    """Stream the documents of ``source`` through the tokenizer into ``out_dir``/{train,val}.bin.

    Returns the metadata (token and document counts). Tokens go to disk batch by batch, so
    memory stays bounded by one batch whatever the corpus size.
    """
    encoder = plain_text_encoder(tokenizer)
    # encode_batch_fast skips offset tracking (about 2x faster); older tokenizers lack it.
    encode_batch = getattr(encoder, "encode_batch_fast", encoder.encode_batch)
    eos = tokenizer.eos_token_id
    bound = vocab_bound(tokenizer)
    dtype = token_dtype(bound)
    counts = {"train": [0, 0], "val": [0, 0]}  # split -> [documents, tokens]
    n_docs = 0
    bar = _ProgressBar(describe(source), enabled=progress)
    with (
        open(out_dir / "train.bin", "wb") as train_f,
        open(out_dir / "val.bin", "wb") as val_f,
        bar,
    ):
        files = {"train": train_f, "val": val_f}
        for batch in _batches(iter_documents(source, text_field=text_field)):
            encodings = encode_batch([piece for piece, _ in batch], add_special_tokens=False)
            chunks: dict[str, list[np.ndarray]] = {"train": [], "val": []}
            for encoding, (_, last) in zip(encodings, batch):
                split = "val" if is_held_out(n_docs, val_fraction) else "train"
                chunks[split].append(np.array(encoding.ids + [eos] if last else encoding.ids,
                                              dtype=dtype))
                if last:
                    counts[split][0] += 1
                    n_docs += 1
            for split, arrays in chunks.items():
                if arrays:
                    tokens = np.concatenate(arrays)
                    files[split].write(memoryview(tokens))
                    counts[split][1] += len(tokens)
            bar.update(n_docs, counts["train"][1] + counts["val"][1])

    split_by = "documents"
    if n_docs == 1 and val_fraction > 0 and counts["train"][1] >= 2:
        split_by = "tokens"
        n_train = counts["train"][1]
        n_val = min(n_train - 1, max(1, round(n_train * val_fraction)))
        _move_tail(out_dir / "train.bin", out_dir / "val.bin", n_val * dtype.itemsize)
        counts["train"][1], counts["val"][1] = n_train - n_val, n_val
    return {
        "format_version": FORMAT_VERSION,
        "source": describe(source),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "split_by": split_by,
        "dtype": dtype.name,
        "eos_id": eos,
        "vocab_size": bound,
        "n_documents": n_docs,
        "n_train_documents": counts["train"][0],
        "n_val_documents": counts["val"][0],
        "n_train_tokens": counts["train"][1],
        "n_val_tokens": counts["val"][1],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _move_tail(src: Path, dst: Path, n_bytes: int) -> None:
    size = src.stat().st_size
    with open(src, "rb+") as f:
        f.seek(size - n_bytes)
        tail = f.read()
        f.truncate(size - n_bytes)
    dst.write_bytes(tail)


class _ProgressBar:
    """A rich spinner with document and token counts, on stderr; silent when disabled."""

    def __init__(self, name: str, *, enabled: bool):
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("tokenizing {task.description}"),
                TextColumn("{task.fields[docs]:,} docs, {task.fields[tokens]:,} tokens"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            self.task = self.progress.add_task(name, total=None, docs=0, tokens=0)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def update(self, docs: int, tokens: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, docs=docs, tokens=tokens)
