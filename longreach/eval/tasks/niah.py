"""RULER-style needle in a haystack: single needle, or multikey with distractor needles."""

from __future__ import annotations

import uuid

import numpy as np

from longreach.eval.tasks.base import Sample, build_prompt, register_eval_task
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


@register_eval_task("niah", metric="contains", value_type="number", keys=1,
                    description="RULER single/multikey needle (values: number, word, uuid)")
def niah(rng, tokenizer, haystack, length, depth, *, value_type="number", keys=1) -> Sample:
    if value_type not in VALUE_NAMES:
        raise ValueError(f"niah value_type must be one of {sorted(VALUE_NAMES)}, got {value_type!r}")
    keys = int(keys)
    if keys < 1:
        raise ValueError(f"niah keys must be >= 1 (1 = single needle), got {keys}")
    kind = VALUE_NAMES[value_type]
    names = _distinct_keys(rng, keys)
    values: list[str] = []
    while len(values) < keys:
        value = _value(rng, value_type)
        if value not in values:
            values.append(value)
    # the queried needle goes at `depth`, the distractors anywhere
    fractions = [depth] + [float(f) for f in rng.random(keys - 1)]
    inserts = [(f, NEEDLE.format(kind=kind, key=k, value=v))
               for f, k, v in zip(fractions, names, values)]
    prompt, meta = build_prompt(
        rng, tokenizer, haystack, length,
        prefix=INSTRUCTION.format(kind=kind),
        inserts=inserts,
        suffix=QUESTION.format(kind=kind, key=names[0]),
    )
    meta.update({"value_type": value_type, "keys": keys, "key": names[0],
                 "distractors": values[1:]})
    return Sample("niah", prompt, values[0], [values[0]], meta)
