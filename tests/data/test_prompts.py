"""Passkey prompt families (train / held-out splits), the training task on them, and the
held-out haystack."""

import hashlib
import re
import string

import numpy as np
import pytest

from longreach.data import load_tokenizer
from longreach.data.prompts import (
    FAMILIES,
    HELDOUT,
    INSTRUCTION,
    NEEDLE,
    QUESTION,
    TRAIN,
    WORDS,
    draw_passkey,
    random_key,
)
from longreach.data.synthetic import (
    HELDOUT_PATH,
    IGNORE_INDEX,
    Haystack,
    get_haystack,
    get_synthetic_task,
)

SEQ_LEN = 512
KINDS = ("digits", "word", "hex")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("byte")


@pytest.fixture(scope="module")
def task():
    return get_synthetic_task("passkey")


def _fragments(phrasing: str) -> list[str]:
    """The fixed text of a phrasing: the pieces between its placeholders, long enough to mean
    something (a lone "." or " is " proves nothing)."""
    pieces = re.split(r"\{key\}|\{name\}", phrasing)
    return [p.strip() for p in pieces if len(p.strip()) >= 10]


def _scaffold(spec) -> str:
    """Everything of a prompt but the filler, answers and follow-up questions included."""
    tail = "".join(spec.follow_up(i) for i in range(1, len(spec.questions)))
    return spec.prefix + " ".join(t for _, t in spec.inserts) + spec.suffix + tail


def _specs(split, seeds=range(150)):
    for seed in seeds:
        rng = np.random.default_rng(seed)
        needles = 1 + seed % 4
        yield draw_passkey(rng, split, needles=needles, queries=1 + seed % needles,
                           key_kinds=KINDS)


# ---------------------------------------------------------------- the splits


def test_train_and_heldout_phrasings_are_disjoint():
    train, held = TRAIN.phrasings(), HELDOUT.phrasings()
    for part in ("instructions", "needles", "questions", "names"):
        assert train[part] and held[part], part
        assert not set(train[part]) & set(held[part]), part
        for a in train[part]:
            for b in held[part]:
                assert a not in b and b not in a, (part, a, b)
    # fixed pieces of one split's needles and questions are not pieces of the other's
    train_bits = {f for p in train["needles"] + train["questions"] for f in _fragments(p)}
    held_bits = {f for p in held["needles"] + held["questions"] for f in _fragments(p)}
    assert not train_bits & held_bits
    assert "" in TRAIN.instructions and "" in HELDOUT.instructions  # no instruction is a phrasing
    # the template is the classic prompt, one of the training phrasings
    template = FAMILIES["template"]
    assert template.instructions == (INSTRUCTION,) and template.needles == (NEEDLE,)
    assert "\n\n" + template.questions[0] == QUESTION
    assert INSTRUCTION in TRAIN.instructions and NEEDLE in TRAIN.needles


@pytest.mark.parametrize("split,other", [("train", HELDOUT), ("heldout", TRAIN)])
def test_prompts_never_contain_the_other_splits_phrasings(split, other):
    phrasings = other.phrasings()
    bits = [f for part in ("instructions", "needles", "questions") for p in phrasings[part]
            for f in _fragments(p)]
    assert len(bits) > 10
    seen_names = set()
    for spec in _specs(split):
        text = _scaffold(spec)
        for bit in bits:
            assert bit not in text, (split, bit, text)
        for name in phrasings["names"]:
            assert name not in text
        seen_names.update(n.name for n in spec.needles)
    assert seen_names - {""} <= set(FAMILIES[split].names)


