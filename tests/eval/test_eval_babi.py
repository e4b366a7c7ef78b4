"""BABILong-style bAbI stories: facts, order, depth, length, determinism, and the answers
checked by an independent solver that reads the facts back from the prompt."""

import re

import pytest

from longreach.data import byte_tokenizer
from longreach.data.synthetic import sentence_boundaries
from longreach.eval.scoring import score_generation
from longreach.eval.tasks import available_eval_tasks, count_tokens, get_eval_task, make_sample

QA = ["qa1", "qa2", "qa3", "qa4", "qa5"]
FACT = re.compile(
    r"(?P<move>(\w+) (?:moved to|went to|journeyed to|travelled to|went back to) the (\w+)\.)"
    r"|(?P<grab>(\w+) (?:picked up|grabbed|got|took) the (\w+) there\.)"
    r"|(?P<drop>(\w+) (?:dropped|discarded|put down|left) the (\w+)\.)"
    r"|(?P<rel>The (\w+) is (north|south|east|west) of the (\w+)\.)"
    r"|(?P<give>(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.)"
)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _facts(prompt):
    body = prompt[: prompt.rindex("\n\nQuestion:")]
    return [(m.lastgroup, [g for g in m.groups()[m.lastindex :] if g]) for m in FACT.finditer(body)
            if m.group(0)[0].isupper() and m.group(0) == m.group(m.lastgroup)]


def _solve(facts, question):
    """Answer a bAbI question from the facts (an independent reading of the story)."""
    where, carrier, history = {}, {}, {}
    gives, relations = [], []
    for kind, args in facts:
        if kind == "move":
            person, place = args[:2]
            where[person] = place
            for obj, who in carrier.items():
                if who == person:
                    history.setdefault(obj, []).append(place)
        elif kind == "grab":
            person, obj = args[:2]
            carrier[obj] = person
            history[obj] = [where[person]] if person in where else []
        elif kind == "drop":
            carrier.pop(args[1], None)
        elif kind == "rel":
            relations.append(tuple(args[:3]))
        else:
            gives.append(tuple(args[:3]))
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return history[m[1]][-1]
    if m := re.fullmatch(r"Where is (\w+)\?", question):
        return where[m[1]]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        seen = history[m[1]]
        return seen[len(seen) - 1 - seen[::-1].index(m[2]) - 1]
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", question):
        (answer,) = {b for a, d, b in relations if (a, d) == (m[1], m[2])}
        return answer
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
        (answer,) = {a for a, d, b in relations if (d, b) == (m[1], m[2])}
        return answer
    if m := re.fullmatch(r"Who gave the (\w+) to (\w+)\?", question):
        (answer,) = {g for g, o, r in gives if (o, r) == (m[1], m[2])}
        return answer
    if m := re.fullmatch(r"Who did (\w+) give the (\w+) to\?", question):
        (answer,) = {r for g, o, r in gives if (g, o) == (m[1], m[2])}
        return answer
    if m := re.fullmatch(r"What did (\w+) give to (\w+)\?", question):
        (answer,) = {o for g, o, r in gives if (g, r) == (m[1], m[2])}
        return answer
    if m := re.fullmatch(r"Who received the (\w+)\?", question):
        return [r for g, o, r in gives if o == m[1]][-1]
    if m := re.fullmatch(r"Who gave the (\w+)\?", question):
        return [g for g, o, r in gives if o == m[1]][-1]
    raise AssertionError(f"unexpected question {question!r}")


def test_registered_with_containment():
    assert "babi" in available_eval_tasks()
    assert get_eval_task("babi").metric == "contains"


@pytest.mark.parametrize("qa", QA)
def test_story_answer_matches_independent_solver(tok, qa):
    for seed in range(12):
        sample = make_sample("babi", tok, 1024, 0.5, seed=seed, qa=qa)
        facts = sample.metadata["facts"]
        assert [f.strip() for f in facts] == facts and len(set(facts)) == len(facts)
        for fact in facts:
            assert sample.prompt.count(fact) == 1
        # read back from the prompt, in story order
        parsed = _facts(sample.prompt)
        assert len(parsed) == len(facts)
        question = sample.metadata["question"]
        assert sample.prompt.endswith(f"Question: {question}\nAnswer:")
        assert _solve(parsed, question) == sample.answer == sample.answers[0]
        assert re.fullmatch(r"[A-Za-z]+", sample.answer)
        assert set(sample.metadata["supporting_facts"]) <= set(facts)


@pytest.mark.parametrize("qa", QA)
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_facts_in_order_around_depth_and_length(tok, qa, depth):
    for length in (1024, 4000):
        sample = make_sample("babi", tok, length, depth, seed=1, qa=f"{qa}")
        assert abs(count_tokens(tok, sample.prompt) - length) <= 0.01 * length
        facts = sample.metadata["facts"]
        positions = [sample.prompt.index(f) for f in facts]
        assert positions == sorted(positions)
        anchor = facts.index(sample.metadata["supporting_facts"][0])
        assert sample.metadata["depth"] == depth
        # within one sentence of the requested fraction of the filler
        filler = sample.prompt[sample.prompt.index("\n\n") + 2 : sample.prompt.rindex("\n\nQ")]
        for fact in facts:
            filler = filler.replace(fact, "")
        bounds = sentence_boundaries(filler)
        longest = max(b - a for a, b in zip(bounds, bounds[1:])) + len(facts)
        assert abs(sample.metadata["needle_depth_actual"] - depth) * len(filler) <= longest
        body_start = sample.prompt.index("\n\n") + 2
        if depth == 0.0:
            assert positions[anchor] == body_start + sum(len(f) + 1 for f in facts[:anchor])


def test_deterministic_and_seed_dependent(tok):
    a = make_sample("babi", tok, 1024, 0.5, seed=3, qa="qa2")
    b = make_sample("babi", tok, 1024, 0.5, seed=3, qa="qa2")
    c = make_sample("babi", tok, 1024, 0.5, seed=4, qa="qa2")
    assert a.prompt == b.prompt and a.answer == b.answer
    assert c.prompt != a.prompt and c.metadata["facts"] != a.metadata["facts"]
    assert make_sample("babi", tok, 1024, 0.5, seed=3, qa=2).prompt == a.prompt  # qa=2 works too


def test_containment_scoring(tok):
    sample = make_sample("babi", tok, 1024, 0.5, seed=0, qa="qa1")
    right = score_generation(f" The {sample.answer.upper()}.", sample.answers)
    assert right["contains"] == 1.0
    wrong = "nowhere" if sample.answer != "nowhere" else "kitchen"
    assert score_generation(f" {wrong}", sample.answers)["contains"] == 0.0


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="babi qa must be one of"):
        make_sample("babi", tok, 1024, 0.5, qa="qa7")
    with pytest.raises(ValueError, match="too short"):
        make_sample("babi", tok, 200, 0.5, qa="qa3")
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        make_sample("babi", tok, 1024, 1.5)
