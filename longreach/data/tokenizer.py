"""Tokenizers: every one is a plain HF ``PreTrainedTokenizerFast`` backed by ``tokenizers``.

Three ways to get one, all offline:

- ``byte_tokenizer()``: built from code, no files. Ids 0..255 are the raw UTF-8 bytes
  (id == byte value), then ``<bos>`` = 256, ``<eos>`` = 257, ``<pad>`` = 258.
- ``load_tokenizer(dir)``: any tokenizer saved with ``save_pretrained`` in a local folder.
- ``train_bpe_tokenizer(source, vocab_size, out_dir)``: a byte-level BPE trained on a corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from longreach.runtime import atomic_dir

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character.

    The ByteLevel pre-tokenizer rewrites text bytes into these characters, so a vocabulary
    written in them covers every byte sequence.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer: id == byte value for 0..255, then <bos>, <eos>, <pad>.

    A BPE model with no merges over the ByteLevel alphabet, so encoding runs in Rust and
    decoding is lossless for any text. vocab_size is 259.
    """
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    # The specials are part of the model vocabulary (not only added tokens) so that
    # vocab_size and len(tokenizer) agree at 259.
    vocab.update({token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges it would only cost time.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([_special(t) for t in SPECIAL_TOKENS])
    return _wrap(backend)


def load_tokenizer(spec: str | os.PathLike = "byte") -> PreTrainedTokenizerFast:
    """``"byte"`` -> ``byte_tokenizer()``; a local folder -> ``AutoTokenizer.from_pretrained``.

    Only local folders are accepted (nothing is downloaded). The tokenizer must have an eos
    token (the document separator); a missing pad token falls back to eos.
    """
    if str(spec) == "byte":
        return byte_tokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(
            f"tokenizer {str(spec)!r}: no such local folder (use 'byte' or a folder written "
            "by save_pretrained; tokenizers are never downloaded)"
        )
    if not path.is_dir():
        raise ValueError(
            f"tokenizer {str(spec)!r} is not a folder (expected a save_pretrained folder)"
        )
    if not any((path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(
            f"tokenizer folder {str(path)!r} has no tokenizer.json or tokenizer_config.json"
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):  # name the broken file
        file = path / name
        if file.is_file():
            try:
                json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(
                    f"{file} is not valid JSON ({err}); save the tokenizer again "
                    "(tokenizer.save_pretrained) or pass another one"
                ) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # `tokenizers` raises plain Exceptions for a malformed file
        raise ValueError(f"could not load a tokenizer from {str(path)!r}: {err}") from None
    if not hasattr(tok, "backend_tokenizer"):
        raise ValueError(
            f"tokenizer in {str(path)!r} is not a fast (tokenizers-backed) tokenizer; "
            "save it with tokenizer.json"
        )
    if tok.eos_token_id is None:
        raise ValueError(
            f"tokenizer in {str(path)!r} has no eos token; set eos_token (the document "
            "separator) and save it again"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def train_bpe_tokenizer(
    source,
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    min_frequency: int = 2,
    text_field: str = "text",
    max_chars: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the documents of ``source`` and save it to ``out_dir``.

    ``source`` is anything ``iter_documents`` accepts. ``max_chars`` caps the training text:
    documents are read in order and the one that crosses the cap is cut there (a sample is
    enough for a BPE, and a corpus of hundreds of MB trains in a fraction of the time).
    Specials <bos>, <eos>, <pad> get ids 0, 1, 2. The folder is written to a temporary
    sibling and renamed into place, replacing an existing ``out_dir``.
    """
    from .corpus import iter_documents

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{len(alphabet) + len(SPECIAL_TOKENS)} (256 bytes + 3 specials)"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[_special(t) for t in SPECIAL_TOKENS],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 (or None for the whole corpus), got {max_chars}")
    documents = iter_documents(source, text_field=text_field)
    if max_chars is not None:
        documents = _first_chars(documents, max_chars)
    backend.train_from_iterator(documents, trainer=trainer)
    tok = _wrap(backend)
    _save_atomically(tok, Path(out_dir))
    return tok


def _first_chars(documents, max_chars: int):
    """The documents up to ``max_chars`` characters in all (the last one cut)."""
    left = max_chars
    for doc in documents:
        yield doc[:left]
        left -= min(len(doc), left)
        if left == 0:
            return


def _save_atomically(tok: PreTrainedTokenizerFast, out_dir: Path) -> None:
    with atomic_dir(out_dir.expanduser().absolute()) as tmp:  # the umask's mode, swapped in whole
        tok.save_pretrained(str(tmp))


def tokenizer_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """A stable sha256 of what the tokenizer does: its ``tokenizer.json`` and special ids.

    Truncation and padding settings are left out: HF changes them on the backend during
    calls, and they never change the ids of a single document.
    """
    state = json.loads(tok.backend_tokenizer.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    specials = {
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "pad": tok.pad_token_id,
    }
    payload = json.dumps({"tokenizer": state, "specials": specials}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def plain_text_encoder(tok: PreTrainedTokenizerFast) -> Tokenizer:
    """A private copy of the Rust tokenizer for bulk encoding of raw documents.

    Special-token strings inside a document (say a literal "<eos>") are encoded as plain
    text, so no document can forge a separator; truncation and padding are off.
    """
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = True
    return backend


def vocab_bound(tok: PreTrainedTokenizerFast) -> int:
    """One past the largest token id the tokenizer can produce."""
    ids: Iterable[int] = tok.get_vocab().values()
    return max(max(ids) + 1, len(tok))
