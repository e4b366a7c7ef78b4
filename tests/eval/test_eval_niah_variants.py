"""RULER niah multivalue / multiquery: needles, depth, length, determinism, scoring."""

import re
import uuid

import pytest

from longreach.data import byte_tokenizer
from longreach.data.synthetic import sentence_boundaries
from longreach.eval.scoring import score_generation
from longreach.eval.tasks import available_eval_tasks, count_tokens, get_eval_task, make_sample
from longreach.eval.tasks.niah import INSTRUCTION, NEEDLE

PATTERNS = {"number": r"\d{7}", "word": r"[a-z]+-[a-z]+", "uuid": r"[0-9a-f-]{36}"}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _needles(sample):
    kind = sample.metadata["value_type"] + "s"
    return re.findall(
        rf"One of the special magic {kind} for ([a-z]+-[a-z]+) is: ({PATTERNS[sample.metadata['value_type']]})\.",
        sample.prompt,
    )


def test_variants_registered_with_recall():
    assert {"niah_multivalue", "niah_multiquery"} <= set(available_eval_tasks())
    for name in ("niah", "niah_multivalue", "niah_multiquery"):
        assert get_eval_task(name).metric == "recall"


@pytest.mark.parametrize("value_type", ["number", "word", "uuid"])
def test_multivalue(tok, value_type):
    sample = make_sample("niah", tok, 2048, 0.5, seed=3, value_type=value_type, values=4)
    key = sample.metadata["key"]
    assert len(sample.answers) == 4 and len(set(sample.answers)) == 4
    needles = _needles(sample)
    assert sorted(v for k, v in needles if k == key) == sorted(sample.answers)
    for value in sample.answers:
        assert re.fullmatch(PATTERNS[value_type], value)
        if value_type == "uuid":
            assert str(uuid.UUID(value)) == value
        assert sample.prompt.count(NEEDLE.format(kind=value_type + "s", key=key, value=value)) == 1
        assert sample.prompt.count(value) == 1
    assert sample.prompt.endswith(f"for {key} mentioned in the provided text are")


def test_multiquery_with_distractors(tok):
    sample = make_sample("niah", tok, 2048, 0.25, seed=1, keys=5, queries=3, values=2)
    queried = sample.metadata["queried_keys"]
    assert len(queried) == 3 and sample.metadata["keys"] == 5
    needles = _needles(sample)
    assert len(needles) == 10 and len({v for _, v in needles}) == 10
    assert sorted(v for k, v in needles if k in queried) == sorted(sample.answers)
    assert len(sample.answers) == 6
    assert sorted(v for k, v in needles if k not in queried) == sorted(sample.metadata["distractors"])
    assert f"for {queried[0]}, {queried[1]}, and {queried[2]} mentioned" in sample.prompt
    # queries above keys: every key is queried, none is a distractor
    both = make_sample("niah", tok, 2048, 0.5, seed=1, queries=2)
    assert both.metadata["keys"] == 2 and both.metadata["distractors"] == []
    assert " and ".join(both.metadata["queried_keys"]) in both.prompt


@pytest.mark.parametrize("task,options", [("niah", {"values": 3}), ("niah", {"queries": 3}),
                                          ("niah_multivalue", {}), ("niah_multiquery", {})])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_first_needle_at_depth_and_length(tok, task, options, depth):
    for length in (2048, 6000):
        sample = make_sample(task, tok, length, depth, seed=2, **options)
        assert sample.task == task
        assert abs(count_tokens(tok, sample.prompt) - length) <= 0.01 * length
        kind = sample.metadata["value_type"] + "s"
        first = NEEDLE.format(kind=kind, key=sample.metadata["key"], value=sample.answers[0])
        instruction = INSTRUCTION.format(kind=kind)
        assert sample.prompt.startswith(instruction)
        body = sample.prompt[len(instruction) : sample.prompt.index("\n\nWhat are all")]
        assert body.count(first) == 1
        pos = body.index(first)
        others = [m.group(0) for m in re.finditer(r"One of the special magic [^.]*\.", body)]
        filler = body
        for needle in others:
            filler = filler.replace(needle, "")
        bounds = sentence_boundaries(filler)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        # other needles may sit before it: allow for their length too
        before = sum(len(n) + 1 for n in others if body.index(n) < pos and n != first)
        assert abs(pos - before - depth * len(filler)) <= longest + 2 * len(others) + 2


def test_deterministic_and_seed_dependent(tok):
    a = make_sample("niah", tok, 2048, 0.5, seed=4, values=3, queries=2)
    b = make_sample("niah", tok, 2048, 0.5, seed=4, values=3, queries=2)
    c = make_sample("niah", tok, 2048, 0.5, seed=5, values=3, queries=2)
    assert a.prompt == b.prompt and a.answers == b.answers
    assert c.prompt != a.prompt and c.answers != a.answers


def test_single_and_multikey_samples_unchanged_by_the_new_options(tok):
    # values=1, queries=1 draw the same random numbers as before the variants existed
    a = make_sample("niah", tok, 2048, 0.5, seed=5, keys=3)
    b = make_sample("niah", tok, 2048, 0.5, seed=5, keys=3, values=1, queries=1)
    assert a.prompt == b.prompt and len(a.answers) == 1


def test_recall_scoring():
    answers = ["1234567", "7654321", "1111111", "2222222"]
    scores = score_generation(" 1234567, 7654321 and 9999999", answers)
    assert scores["recall"] == 0.5 and scores["contains"] == 0.0
    assert score_generation(" 2222222 1111111 7654321 1234567.", answers)["recall"] == 1.0
    assert score_generation(" none", answers)["recall"] == 0.0


def test_bad_counts(tok):
    for option in ("values", "queries", "keys"):
        with pytest.raises(ValueError, match=option):
            make_sample("niah", tok, 2048, 0.5, **{option: 0})
    with pytest.raises(ValueError, match="too short"):
        make_sample("niah", tok, 600, 0.5, values=8, value_type="uuid")

