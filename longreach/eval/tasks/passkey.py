"""Passkey retrieval (Mohtashami & Jaggi 2023): find a key hidden in long filler text.

``split`` picks the phrasings (``longreach.data.prompts``): ``template`` is the classic
prompt (the default), ``train`` the phrasings training may use, ``heldout`` phrasings no
training task uses; with ``--haystack heldout`` the filler is unseen too. The training
synthetic task ``"passkey"`` (``longreach.data.synthetic``) builds the same prompts with the
loss on the answer only, so a model can be trained on the format it is evaluated on.
"""

from __future__ import annotations

from longreach.data.prompts import SPLITS, draw_passkey
from longreach.data.synthetic import INSTRUCTION, NEEDLE, QUESTION, build_prompt
from longreach.eval.tasks.base import Sample, register_eval_task

__all__ = ["INSTRUCTION", "NEEDLE", "QUESTION", "passkey"]


@register_eval_task("passkey", metric="exact_match", digits=None, instruction=True,
                    split="template", needles=1, key_kind="digits",
                    description="pass key hidden in filler; exact match and first-token accuracy")
def passkey(rng, tokenizer, haystack, length, depth, *, digits=None, instruction=True,
            split="template", needles=1, key_kind="digits") -> Sample:
    """One key to retrieve; with ``needles > 1`` the others are distractors naming other
    subjects. ``digits`` (an int or ``[lo, hi]``) defaults to 5 for ``template`` and to the
    training range 4-7 otherwise (``[8, 9]`` tests longer keys than training saw)."""
    if split not in SPLITS:
        raise ValueError(f"unknown passkey split {split!r}; use one of {', '.join(SPLITS)}")
    if not isinstance(key_kind, str):
        raise ValueError(f"key_kind must be one kind (digits, word or hex), got {key_kind!r}")
    spec = draw_passkey(rng, split, needles=needles, key_kinds=(key_kind,), digits=digits,
                        instruction=instruction, depth=depth)
    prompt, meta = build_prompt(rng, tokenizer, haystack, length, prefix=spec.prefix,
                                inserts=spec.inserts, suffix=spec.suffix)
    asked = spec.needles[spec.asked[0]]
    key = asked.key
    return Sample("passkey", prompt, key, [key], {
        **meta,
        "digits": len(key) if asked.kind == "digits" else None,
        "split": split,
        "key": key,
        "keys": [n.key for n in spec.needles],
        "key_kind": asked.kind,
        "needles": [n.text for n in spec.needles],
        "needle_text": asked.text,
    })
