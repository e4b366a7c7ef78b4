"""Corpus haystacks: a .jsonl(.gz) source keeps its documents whole, in line-cut pieces."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from longreach.data import byte_tokenizer
from longreach.data.synthetic import (
    DOCUMENT_SEPARATOR,
    Haystack,
    passkey_training_task,
    split_lines,
)
from longreach.eval.ppl import long_document
from longreach.train.config import DataConfig


def _code(n_lines: int, tag: str) -> str:
    return "".join(f"def {tag}_{i}(x):\n    return x + {i}\n" for i in range(n_lines))


@pytest.fixture
def corpus(tmp_path):
    docs = [_code(400, "alpha"), _code(3, "beta"), _code(250, "gamma")]
    path = tmp_path / "heldout.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"package": f"p{i}", "text": text}) + "\n")
    return path, docs


def test_split_lines_cuts_after_line_ends_and_rejoins():
    text = "aa\nbbbb\ncc\n" * 50 + "tail without newline"
    pieces = split_lines(text, 40)
    assert "".join(pieces) == text
    assert all(len(p) <= 40 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])
    long_line = "x" * 100 + "\n" + "y\n"
    assert split_lines(long_line, 10) == ["x" * 100 + "\n", "y\n"]  # an over-long line stays whole
    assert split_lines("", 10) == [""]
    assert split_lines("short", 10) == ["short"]


def test_corpus_haystack_pieces_follow_documents(corpus, monkeypatch):
    path, docs = corpus
    monkeypatch.setattr(Haystack, "PIECE_CHARS", 1000)
    tok = byte_tokenizer()
    hay = Haystack(str(path), tok)
    # pieces of each document rejoin to it; a document ends only at its last piece
    assert "".join(hay.documents) == "".join(docs)
    ends = [i for i, e in enumerate(hay.ends) if e]
    assert len(ends) == len(docs) and ends[-1] == len(hay.documents) - 1
    first = ends[0] + 1
    assert "".join(hay.documents[:first]) == docs[0]
    # the separator comes only where a document ends
    sep = tok.encode(DOCUMENT_SEPARATOR, add_special_tokens=False)
    assert hay.document_ids(0).tolist() == tok.encode(hay.documents[0], add_special_tokens=False)
    assert hay.document_ids(ends[0]).tolist()[-len(sep):] == sep
    # filler reads on through a document's pieces: contiguous source text
    text = hay.filler(0, 5000)
    assert docs[0].startswith(text)
    assert len(text) >= 4990


def test_corpus_haystack_cache_is_bounded(corpus, monkeypatch):
    path, _ = corpus
    monkeypatch.setattr(Haystack, "PIECE_CHARS", 500)
    monkeypatch.setattr(Haystack, "CACHED_PIECES", 3)
    hay = Haystack(str(path), byte_tokenizer())
    for i in range(len(hay.documents)):
        assert hay.document_ids(i).dtype == np.int32
    assert len(hay._ids) == 3


def test_long_document_from_a_corpus_keeps_documents_whole(corpus, monkeypatch):
    path, docs = corpus
    monkeypatch.setattr(Haystack, "PIECE_CHARS", 1000)
    tok = byte_tokenizer()
    stream = "".join(d + DOCUMENT_SEPARATOR for d in docs) * 2  # the corpus read round
    for index in range(6):
        doc = long_document(tok, 3000, index=index, haystack=str(path))
        assert len(doc.ids) == 3000
        text = bytes(i for i in doc.ids if i < 256).decode("utf-8")
        assert len(text) >= 2990 and text in stream  # contiguous text: no separator mid-document
    with pytest.raises(ValueError, match="has only"):
        long_document(tok, sum(len(d) for d in docs) + 100, haystack=str(path))


def test_passkey_training_prompt_in_a_corpus_haystack(corpus):
    path, docs = corpus
    tok = byte_tokenizer()
    ids, labels = passkey_training_task(np.random.default_rng(0), 600, tok, split="train",
                                        haystack=str(path))
    text = bytes(i for i in ids.tolist() if i < 256).decode("utf-8", "replace")
    assert "return x +" in text  # the filler is the corpus's code
    assert (labels != -100).sum() >= 2


def test_plain_text_haystack_is_still_paragraphs(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph.\n\nSecond one.\n\n\nThird.", encoding="utf-8")
    hay = Haystack(str(path), byte_tokenizer())
    assert hay.documents == ["First paragraph.", "Second one.", "Third."]
    assert hay.ends == [True, True, True]
    with pytest.raises(ValueError, match="does not exist"):
        Haystack(str(tmp_path / "missing.txt"), byte_tokenizer())
    with pytest.raises(ValueError, match="does not exist"):
        Haystack(str(tmp_path / "missing.jsonl.gz"), byte_tokenizer())


def test_synthetic_haystack_source_is_the_training_corpus():
    dc = DataConfig(source="data/pycode/train.jsonl.gz",
                    synthetic={"task": "passkey", "fraction": 0.2, "haystack": "source"})
    assert dc.synthetic_options()["haystack"] == "data/pycode/train.jsonl.gz"
    assert dc.synthetic["haystack"] == "source"  # the recipe as written is kept
    plain = DataConfig(synthetic={"task": "passkey", "fraction": 0.2})
    assert plain.synthetic_options() == plain.synthetic
    with pytest.raises(ValueError, match="data.synthetic"):
        DataConfig(synthetic=["passkey"])


def test_long_texts_encode_in_parallel_pieces_to_the_same_ids(tmp_path, monkeypatch):
    from longreach.data import synthetic
    from longreach.data.tokenizer import train_bpe_tokenizer

    lines = [f"def f{i}(x):\n    return x * {i}  # line {i}\n\n" for i in range(400)]
    text = "".join(lines) + "tail without newline"
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n")
    tok = train_bpe_tokenizer(corpus, 300, tmp_path / "bpe")
    monkeypatch.setattr(synthetic, "PARALLEL_ENCODE_CHARS", 100)
    monkeypatch.setattr(synthetic, "_PIECE_CHARS", 50)
    pieces = synthetic.safe_pieces(text, 50)
    assert len(pieces) > 10 and "".join(pieces) == text
    assert all(p.startswith("\n") for p in pieces[1:])  # cut before a line end ...
    assert all(not p[-1].isspace() for p in pieces[:-1])  # ... after a non-space character
    assert synthetic._splittable_layout(tok) is not None
    for add in (True, False):
        assert synthetic.encode(tok, text, add_special_tokens=add) == \
            tok.encode(text, add_special_tokens=add)
