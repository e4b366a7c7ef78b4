"""Passkey retrieval (Mohtashami & Jaggi 2023): find a number hidden in long filler text.

Also registered as the training synthetic task ``"passkey"`` (same prompt family, loss only
on the answer), so a model can be trained on the format it is evaluated on.
"""

from __future__ import annotations

import numpy as np

from longreach.data.synthetic import IGNORE_INDEX, register_synthetic_task
from longreach.eval.tasks.base import Sample, build_prompt, register_eval_task
from longreach.eval.tasks.haystack import get_haystack

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"


def random_digits(rng: np.random.Generator, digits: int) -> str:
    """A ``digits``-digit number with no leading zero."""
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive integer, got {digits!r}")
    first = str(int(rng.integers(1, 10)))
    return first + "".join(str(int(d)) for d in rng.integers(0, 10, size=digits - 1))


@register_eval_task("passkey", metric="exact_match", digits=5, instruction=True,
                    description="pass key hidden in filler; exact match and first-token accuracy")
def passkey(rng, tokenizer, haystack, length, depth, *, digits=5, instruction=True) -> Sample:
    key = random_digits(rng, int(digits))
    prompt, meta = build_prompt(
        rng, tokenizer, haystack, length,
        prefix=INSTRUCTION if instruction else "",
        inserts=[(depth, NEEDLE.format(key=key))],
        suffix=QUESTION,
    )
    return Sample("passkey", prompt, key, [key], {**meta, "digits": int(digits)})


@register_synthetic_task("passkey")
def passkey_training_task(
    rng: np.random.Generator,
    seq_len: int,
    tokenizer,
    *,
    digits: int = 5,
    haystack: str = "builtin",
    instruction: bool = True,
    depth: float | None = None,
    min_fraction: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A passkey prompt followed by `` {key}<eos>``, labels only on the key (and eos).

    The needle depth is uniform in [0, 1] unless ``depth`` is given. The prompt fills the room
    left after the answer, or, with ``min_fraction < 1``, a length drawn uniformly from
    [min_fraction, 1] of that room, so the answer does not always sit at the same position
    (a model trained on one position learns that position); the slack is padded and unscored.
    """
    if not 0.0 < float(min_fraction) <= 1.0:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction!r}")
    depth = float(rng.random()) if depth is None else float(depth)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    key = random_digits(rng, int(digits))
    answer = tokenizer.encode(" " + key, add_special_tokens=False) + [eos]
    room = seq_len - len(answer)
    if min_fraction < 1.0:
        room = int(room * (min_fraction + (1.0 - min_fraction) * float(rng.random())))
    target = int(room / 1.01)  # the prompt may come out up to 1% long
    prompt, _ = build_prompt(
        rng, tokenizer, get_haystack(haystack, tokenizer), target,
        prefix=INSTRUCTION if instruction else "",
        inserts=[(depth, NEEDLE.format(key=key))],
        suffix=QUESTION,
    )
    prompt_ids = tokenizer.encode(prompt)
    if len(prompt_ids) > room:
        raise ValueError(f"seq_len={seq_len} is too short for the passkey task")
    ids = prompt_ids + answer
    input_ids = np.full(seq_len, pad, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    input_ids[: len(ids)] = ids
    labels[len(prompt_ids) : len(ids)] = answer
    return input_ids, labels
