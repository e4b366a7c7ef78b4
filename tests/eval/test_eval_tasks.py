"""Eval task generators and scoring functions."""

import re
import uuid

import numpy as np
import pytest

from longreach.data import byte_tokenizer, get_synthetic_task, train_bpe_tokenizer
from longreach.data.synthetic import sentence_boundaries
from longreach.eval import scoring
from longreach.eval.tasks import available_eval_tasks, count_tokens, make_sample
from longreach.eval.tasks.passkey import INSTRUCTION, NEEDLE, QUESTION

# lengths long enough for each task's scaffolding with the byte tokenizer
LENGTHS = {"passkey": 1024, "niah": 1024, "copy": 1024, "vt": 2048, "multihop": 2048}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    # a small BPE: token counts are not additive over pieces of text, unlike bytes
    folder = tmp_path_factory.mktemp("bpe")
    corpus = folder / "corpus.txt"
    corpus.write_text(" ".join(["In the beginning God created the heaven and the earth."] * 50)
                      + " The pass key is 12345. Remember it. What is the pass key?")
    return train_bpe_tokenizer(str(corpus), 300, folder / "tok")


def test_all_tasks_registered():
    assert {"passkey", "niah", "vt", "multihop", "copy"} <= set(available_eval_tasks())


@pytest.mark.parametrize("task", sorted(LENGTHS))
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_length_within_one_percent(tok, task, depth):
    for length in (LENGTHS[task], 3 * LENGTHS[task]):
        sample = make_sample(task, tok, length, depth, seed=3)
        assert abs(count_tokens(tok, sample.prompt) - length) <= 0.01 * length
        assert sample.metadata["prompt_tokens"] == count_tokens(tok, sample.prompt)
        assert sample.metadata["length"] == length and sample.metadata["depth"] == depth
        assert sample.metadata["seed"] == 3


@pytest.mark.parametrize("length", [300, 2000, 20000])
def test_length_with_bpe_tokenizer(bpe, length):
    for depth in (0.0, 0.3, 1.0):
        sample = make_sample("passkey", bpe, length, depth, seed=1)
        assert abs(count_tokens(bpe, sample.prompt) - length) <= 0.01 * length


def _passkey_layout(prompt: str, key: str):
    needle = NEEDLE.format(key=key)
    assert prompt.startswith(INSTRUCTION) and prompt.endswith(QUESTION)
    body = prompt[len(INSTRUCTION) : -len(QUESTION)]
    pos = body.index(needle)
    filler = (body[:pos] + body[pos + len(needle) :]).strip()
    return body, needle, pos, filler


@pytest.mark.parametrize("haystack", ["builtin", "noise"])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_passkey_needle_once_at_depth(tok, haystack, depth):
    sample = make_sample("passkey", tok, 4096, depth, seed=7, haystack=haystack)
    key = sample.answer
    assert sample.prompt.count(NEEDLE.format(key=key)) == 1
    assert sample.prompt.count(key) == 2  # twice inside the one needle, nowhere else
    body, needle, pos, filler = _passkey_layout(sample.prompt, key)
    if depth == 0.0:
        assert pos == 0
    elif depth == 1.0:
        assert pos + len(needle) == len(body)
    # within one sentence of the requested fraction of the filler
    bounds = sentence_boundaries(filler)
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    assert abs(pos - depth * len(filler)) <= longest + 2
    if haystack == "noise":  # short sentences: the placement is tight
        assert abs(pos / len(filler) - depth) < 0.02