def _pattern(phrasing: str) -> re.Pattern:
    """A phrasing as a regex: its fixed text literal, each placeholder any short text."""
    pieces = re.split(r"\{key\}|\{name\}", phrasing.strip())
    return re.compile(r"[^\n]{1,40}?".join(re.escape(p) for p in pieces))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_phrasing_is_drawn(split):
    family = FAMILIES[split]
    # the composed training family has ~200 phrasings: enough draws to meet each one
    text = "\n".join(_scaffold(spec) for spec in _specs(split, range(4000)))
    for phrasing in (family.needles + family.named_needles + family.questions
                     + family.named_questions + family.instructions + family.named_instructions):
        if phrasing:
            assert _pattern(phrasing).search(text), phrasing


def test_question_cues_and_needles_name_the_asked_key():
    for split in ("train", "heldout"):
        for spec in _specs(split):
            assert len(spec.questions) == len(spec.asked) == len(set(spec.asked))
            keys = [n.key for n in spec.needles]
            assert len(set(keys)) == len(keys)
            names = [n.name for n in spec.needles]
            assert len(set(names)) == len(names)
            for needle in spec.needles:
                assert needle.key in needle.text and needle.name in needle.text
                assert 0.0 <= needle.depth <= 1.0
            for q, i in zip(spec.questions, spec.asked):
                assert not q[-1].isspace() and "pass key" in q.lower()
                assert spec.needles[i].name in q
                assert spec.needles[i].key not in q


def test_keys_of_each_kind():
    rng = np.random.default_rng(0)
    digits = [random_key(rng, "digits", (4, 7)) for _ in range(200)]
    assert all(re.fullmatch(r"[1-9]\d{3,6}", k) for k in digits)
    assert {len(k) for k in digits} == {4, 5, 6, 7}
    assert all(len(random_key(rng, "digits", (8, 9))) in (8, 9) for _ in range(20))
    for _ in range(50):
        first, second = random_key(rng, "word").split("-")
        assert first in WORDS and second in WORDS and first != second
        hexkey = random_key(rng, "hex")
        assert re.fullmatch(r"[0-9a-f]{4}-[0-9a-f]{4}", hexkey)
    with pytest.raises(ValueError, match="key kind"):
        random_key(rng, "emoji")
    kinds = {n.kind for s in _specs("train") for n in s.needles}
    assert kinds == set(KINDS)


def test_draw_passkey_checks_its_options():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="split"):
        draw_passkey(rng, "test")
    with pytest.raises(ValueError, match="queries"):
        draw_passkey(rng, "train", needles=2, queries=3)
    with pytest.raises(ValueError, match="template"):
        draw_passkey(rng, "template", needles=2)
    with pytest.raises(ValueError, match="template"):
        draw_passkey(rng, "template", key_kinds=("word",))
    with pytest.raises(ValueError, match="digits"):
        draw_passkey(rng, "train", digits=[7, 4])
    with pytest.raises(ValueError, match="key kind"):
        draw_passkey(rng, "train", key_kinds=("digits", "roman"))
    spec = draw_passkey(rng, "heldout", instruction=False)
    assert spec.prefix == ""
    lengths = {len(draw_passkey(rng, "heldout", digits=[8, 9]).answers[0]) for _ in range(30)}
    assert lengths == {8, 9}


# ---------------------------------------------------------------- the training task


def test_template_training_sample_is_pinned(task, tok):
    # the classic prompt, sample for sample what it was before splits existed
    pins = {
        (): "a9f74c8dfffd6ab03542d4124481ee41895a08079d18aa473367da338a3108d1",
        (("min_fraction", 0.5),):
            "8037f30cfac255aae0e12fa63752771930010f6e1dc0d18bd6993dec7806ff79",
        (("depth", 0.3), ("digits", 6), ("instruction", False)):
            "7df0734bf291bd5a9fac48bd02ad31c08263dd96a90907af3aa61ee9c23cd3f2",
    }
    for options, digest in pins.items():
        ids, labels = task(np.random.default_rng(11), SEQ_LEN, tok, **dict(options))
        assert hashlib.sha256(ids.tobytes() + labels.tobytes()).hexdigest() == digest, options
    same = task(np.random.default_rng(11), SEQ_LEN, tok, split="template")
    assert (same[0] == task(np.random.default_rng(11), SEQ_LEN, tok)[0]).all()


