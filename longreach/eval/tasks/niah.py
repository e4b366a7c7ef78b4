"""RULER-style needle in a haystack: single, multikey (distractor needles), multivalue (several
values for the queried key) and multiquery (several keys asked at once)."""

from __future__ import annotations

import uuid

import numpy as np

from longreach.data.synthetic import build_prompt
from longreach.eval.tasks.base import Sample, register_eval_task
from longreach.eval.tasks.words import WORDS

VALUE_NAMES = {"number": "numbers", "word": "words", "uuid": "uuids"}
INSTRUCTION = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize "
    "it. I will quiz you about the {kind} afterwards.\n\n"
)
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
QUESTION = (
    "\n\nWhat are all the special magic {kind} for {key} mentioned in the provided text? "
    "The special magic {kind} for {key} mentioned in the provided text are"
)


def _value(rng: np.random.Generator, value_type: str) -> str:
    if value_type == "number":
        return str(int(rng.integers(1_000_000, 10_000_000)))
    if value_type == "word":
        return "-".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=2))
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _distinct_keys(rng: np.random.Generator, n: int) -> list[str]:
    keys: list[str] = []
    while len(keys) < n:
        key = "-".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=2))
        if key not in keys:
            keys.append(key)
    return keys


def _join_keys(keys: list[str]) -> str:
    """RULER's query wording: "a", "a and b", "a, b, and c"."""
    if len(keys) <= 2:
        return " and ".join(keys)
    return ", ".join(keys[:-1]) + ", and " + keys[-1]


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"niah {name} must be an integer >= 1, got {value!r}")
    return int(value)


@register_eval_task("niah", metric="recall", value_type="number", keys=1, values=1, queries=1,
                    description="RULER needles: single, multikey, multivalue, multiquery")
def niah(rng, tokenizer, haystack, length, depth, *, value_type="number", keys=1, values=1,
         queries=1) -> Sample:
    """RULER's needle family. Every key has ``values`` needles (multivalue when > 1); the
    question asks for the first ``queries`` keys (multiquery when > 1); the other keys up to
    ``max(keys, queries)`` are distractors (multikey). The answer is every value of the
    queried keys, scored by recall (RULER's ``string_match_all``). The first queried needle
    sits at ``depth``, the others at random depths."""
    if value_type not in VALUE_NAMES:
        raise ValueError(f"niah value_type must be one of {sorted(VALUE_NAMES)}, got {value_type!r}")
    keys = _check_count("keys (1 = single needle)", keys)
    per_key, queries = _check_count("values", values), _check_count("queries", queries)
    keys = max(keys, queries)
    kind = VALUE_NAMES[value_type]
    names = _distinct_keys(rng, keys)
    # one value per key first (the single / multikey draw order, so their samples stay put),
    # then the extra values of multivalue
    drawn: list[str] = []
    while len(drawn) < keys * per_key:
        value = _value(rng, value_type)
        if value not in drawn:
            drawn.append(value)
    key_values = [[drawn[k]] + drawn[keys + k * (per_key - 1) : keys + (k + 1) * (per_key - 1)]
                  for k in range(keys)]
    needles = [(names[k], v) for k in range(keys) for v in key_values[k]]
    fractions = [depth] + [float(f) for f in rng.random(len(needles) - 1)]
    inserts = [(f, NEEDLE.format(kind=kind, key=k, value=v))
               for f, (k, v) in zip(fractions, needles)]
    queried = names[:queries]
    prompt, meta = build_prompt(
        rng, tokenizer, haystack, length,
        prefix=INSTRUCTION.format(kind=kind),
        inserts=inserts,
        suffix=QUESTION.format(kind=kind, key=_join_keys(queried)),
    )
    answers = [v for k in range(queries) for v in key_values[k]]
    meta.update({"value_type": value_type, "keys": keys, "values": per_key,
                 "queries": queries, "key": names[0], "queried_keys": queried,
                 "distractors": [v for k in range(queries, keys) for v in key_values[k]]})
    return Sample("niah", prompt, " ".join(answers), answers, meta)


def _variant(name: str, **defaults):
    def build(rng, tokenizer, haystack, length, depth, **options) -> Sample:
        sample = niah(rng, tokenizer, haystack, length, depth, **options)
        sample.task = name
        return sample

    return register_eval_task(name, metric="recall", description=f"RULER {name}", **defaults)(build)


# RULER's named variants: the niah task with their default option values
niah_multivalue = _variant("niah_multivalue", value_type="number", keys=1, values=4, queries=1)
niah_multiquery = _variant("niah_multiquery", value_type="number", keys=4, values=1, queries=4)
