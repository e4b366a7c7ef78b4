import json
import random

import pytest
from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

from longreach.data import (
    byte_tokenizer,
    load_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from longreach.data.tokenizer import bytes_to_unicode


def random_unicode(rng: random.Random, n: int) -> str:
    pools = [
        "abcdefghijklmnopqrstuvwxyz ABC 0123456789",
        " \n\t\r  \n\n",
        "éèüßøñçÅ",
        "日本語中文한국어",
        "😀🎉👋🏽👨‍👩‍👧",
        "\x00\x01\x7f",
        "<eos><bos><pad>",
    ]
    out = []
    for _ in range(n):
        if rng.random() < 0.1:
            out.append(chr(rng.randrange(0x20, 0x2FFFF)))
        else:
            out.append(rng.choice(rng.choice(pools)))
    # Surrogates cannot be encoded as UTF-8: drop them.
    return "".join(c for c in out if not 0xD800 <= ord(c) <= 0xDFFF)


def test_bytes_to_unicode_matches_bytelevel_alphabet():
    assert sorted(bytes_to_unicode().values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_byte_tokenizer_ids_are_bytes_and_round_trip():
    tok = byte_tokenizer()
    rng = random.Random(0)
    for _ in range(50):
        text = random_unicode(rng, rng.randrange(0, 200))
        plain = text.replace("<eos>", "").replace("<bos>", "").replace("<pad>", "")
        ids = tok.encode(plain, add_special_tokens=False)
        assert ids == list(plain.encode("utf-8"))
        assert tok.decode(ids) == plain
    for text in ["  leading spaces", "trailing \n\n", "\n", "", "👋 hi\tthere"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_byte_tokenizer_specials():
    tok = byte_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok.vocab_size == 259 and len(tok) == 259
    assert tok.convert_ids_to_tokens([256, 257, 258]) == ["<bos>", "<eos>", "<pad>"]
    # No implicit bos/eos: documents are separated by the data pipeline.
    assert tok("ab")["input_ids"] == [97, 98]
    assert tok.decode([104, 105, 257], skip_special_tokens=True) == "hi"


def test_byte_tokenizer_save_and_autotokenizer(tmp_path):
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Grüße 👋\n  indented"
    assert loaded.encode(text, add_special_tokens=False) == list(text.encode())
    assert loaded.eos_token_id == 257 and loaded.pad_token_id == 258
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    via_load = load_tokenizer(tmp_path)
    assert tokenizer_fingerprint(via_load) == tokenizer_fingerprint(tok)


def test_fingerprint_is_stable_and_distinguishes(tmp_path):
    a, b = byte_tokenizer(), byte_tokenizer()
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    # HF may switch padding/truncation on the backend during a call: not part of the identity.
    a(["x", "longer"], padding=True, truncation=True, max_length=3)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
    b.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


def small_corpus(tmp_path):
    rng = random.Random(1)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    # Plus pseudo-words, so there are more distinct pairs than the vocabulary needs.
    words += [
        "".join(rng.choice("aeioubdfgklmnprst") for _ in range(rng.randrange(3, 9)))
        for _ in range(300)
    ]
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as f:
        for _ in range(300):
            text = " ".join(rng.choice(words) for _ in range(40)) + ". Ünïcödé 😀\n"
            f.write(json.dumps({"text": text}) + "\n")
    return path


def test_train_bpe_round_trip_and_vocab_size(tmp_path):
    corpus = small_corpus(tmp_path)
    out = tmp_path / "bpe"
    tok = train_bpe_tokenizer(corpus, 400, out)
    assert len(tok) == 400
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    text = "the lazy wizards jumps over Ünïcödé 😀 and unseen words: Zyxq 日本\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned
    loaded = load_tokenizer(out)
    assert loaded.encode(text, add_special_tokens=False) == ids
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(tok)
    # Training again replaces the folder (no stray temporary folders left beside it).
    train_bpe_tokenizer(corpus, 300, out)
    assert len(load_tokenizer(out)) == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpe", "corpus.jsonl"]


def test_train_bpe_max_chars_trains_on_a_prefix(tmp_path):
    from longreach.data.tokenizer import _first_chars

    assert list(_first_chars(iter(["abcd", "efgh", "ij"]), 6)) == ["abcd", "ef"]
    assert list(_first_chars(iter(["ab"]), 10)) == ["ab"]
    corpus = tmp_path / "two.jsonl"
    # the first document's words only; the second's never reach the BPE under the cap
    first, second = "alpha beta " * 200, "zzyzx quokka " * 200
    corpus.write_text(json.dumps({"text": first}) + "\n" + json.dumps({"text": second}) + "\n")
    capped = train_bpe_tokenizer(corpus, 300, tmp_path / "capped", max_chars=len(first))
    whole = train_bpe_tokenizer(corpus, 300, tmp_path / "whole")
    assert "quokka" in "".join(whole.get_vocab()).replace("\u0120", "")
    assert len(capped.encode(" quokka", add_special_tokens=False)) > len(
        whole.encode(" quokka", add_special_tokens=False))
    with pytest.raises(ValueError, match="max_chars"):
        train_bpe_tokenizer(corpus, 300, tmp_path / "bad", max_chars=0)


def test_train_bpe_rejects_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(small_corpus(tmp_path), 100, tmp_path / "bpe")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no such local folder"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        load_tokenizer(file)


def test_load_tokenizer_eos_required_and_pad_fallback(tmp_path):
    tok = byte_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    loaded = load_tokenizer(tmp_path / "nopad")
    assert loaded.pad_token_id == loaded.eos_token_id == 257

    tok.eos_token = None
    tok.save_pretrained(tmp_path / "noeos")
    with pytest.raises(ValueError, match="no eos token"):
        load_tokenizer(tmp_path / "noeos")