def test_training_refuses_heldout_split_and_haystack(task, tok):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="held-out prompts are for evaluation only"):
        task(rng, SEQ_LEN, tok, split="heldout")
    for haystack in ("heldout", "python-reference", str(HELDOUT_PATH)):
        with pytest.raises(ValueError, match="held-out haystack"):
            task(rng, SEQ_LEN, tok, split="train", haystack=haystack)
    with pytest.raises(ValueError, match="split"):
        task(rng, SEQ_LEN, tok, split="nope")


def _answers(tok, ids, labels):
    """The labelled runs of a sample, decoded: one per answer (eos as its own id)."""
    scored = np.flatnonzero(labels != IGNORE_INDEX)
    runs = np.split(scored, np.flatnonzero(np.diff(scored) > 1) + 1)
    return [labels[run].tolist() for run in runs]


def _questions(family, named):
    if not named:
        return set(family.questions)
    return {q.format(name=n) for q in family.named_questions for n in family.names}


@pytest.mark.parametrize("needles,queries", [(1, 1), (2, 2), (3, 2), (3, 3), (4, 1)])
def test_multi_needle_labels_cover_exactly_the_answers(task, tok, needles, queries):
    length = SEQ_LEN if needles * queries <= 6 else 1024
    questions = _questions(TRAIN, needles > 1)
    eos = tok.eos_token_id
    for seed in range(6):
        rng = np.random.default_rng(seed)
        ids, labels = task(rng, length, tok, split="train", needles=needles, queries=queries,
                           key_kinds=list(KINDS))
        assert ids.shape == labels.shape == (length,)
        scored = labels != IGNORE_INDEX
        assert (ids[scored] == labels[scored]).all()
        runs = _answers(tok, ids, labels)
        assert len(runs) == queries and runs[-1][-1] == eos and eos not in runs[-1][:-1]
        keys = [tok.decode(run[:-1] if i == queries - 1 else run) for i, run in enumerate(runs)]
        first, last = np.flatnonzero(scored)[[0, -1]]
        assert last + 1 == len(ids) or (ids[last + 1:] == tok.pad_token_id).all()
        prompt = tok.decode(ids[:first].tolist())
        assert any(prompt.endswith("\n\n" + q) for q in questions)
        for key in keys:
            assert key.startswith(" ") and prompt.count(key.strip()) >= 1  # in its needle
            assert len(key.strip()) >= 4 and " " not in key.strip()
        # between two answers: exactly the next question, unlabelled
        gaps = np.split(np.flatnonzero(~scored[first:last]) + first,
                        np.flatnonzero(np.diff(np.flatnonzero(~scored[first:last])) > 1) + 1)
        gaps = [tok.decode(ids[g].tolist()) for g in gaps if len(g)]
        assert len(gaps) == queries - 1
        for gap in gaps:
            assert gap.startswith(". ") and gap[2:] in questions


