"""Multi-hop retrieval: follow a chain of boxes, each holding the key to the next.

The facts of a chain are scattered through the filler (its first fact at ``depth``, the
others anywhere), with distractor chains built the same way.
"""

from __future__ import annotations

from longreach.data.synthetic import build_prompt
from longreach.eval.tasks.base import Sample, register_eval_task
from longreach.eval.tasks.words import WORDS, distinct_numbers

INSTRUCTION = (
    "Some boxes hold the key to another box, and the last box of each chain holds a number. "
    "The facts are hidden within the following text. Memorize them.\n\n"
)
LINK = "The {a} box holds the key to the {b} box."
END = "The {a} box holds the number {value}."
QUESTION = (
    "\n\nStart at the {start} box and follow the keys to the last box. What number does it "
    "hold? The number is"
)


@register_eval_task("multihop", metric="exact_match", hops=2, distractors=2,
                    description="2- or 3-hop box chains with distractor chains")
def multihop(rng, tokenizer, haystack, length, depth, *, hops=2, distractors=2) -> Sample:
    hops, distractors = int(hops), int(distractors)
    if hops < 1 or distractors < 0:
        raise ValueError(f"multihop needs hops >= 1, distractors >= 0; got {hops}, {distractors}")
    chains = 1 + distractors
    if hops * chains > len(WORDS):
        raise ValueError(f"multihop: {chains} chains of {hops} hops need too many box names")
    names = [WORDS[int(i)] for i in rng.permutation(len(WORDS))[: hops * chains]]
    values = distinct_numbers(rng, chains)
    inserts = []
    for c in range(chains):
        boxes = names[c * hops : (c + 1) * hops]
        facts = [LINK.format(a=a, b=b) for a, b in zip(boxes, boxes[1:])]
        facts.append(END.format(a=boxes[-1], value=values[c]))
        fractions = [float(f) for f in rng.random(len(facts))]
        if c == 0:
            fractions[0] = depth
        inserts += list(zip(fractions, facts))
    prompt, meta = build_prompt(
        rng, tokenizer, haystack, length,
        prefix=INSTRUCTION, inserts=inserts, suffix=QUESTION.format(start=names[0]),
    )
    meta.update({"hops": hops, "distractors": distractors, "start": names[0],
                 "distractor_values": values[1:]})
    return Sample("multihop", prompt, values[0], [values[0]], meta)
