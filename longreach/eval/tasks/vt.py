"""RULER variable tracking: follow chains ``VAR B = VAR A`` back to a value."""

from __future__ import annotations

import string

import numpy as np

from longreach.data.synthetic import build_prompt
from longreach.eval.tasks.base import Sample, register_eval_task
from longreach.eval.tasks.words import distinct_numbers

INSTRUCTION = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
)
QUESTION = (
    "\n\nQuestion: Find all variables that are assigned the value {value} in the text above. "
    "Answer: According to the chain(s) of variable assignment in the text above, {n} "
    "variables are assigned the value {value}, they are:"
)


def _names(rng: np.random.Generator, n: int) -> list[str]:
    letters = np.array(list(string.ascii_uppercase))
    names: list[str] = []
    while len(names) < n:
        name = "".join(letters[rng.integers(0, 26, size=5)])
        if name not in names:
            names.append(name)
    return names


def _chain(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [
        f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])
    ]


@register_eval_task("vt", metric="recall", hops=4, chains=1,
                    description="RULER variable tracking; recall of the chain's variable names")
def vt(rng, tokenizer, haystack, length, depth, *, hops=4, chains=1) -> Sample:
    hops, chains = int(hops), int(chains)
    if hops < 1 or chains < 1:
        raise ValueError(f"vt needs hops >= 1 and chains >= 1, got hops={hops}, chains={chains}")
    names = _names(rng, (hops + 1) * chains)
    values = distinct_numbers(rng, chains)
    inserts = []
    for c in range(chains):
        chain = _chain(names[c * (hops + 1) : (c + 1) * (hops + 1)], values[c])
        # the queried chain starts at `depth` and runs forward; distractor chains go anywhere
        if c == 0:
            fractions = [depth] + sorted(float(f) for f in rng.uniform(depth, 1.0, size=hops))
        else:
            fractions = sorted(float(f) for f in rng.random(hops + 1))
        inserts += list(zip(fractions, chain))
    answers = names[: hops + 1]
    prompt, meta = build_prompt(
        rng, tokenizer, haystack, length,
        prefix=INSTRUCTION, inserts=inserts,
        suffix=QUESTION.format(value=values[0], n=hops + 1),
    )
    meta.update({"hops": hops, "chains": chains, "value": values[0]})
    return Sample("vt", prompt, " ".join(answers), answers, meta)