def test_queries_and_needles_ranges(task, tok):
    counts = set()
    for seed in range(30):
        ids, labels = task(np.random.default_rng(seed), 1024, tok, split="train",
                           needles=[1, 3], queries=[1, 2])
        runs = _answers(tok, ids, labels)
        counts.add(len(runs))
        text = tok.decode(ids[labels == IGNORE_INDEX].tolist())
        assert text.count("pass key") >= 1
    assert counts == {1, 2}
    with pytest.raises(ValueError, match="queries"):
        task(np.random.default_rng(0), 1024, tok, split="train", needles=[1, 3], queries=2)
    with pytest.raises(ValueError, match="needles"):
        task(np.random.default_rng(0), 1024, tok, split="train", needles=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("needles,queries", [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (4, 1)])
def test_training_prompts_fit_512_byte_tokens(task, tok, kind, needles, queries):
    for seed in range(8):
        rng = np.random.default_rng(seed)
        ids, labels = task(rng, SEQ_LEN, tok, split="train", needles=needles, queries=queries,
                           key_kinds=[kind], digits=[4, 9], min_fraction=0.5)
        assert ids.shape == (SEQ_LEN,)
        assert (labels != IGNORE_INDEX).sum() >= queries + 1


def test_short_training_prompts_fit_with_a_bpe_tokenizer_on_code(task, tmp_path):
    # a prompt of ~90 tokens cannot always be hit to 1% (one more filler word of code can add
    # two or three BPE tokens); a training row may come out a few tokens short (it is padded),
    # never long: every draw of 256- and 128-token rows must build
    from pathlib import Path

    import longreach
    from longreach.data import train_bpe_tokenizer

    package = Path(longreach.__file__).parent
    code = "\n".join(p.read_text() for p in sorted(package.glob("data/*.py")))
    (tmp_path / "code.txt").write_text(code)
    bpe = train_bpe_tokenizer(str(tmp_path / "code.txt"), 2000, tmp_path / "tok")
    for seq_len in (128, 256):
        for seed in range(100):
            ids, labels = task(np.random.default_rng(seed), seq_len, bpe, split="train",
                               key_kinds=KINDS, haystack=str(tmp_path / "code.txt"),
                               min_fraction=0.1)
            assert ids.shape == (seq_len,)
            assert (labels != IGNORE_INDEX).sum() >= 2


def test_a_length_that_cannot_be_hit_fits_within_the_excess_it_is_allowed(tok):
    # near the scaffold's size one more filler word overshoots a short target: with no excess
    # some lengths cannot be built at all; a training row (which may be longer than its drawn
    # length, up to its room) accepts the overshoot and stays within it
    from longreach.data.synthetic import build_prompt

    haystack = get_haystack("builtin", tok)
    parts = ("Remember the key. ", [(0.5, "The key is 12345.")], " What is the key?")
    failed = 0
    for length in range(53, 66):
        for seed in range(5):
            try:
                build_prompt(np.random.default_rng(seed), tok, haystack, length, *parts)
            except ValueError as err:
                assert "could not fit" in str(err)
                failed += 1
            _, meta = build_prompt(np.random.default_rng(seed), tok, haystack, length, *parts,
                                   excess=8)
            assert length - 1 <= meta["prompt_tokens"] <= length + 8
    assert failed > 0


def test_too_many_needles_for_the_length_is_a_clear_error(task, tok):
    with pytest.raises(ValueError, match="too short"):
        task(np.random.default_rng(0), SEQ_LEN, tok, split="train", needles=6, queries=6)
    with pytest.raises(ValueError, match="too short"):
        task(np.random.default_rng(0), 48, tok, split="train")


def test_train_split_with_the_heldout_haystack_is_refused_but_eval_reads_it(tok):
    haystack = get_haystack("heldout", tok)
    assert haystack is get_haystack("heldout", tok)
    assert Haystack("python-reference", tok).documents == haystack.documents


# ---------------------------------------------------------------- the held-out haystack


def test_heldout_haystack_is_large_prose_of_another_domain(tok):
    assert HELDOUT_PATH.is_file() and HELDOUT_PATH.stat().st_size < 400_000
    docs = Haystack("heldout", tok).documents
    text = "\n".join(docs)
    assert len(docs) > 50 and len(text.encode("utf-8")) > 200_000
    assert "statement" in text and "Jesus" not in text
    assert "pass key" not in text.lower() and "passkey" not in text.lower()
    letters = sum(c in string.ascii_letters for c in text)
    assert letters > 0.7 * len(text)  # prose, not code
    assert ">>>" not in text and "::=" not in text
    kjv = "\n".join(Haystack("builtin", tok).documents[:50])
    assert docs[0][:200] not in kjv
    filler = get_haystack("heldout", tok).filler(3, 400)
    assert 350 <= len(filler.encode("utf-8")) <= 400
