"""Copy: repeat a random code (letters and digits, no words to guess) seen far back."""

from __future__ import annotations

import string

import numpy as np

from longreach.data.synthetic import build_prompt
from longreach.eval.tasks.base import Sample, register_eval_task

INSTRUCTION = "A code to copy is hidden in the following text. Memorize it exactly.\n\n"
NEEDLE = "The code to copy is {code} (end of code)."
QUESTION = "\n\nRepeat the code to copy exactly. The code is"
ALPHABET = np.array(list(string.ascii_letters + string.digits))


@register_eval_task("copy", metric="exact_match", chars=16,
                    description="repeat a random alphanumeric code exactly")
def copy(rng, tokenizer, haystack, length, depth, *, chars=16) -> Sample:
    chars = int(chars)
    if chars < 1:
        raise ValueError(f"copy chars must be >= 1, got {chars}")
    code = "".join(ALPHABET[rng.integers(0, len(ALPHABET), size=chars)])
    prompt, meta = build_prompt(
        rng, tokenizer, haystack, length,
        prefix=INSTRUCTION, inserts=[(depth, NEEDLE.format(code=code))], suffix=QUESTION,
    )
    meta["chars"] = chars
    return Sample("copy", prompt, code, [code], meta)
