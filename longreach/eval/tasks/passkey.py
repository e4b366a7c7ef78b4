"""Passkey retrieval (Mohtashami & Jaggi 2023): find a number hidden in long filler text.

The training synthetic task ``"passkey"`` (``longreach.data.synthetic``) builds the same
prompts with the loss on the answer only, so a model can be trained on the format it is
evaluated on.
"""

from __future__ import annotations

from longreach.data.synthetic import INSTRUCTION, NEEDLE, QUESTION, build_prompt, random_digits
from longreach.eval.tasks.base import Sample, register_eval_task


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