def test_haystack_file(tok, tmp_path):
    path = tmp_path / "hay.txt"
    path.write_text("Zebras run far. Owls fly at night.\n\nRivers flow to the sea. " * 40)
    sample = make_sample("passkey", tok, 1024, 0.5, seed=0, haystack=str(path))
    assert "Zebras" in sample.prompt and "In the beginning" not in sample.prompt
    with pytest.raises(ValueError, match="does not exist"):
        make_sample("passkey", tok, 1024, 0.5, haystack=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("task", sorted(LENGTHS))
def test_determinism(tok, task):
    a = make_sample(task, tok, LENGTHS[task], 0.5, seed=11)
    b = make_sample(task, tok, LENGTHS[task], 0.5, seed=11)
    c = make_sample(task, tok, LENGTHS[task], 0.5, seed=12)
    d = make_sample(task, tok, LENGTHS[task], 0.5, seed=11, index=1)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert c.prompt != a.prompt and c.answer != a.answer
    assert d.prompt != a.prompt


def test_passkey_digits(tok):
    for digits in (1, 5, 12):
        sample = make_sample("passkey", tok, 1024, 0.5, seed=2, digits=digits)
        assert re.fullmatch(rf"[1-9]\d{{{digits - 1}}}", sample.answer)
        assert sample.metadata["digits"] == digits


@pytest.mark.parametrize("value_type", ["number", "word", "uuid"])
def test_niah_values_and_distractors(tok, value_type):
    sample = make_sample("niah", tok, 2048, 0.5, seed=5, value_type=value_type, keys=3)
    value = sample.answer
    if value_type == "number":
        assert value.isdigit() and len(value) == 7
    elif value_type == "uuid":
        assert str(uuid.UUID(value)) == value
    else:
        assert re.fullmatch(r"[a-z]+-[a-z]+", value)
    key = sample.metadata["key"]
    needle = f"One of the special magic {value_type}s for {key} is: {value}."
    assert sample.prompt.count(needle) == 1
    assert sample.prompt.count(value) == 1
    distractors = sample.metadata["distractors"]
    assert len(distractors) == 2 and value not in distractors
    for other in distractors:
        assert sample.prompt.count(other) == 1
    assert sample.prompt.endswith(f"for {key} mentioned in the provided text are")


def test_vt_chain(tok):
    sample = make_sample("vt", tok, 2048, 0.25, seed=4, hops=3, chains=2)
    names = sample.answers
    assert len(names) == 4 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    value = sample.metadata["value"]
    assert sample.prompt.count(f"VAR {names[0]} = {value}.") == 1
    for a, b in zip(names, names[1:]):
        assert sample.prompt.count(f"VAR {b} = VAR {a}.") == 1
    # the distractor chain has its own value
    assert len(re.findall(r"VAR [A-Z]{5} = \d+\.", sample.prompt)) == 2


@pytest.mark.parametrize("hops", [2, 3])
def test_multihop_chain(tok, hops):
    sample = make_sample("multihop", tok, 2048, 0.5, seed=9, hops=hops, distractors=2)
    assert sample.answer.isdigit()
    links = re.findall(r"The (\w+) box holds the key to the (\w+) box\.", sample.prompt)
    ends = dict(re.findall(r"The (\w+) box holds the number (\d+)\.", sample.prompt))
    assert len(links) == 3 * (hops - 1) and len(ends) == 3
    follow = dict(links)
    box = sample.metadata["start"]
    for _ in range(hops - 1):
        box = follow[box]
    assert ends[box] == sample.answer
    assert sorted(set(ends.values()) - {sample.answer}) == sorted(sample.metadata["distractor_values"])


def test_copy_code(tok):
    sample = make_sample("copy", tok, 1024, 0.5, seed=1, chars=20)
    assert re.fullmatch(r"[A-Za-z0-9]{20}", sample.answer)
    assert sample.prompt.count(sample.answer) == 1


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="too short"):
        make_sample("passkey", tok, 100, 0.5)
    with pytest.raises(ValueError, match="too short"):
        make_sample("multihop", tok, 400, 0.5)
    for depth in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
            make_sample("passkey", tok, 1024, depth)
    with pytest.raises(ValueError, match="unknown eval task 'nope'"):
        make_sample("nope", tok, 1024, 0.5)
    with pytest.raises(ValueError, match="unknown option"):
        make_sample("passkey", tok, 1024, 0.5, colour="red")
    with pytest.raises(ValueError, match="value_type"):
        make_sample("niah", tok, 1024, 0.5, value_type="emoji")
    with pytest.raises(ValueError, match="positive"):
        make_sample("passkey", tok, 0, 0.5)


