"""The passkey eval task on prompt splits and the held-out haystack, and ``--split``."""

import argparse
import hashlib
import re

import pytest

from longreach.data import load_tokenizer, train_bpe_tokenizer
from longreach.data.prompts import HELDOUT, TRAIN
from longreach.eval.command import add_eval_parser, task_options
from longreach.eval.tasks import count_tokens, make_sample


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", *argv, "--model", "m", "--out", "o"])


def test_template_eval_sample_is_pinned(tok):
    # the classic prompt, byte for byte what it was before splits existed
    pins = {"builtin": "38b98d9c8c51558dd5c428d5b09ad3bda243d7079eb8ed0ef66e57d9cd6b13da",
            "noise": "f52262bd0336d826504d44b9d12189e55be4807dcb232db3ad9c89a60a1a1fc2"}
    for haystack, digest in pins.items():
        for options in ({}, {"split": "template"}):
            sample = make_sample("passkey", tok, 400, 0.5, seed=3, index=1, haystack=haystack,
                                 **options)
            assert sample.answer == "70557"
            assert hashlib.sha256(sample.prompt.encode()).hexdigest() == digest
    sample = make_sample("passkey", tok, 300, 0.25, seed=0, haystack="noise",
                         instruction=False, digits=7)
    assert sample.prompt == (
        "The grass is green. The sky is blue. The sun is yellow. The pass key is 1777258. "
        "Remember it. 1777258 is the pass key. Here we go. There and back again. The grass is "
        "green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass "
        "is green\n\nWhat is the pass key? The pass key is"
    )
    assert sample.metadata["split"] == "template" and sample.metadata["digits"] == 7


@pytest.mark.parametrize("split", ["template", "train", "heldout"])
@pytest.mark.parametrize("needles", [1, 3])
@pytest.mark.parametrize("key_kind", ["digits", "word", "hex"])
def test_metadata_locates_the_queried_needle(tok, split, needles, key_kind):
    if split == "template" and (needles > 1 or key_kind != "digits"):
        with pytest.raises(ValueError, match="template"):
            make_sample("passkey", tok, 1024, 0.5, split=split, needles=needles,
                        key_kind=key_kind)
        return
    for seed in range(4):
        sample = make_sample("passkey", tok, 1024, 0.4, seed=seed, split=split,
                             needles=needles, key_kind=key_kind, haystack="heldout")
        meta = sample.metadata
        assert meta["split"] == split and meta["key_kind"] == key_kind
        assert sample.answers == [sample.answer] == [meta["key"]]
        assert meta["key"] in meta["keys"] and len(set(meta["keys"])) == needles
        assert len(meta["needles"]) == needles and meta["needle_text"] in meta["needles"]
        assert meta["key"] in meta["needle_text"]
        for text, key in zip(meta["needles"], meta["keys"]):
            assert sample.prompt.count(text) == 1 and key in text
        at = sample.prompt.find(meta["needle_text"])
        assert at > 0
        # the prompt ends at an answer cue; the queried key appears only in its needle
        assert not sample.prompt[-1].isspace()
        assert sample.prompt.count(meta["key"]) == meta["needle_text"].count(meta["key"])
        assert meta["haystack"] == "heldout" and meta["depth"] == 0.4
        if key_kind == "digits":
            assert meta["digits"] == len(meta["key"])
            lo, hi = (5, 5) if split == "template" else (4, 7)
            assert lo <= len(meta["key"]) <= hi
        elif key_kind == "hex":
            assert re.fullmatch(r"[0-9a-f]{4}-[0-9a-f]{4}", meta["key"])
        else:
            assert re.fullmatch(r"[a-z]+-[a-z]+", meta["key"])


def test_heldout_prompts_use_heldout_phrasings(tok):
    train_needles = [p.split("{")[0] for p in TRAIN.needles + TRAIN.named_needles]
    for seed in range(20):
        needles = 1 + seed % 3
        sample = make_sample("passkey", tok, 800, 0.5, seed=seed, split="heldout",
                             needles=needles, haystack="noise")
        starts = [p.split("{")[0] for p in HELDOUT.needles + HELDOUT.named_needles]
        assert any(sample.metadata["needle_text"].startswith(s) for s in starts if s)
        assert not any(sample.metadata["needle_text"].startswith(s) for s in train_needles if s)
        for name in TRAIN.names:
            assert name not in sample.prompt
        questions = HELDOUT.questions if needles == 1 else [
            q.split("{")[0] for q in HELDOUT.named_questions]
        tail = sample.prompt[sample.prompt.rindex("\n\n") + 2:]
        assert any(tail.startswith(q) for q in questions)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_eval_prompts_fit_512_byte_tokens(tok, split):
    for needles in (1, 2, 3):
        for key_kind in ("digits", "word", "hex"):
            for depth in (0.0, 1.0):
                sample = make_sample("passkey", tok, 512, depth, seed=needles, split=split,
                                     needles=needles, key_kind=key_kind, digits=[8, 9],
                                     haystack="heldout")
                assert abs(count_tokens(tok, sample.prompt) - 512) <= 5
    with pytest.raises(ValueError, match="too short"):
        make_sample("passkey", tok, 512, 0.5, split="heldout", needles=8)


def test_heldout_split_with_a_bpe_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(["The value of an object is a rather abstract notion."] * 50)
                      + " Which pass key appeared in the passage? Answer: 12345.")
    bpe = train_bpe_tokenizer(str(corpus), 300, tmp_path / "tok")
    for length in (300, 3000):
        sample = make_sample("passkey", bpe, length, 0.5, split="heldout", haystack="heldout")
        assert abs(count_tokens(bpe, sample.prompt) - length) <= 0.01 * length


def test_split_option_is_checked(tok):
    with pytest.raises(ValueError, match="split"):
        make_sample("passkey", tok, 1024, 0.5, split="test")
    with pytest.raises(ValueError, match="key_kind"):
        make_sample("passkey", tok, 1024, 0.5, split="train", key_kind=["word", "hex"])
    with pytest.raises(ValueError, match="unknown option"):
        make_sample("niah", tok, 1024, 0.5, split="heldout")


# ---------------------------------------------------------------- the command line


def test_split_flag_becomes_the_task_option():
    args = _parse(["passkey", "--split", "heldout", "--haystack", "heldout", "--digits", "8"])
    assert args.haystack == "heldout"
    assert task_options(args) == {"split": "heldout", "digits": 8}
    args = _parse(["passkey", "--option", "needles=3", "--option", "key_kind=word",
                   "--split", "train"])
    assert task_options(args) == {"needles": 3, "key_kind": "word", "split": "train"}
    assert task_options(_parse(["passkey"])) == {}  # the template prompt, as before


def test_split_flag_is_refused_where_it_does_not_apply():
    for task in ("niah", "copy", "ppl"):
        with pytest.raises(ValueError, match="--split applies to passkey"):
            task_options(_parse([task, "--split", "heldout"]))
    with pytest.raises(SystemExit):
        _parse(["passkey", "--split", "test"])
