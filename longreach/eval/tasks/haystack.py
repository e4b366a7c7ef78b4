"""Filler text ("haystack") for long-context prompts, cut to an exact token budget.

A haystack is a list of documents: the built-in corpus (``"builtin"``), a text file, or
RULER's noise sentences (``"noise"``). Filler is a contiguous run of the documents' tokens,
starting at a random document, wrapping around when a prompt needs more text than exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from longreach.data import iter_documents

NOISE = "noise"
NOISE_TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
# Ends of sentences (or lines) where a needle may go without splitting a sentence.
_BOUNDARY = re.compile(r"(?<=[.!?;:])\s+|\n+")
DOCUMENT_SEPARATOR = "\n\n"


class Haystack:
    """Documents of a haystack source, tokenized lazily with one tokenizer."""

    def __init__(self, source: str | Path, tokenizer):
        self.source = str(source)
        self.tokenizer = tokenizer
        if self.source == NOISE:
            self.documents = [" ".join([NOISE_TEXT] * 20)]
        elif self.source == "builtin":
            self.documents = list(iter_documents("builtin"))
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise ValueError(f"haystack file {self.source!r} does not exist")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"haystack file {self.source!r} is not UTF-8 text") from err
            # paragraphs become documents, so filler can start at many places
            self.documents = [p.strip() for p in text.split("\n\n") if p.strip()]
            if not self.documents:
                raise ValueError(f"haystack file {self.source!r} is empty")
        self._ids: dict[int, list[int]] = {}
        self._separator = tokenizer.encode(DOCUMENT_SEPARATOR, add_special_tokens=False)

    def _document_ids(self, index: int) -> list[int]:
        if index not in self._ids:
            ids = self.tokenizer.encode(self.documents[index], add_special_tokens=False)
            self._ids[index] = ids + self._separator
        return self._ids[index]

    def filler(self, start: int, n_tokens: int) -> str:
        """Text of about ``n_tokens`` tokens, from document ``start`` on (wrapping around)."""
        if n_tokens <= 0:
            return ""
        ids: list[int] = []
        index = start % len(self.documents)
        while len(ids) < n_tokens:
            ids.extend(self._document_ids(index))
            index = (index + 1) % len(self.documents)
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust decoder directly: much faster on long spans
            text = backend.decode(ids[:n_tokens], skip_special_tokens=True)
        else:
            text = self.tokenizer.decode(ids[:n_tokens], skip_special_tokens=True)
        # a cut through a multi-byte character decodes to U+FFFD: drop it
        return text.replace("\ufffd", "").strip()

    def random_start(self, rng: np.random.Generator) -> int:
        return int(rng.integers(len(self.documents)))


_HAYSTACKS: dict[tuple[str, int], tuple[object, Haystack]] = {}


def get_haystack(source: str | Path, tokenizer) -> Haystack:
    """A cached Haystack per (source, tokenizer object): tokenizing a corpus is not free."""
    key = (str(source), id(tokenizer))
    cached = _HAYSTACKS.get(key)
    if cached is None or cached[0] is not tokenizer:
        # keep the tokenizer alive with the entry so its id cannot be reused
        cached = (tokenizer, Haystack(source, tokenizer))
        if len(_HAYSTACKS) > 8:
            _HAYSTACKS.clear()
        _HAYSTACKS[key] = cached
    return cached[1]


def sentence_boundaries(text: str) -> list[int]:
    """Character offsets where a sentence (or line) starts: 0, ..., len(text)."""
    offsets = [0] + [m.end() for m in _BOUNDARY.finditer(text)] + [len(text)]
    return sorted(set(offsets))


def nearest_boundary(text: str, fraction: float) -> int:
    """The sentence boundary of ``text`` closest to ``fraction`` of its length."""
    target = fraction * len(text)
    return min(sentence_boundaries(text), key=lambda b: (abs(b - target), b))