def test_passkey_training_task(tok):
    task = get_synthetic_task("passkey")
    rng = np.random.default_rng(0)
    input_ids, labels = task(rng, 1024, tok, digits=6)
    assert input_ids.shape == labels.shape == (1024,)
    scored = labels != -100
    assert (input_ids[scored] == labels[scored]).all()
    answer = tok.decode(labels[scored][:-1].tolist())
    assert re.fullmatch(r" [1-9]\d{5}", answer) and labels[scored][-1] == tok.eos_token_id
    text = tok.decode(input_ids[: np.flatnonzero(scored)[0]].tolist())
    assert NEEDLE.format(key=answer.strip()) in text and text.endswith(QUESTION)
    again = task(np.random.default_rng(0), 1024, tok, digits=6)
    assert (again[0] == input_ids).all()
    with pytest.raises(ValueError, match="too short"):
        task(np.random.default_rng(0), 64, tok)


# ---------------------------------------------------------------- scoring


def test_exact_match():
    assert scoring.exact_match("12345", "12345")
    assert scoring.exact_match(" 12345. Remember it", "12345")
    assert scoring.exact_match("\n12345\n", "12345")
    assert not scoring.exact_match("1234", "12345")
    assert not scoring.exact_match("123456", "12345")
    assert not scoring.exact_match("the key is 12345", "12345")
    assert not scoring.exact_match("", "12345")
    assert not scoring.exact_match("aBc9", "abc9")  # codes are case-sensitive
    assert scoring.exact_match("AB CD ef", "AB CD")
    with pytest.raises(ValueError):
        scoring.exact_match("x", "  ")


def test_contains_and_recall():
    assert scoring.contains("the key is 12345!", "12345")
    assert scoring.contains("ANSWER: Apple-Pie", "apple-pie")
    assert not scoring.contains("1234 5", "12345")
    assert scoring.recall("AAAAA BBBBB", ["AAAAA", "BBBBB", "CCCCC", "DDDDD"]) == 0.5
    assert scoring.recall("nothing", ["AAAAA"]) == 0.0
    with pytest.raises(ValueError):
        scoring.recall("x", [])


def test_first_token_match():
    blank = {32}.__contains__  # the space byte
    assert scoring.first_token_match([32, 49, 50], [32, 49, 51], blank)
    assert scoring.first_token_match([49, 0], [32, 49], blank)  # leading blanks skipped
    assert not scoring.first_token_match([32, 50], [32, 49], blank)
    assert not scoring.first_token_match([32, 32], [32, 49], blank)  # nothing but blanks
    assert not scoring.first_token_match([32, 49], [49])  # without is_blank: 32 counts
    assert scoring.first_token_match([32, 50], [32, 49])
    assert not scoring.first_token_match([], [49])
    with pytest.raises(ValueError):
        scoring.first_token_match([1], [32], blank)


def test_score_generation():
    s = scoring.score_generation(" 12345 is it", ["12345"], [32, 49], [32, 49], {32}.__contains__)
    assert s == {"exact_match": 1.0, "contains": 1.0, "recall": 1.0, "first_token": 1.0}
    s = scoring.score_generation("AAAAA and CCCCC", ["AAAAA", "BBBBB"])
    assert s == {"exact_match": 0.0, "contains": 0.0, "recall": 0.5}


def test_passkey_training_task_varies_the_answer_position(tok):
    import numpy as np

    from longreach.data.synthetic import IGNORE_INDEX, get_synthetic_task

    task = get_synthetic_task("passkey")
    rng = np.random.default_rng(0)
    fixed = {int(np.argmax(task(rng, 512, tok)[1] != IGNORE_INDEX)) for _ in range(8)}
    varied = {int(np.argmax(task(rng, 512, tok, min_fraction=0.6)[1] != IGNORE_INDEX)) for _ in range(8)}
    assert max(fixed) - min(fixed) <= 10  # the prompt fills the room: the answer barely moves
    assert max(varied) - min(varied) > 60
    assert min(varied) >= 0.6 * 505 / 1.01 - 10
    with pytest.raises(ValueError, match="min_fraction"):
        task(rng, 512, tok, min_fraction=0)
