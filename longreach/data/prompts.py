"""Passkey prompt families: phrasings with a training split and a held-out split.

A passkey prompt is an instruction, needles hidden in filler text, and a question ending in
an answer cue after which the model writes `` {key}``. A :class:`PromptFamily` lists the
phrasings of each part; the splits are:

- ``template``: today's one classic prompt (:data:`INSTRUCTION`, :data:`NEEDLE`,
  :data:`QUESTION`), one needle, digit keys. The default of the training and eval tasks.
- ``train``: hundreds of phrasings, composed from pieces (ways of asking x answer cues,
  needle sentences x follow-ups; the classic ones among them), named needles for prompts with
  several needles, and keys of three kinds.
- ``heldout``: other sentence templates for every part and other names, none shared with
  ``train``, that still speak of a "pass key", so a model trained on ``train`` can in
  principle answer them. Training tasks refuse this split: it is for evaluation only.

:func:`draw_passkey` draws one prompt's pieces (:class:`PasskeySpec`); the training task
``passkey`` (``longreach.data.synthetic``) and the eval task ``passkey``
(``longreach.eval.tasks.passkey``) both build their prompts from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------- the classic prompt
# Mohtashami & Jaggi 2023: a number hidden in long filler text.

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n\n"
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION_SEPARATOR = "\n\n"  # between the filler and the first question
QUESTION = QUESTION_SEPARATOR + "What is the pass key? The pass key is"
ANSWER_SEPARATOR = ". "  # between an answer and the next question (several queries)

# Words for ``word`` keys (offline; the order is part of the seeds). The eval tasks' word
# lists (``longreach.eval.tasks.words``) are these.
WORDS = (
    "apple anchor badge bamboo barrel beacon bicycle blanket bottle bucket cabin candle "
    "canyon carpet castle cedar chalk cherry circle cliff cloud comet copper cotton crystal "
    "desert diamond dolphin dragon eagle ember engine falcon feather fiddle forest fossil "
    "garden garlic glacier granite harbor hammer helmet island ivory jacket jasmine jungle "
    "kettle ladder lantern lemon marble meadow mirror monkey needle oasis orbit orchid "
    "paddle parrot pebble pepper pillow planet pocket puzzle quartz rabbit raven ribbon "
    "river rocket saddle salmon shadow silver spider spoon summit tablet teapot thunder "
    "timber tomato tunnel turtle velvet violin walnut whistle window winter wizard zebra"
).split()

KEY_KINDS = ("digits", "word", "hex")
SPLITS = ("template", "train", "heldout")
_HEX = "0123456789abcdef"


@dataclass(frozen=True)
class PromptFamily:
    """The phrasings of one split.

    ``instructions`` (``""`` = none) and ``needles`` (with ``{key}``) and ``questions`` serve
    prompts with one needle; the ``named_*`` variants (with ``{name}``, one of ``names``) serve
    prompts with several needles, each naming its subject. Every question ends in an answer
    cue: the model's next words are `` {key}``. ``digits`` is the default range of digit-key
    lengths.
    """

    split: str
    instructions: tuple[str, ...]
    needles: tuple[str, ...]
    questions: tuple[str, ...]
    named_instructions: tuple[str, ...] = ()
    named_needles: tuple[str, ...] = ()
    named_questions: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    digits: tuple[int, int] = (4, 7)

    def phrasings(self) -> dict[str, tuple[str, ...]]:
        """Every phrasing by part (the empty instruction left out)."""
        parts = {
            "instructions": self.instructions + self.named_instructions,
            "needles": self.needles + self.named_needles,
            "questions": self.questions + self.named_questions,
            "names": self.names,
        }
        return {part: tuple(p for p in dict.fromkeys(items) if p) for part, items in parts.items()}


TEMPLATE = PromptFamily(
    split="template",
    instructions=(INSTRUCTION,),
    needles=(NEEDLE,),
    questions=(QUESTION[len(QUESTION_SEPARATOR):],),
    digits=(5, 5),
)

# The training phrasings are composed: every way of asking joined with every answer cue,
# every needle sentence with every follow-up, so a model trained on them meets hundreds of
# prompts, not a handful, and cannot lean on one cue ("... is") to know where the key goes.
# None of their pieces is a piece of the held-out phrasings (tests/data/test_prompts.py).


def _compose(heads: tuple[str, ...], tails: tuple[str, ...], sep: str = " ") -> tuple[str, ...]:
    """Every ``head + sep + tail`` (a tail of ``""`` adds nothing), heads outermost."""
    return tuple(head + (sep + tail if tail else "") for head in heads for tail in tails)


_TRAIN_ASKS = (
    "What is the pass key?", "What was the pass key?", "Now tell me the pass key.",
    "Tell me the pass key from the text.", "Do you remember the pass key?",
    "What pass key did the text hide?", "Repeat the pass key.", "Give me the pass key, please.",
)
_TRAIN_CUES = (
    "The pass key is", "It was", "It is", "The pass key was", "The answer is", "Sure, it is",
    "Reply:", "Response:", "A:", "Output:", "Result:",
)
_TRAIN_NEEDLES = (
    "The pass key is {key}.", "Remember this pass key: {key}.", "Here is the pass key: {key}.",
    "{key} is the pass key.", "The secret pass key is {key}.", "Your pass key is {key}.",
    "Pass key = {key}.", "The pass key for today is {key}.",
)
_TRAIN_NEEDLE_TAILS = (
    "", "Remember it.", "Keep it in mind.", "Remember it. {key} is the pass key.",
    "Don't lose it.",
)
_TRAIN_NAMED_ASKS = (
    "What is the pass key of {name}?", "What was the pass key for {name}?",
    "Now tell me the pass key of {name}.", "Which pass key does {name} have?",
    "Tell me the pass key for {name}.", "Do you remember the pass key of {name}?",
)
_TRAIN_NAMED_CUES = (
    "The pass key of {name} is", "It was", "It is", "The answer is", "Reply:", "Response:",
    "A:", "Output:",
)
_TRAIN_NAMED_NEEDLES = (
    "The pass key of {name} is {key}.", "The pass key for {name} is {key}.",
    "Remember the pass key of {name}: {key}.", "{key} is the pass key of {name}.",
    "For {name}, the pass key is {key}.", "{name} has the pass key {key}.",
)

TRAIN = PromptFamily(
    split="train",
    instructions=(
        INSTRUCTION,
        "A pass key is hidden in the text below. Remember it.\n\n",
        "Read the text and keep the pass key in it in mind.\n\n",
        "Find the pass key in this text.\n\n",
        "The text below contains a pass key; you will be asked for it.\n\n",
        "Pay attention: a pass key is hidden in this text.\n\n",
        "",
    ),
    needles=_compose(_TRAIN_NEEDLES, _TRAIN_NEEDLE_TAILS),
    questions=_compose(_TRAIN_ASKS, _TRAIN_CUES),
    named_instructions=(
        "Pass keys for several things are hidden in the text below. Remember them all.\n\n",
        "Read the text and keep every pass key in it in mind.\n\n",
        "Each of several things has a pass key in this text. Find them.\n\n",
        "",
    ),
    named_needles=_compose(_TRAIN_NAMED_NEEDLES, _TRAIN_NEEDLE_TAILS[:3]),
    named_questions=_compose(_TRAIN_NAMED_ASKS, _TRAIN_NAMED_CUES),
    names=(
        "the blue door", "the red box", "the green gate", "the old safe", "the small chest",
        "the back room", "the front desk", "the iron locker", "the tall cabinet",
        "the west wing",
    ),
)

HELDOUT = PromptFamily(
    split="heldout",
    instructions=(
        "Somewhere in the passage below sits a pass key. Look out for it.\n\n",
        "Memorize any pass key you come across in the following document.\n\n",
        "",
    ),
    needles=(
        "Important: the pass key to write down is {key}.",
        "(Note for the reader: {key} serves as the pass key.)",
        "Please do not forget that your pass key equals {key}.",
    ),
    questions=(
        "Which pass key appeared in the passage? Answer:",
        "Question: what pass key was mentioned above? Pass key:",
        "Recall the pass key from the passage. That pass key was",
    ),
    named_instructions=(
        "The passage below mentions pass keys for several items. Memorize each one.\n\n",
        "Keep track of which pass key goes with which item in the following document.\n\n",
        "",
    ),
    named_needles=(
        "Important: {name} uses the pass key {key}.",
        "(Note for the reader: the pass key that opens {name} is {key}.)",
        "Do not forget: {key} is the pass key assigned to {name}.",
    ),
    named_questions=(
        "Which pass key was assigned to {name}? Answer:",
        "Question: what pass key opens {name}? Pass key:",
        "Recall the pass key given for {name}. That pass key was",
    ),
    names=(
        "the silver vault", "the wooden shed", "the north tower", "the yellow van",
        "the glass case", "the empty garage", "the brass drawer", "the top shelf",
        "the cellar hatch", "the side entrance",
    ),
)

FAMILIES = {family.split: family for family in (TEMPLATE, TRAIN, HELDOUT)}


def get_family(split: str) -> PromptFamily:
    if split not in FAMILIES:
        raise ValueError(f"unknown passkey split {split!r}; use one of {', '.join(SPLITS)}")
    return FAMILIES[split]


# ---------------------------------------------------------------- keys


def random_digits(rng: np.random.Generator, digits: int) -> str:
    """A ``digits``-digit number with no leading zero."""
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive integer, got {digits!r}")
    first = str(int(rng.integers(1, 10)))
    return first + "".join(str(int(d)) for d in rng.integers(0, 10, size=digits - 1))


def int_range(value, what: str) -> tuple[int, int]:
    """``5`` -> ``(5, 5)``; ``[4, 7]`` -> ``(4, 7)`` (an inclusive range of positive ints);
    anything else raises a ValueError naming ``what``."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = value
    else:
        lo = hi = value
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (lo, hi)) \
            or not 1 <= lo <= hi:
        raise ValueError(f"{what} must be a positive integer or a [lo, hi] range, got {value!r}")
    return int(lo), int(hi)


def digit_range(digits) -> tuple[int, int]:
    """``5`` -> ``(5, 5)``; ``[4, 7]`` -> ``(4, 7)`` (key lengths, inclusive)."""
    return int_range(digits, "digits")


def random_key(rng: np.random.Generator, kind: str, digits: tuple[int, int] = (5, 5)) -> str:
    """A key of ``kind``: ``digits`` ('48213', length in the range), ``word``
    ('lantern-orbit', two words of :data:`WORDS`) or ``hex`` ('a3f9-07c2')."""
    if kind == "digits":
        lo, hi = digits
        length = lo if lo == hi else int(rng.integers(lo, hi + 1))
        return random_digits(rng, length)
    if kind == "word":
        first, second = rng.choice(len(WORDS), size=2, replace=False)
        return f"{WORDS[first]}-{WORDS[second]}"
    if kind == "hex":
        chars = "".join(_HEX[int(i)] for i in rng.integers(0, 16, size=8))
        return f"{chars[:4]}-{chars[4:]}"
    raise ValueError(f"unknown key kind {kind!r}; use one of {', '.join(KEY_KINDS)}")


def check_key_kinds(key_kinds) -> tuple[str, ...]:
    """``"word"`` or ``["digits", "hex"]`` -> a tuple of known kinds."""
    kinds = (key_kinds,) if isinstance(key_kinds, str) else tuple(key_kinds)
    if not kinds:
        raise ValueError("key_kinds is empty; use some of " + ", ".join(KEY_KINDS))
    unknown = [k for k in kinds if k not in KEY_KINDS]
    if unknown:
        raise ValueError(f"unknown key kind(s) {unknown}; use some of {', '.join(KEY_KINDS)}")
    return kinds


# ---------------------------------------------------------------- drawing a prompt


@dataclass(frozen=True)
class PasskeyNeedle:
    text: str  # as inserted into the filler
    key: str
    kind: str  # "digits", "word" or "hex"
    name: str  # the subject it names; "" for a prompt with one needle
    depth: float  # requested position, a fraction of the filler


@dataclass(frozen=True)
class PasskeySpec:
    """The pieces of one passkey prompt.

    The prompt is ``prefix + filler-with-inserts + suffix`` (``build_prompt``); the model
    answers `` answers[0]``. With several queries, query ``i > 0`` follows answer ``i - 1``
    as ``follow_up(i)``, and the model answers `` answers[i]`` after it.
    """

    split: str
    prefix: str
    needles: tuple[PasskeyNeedle, ...]
    questions: tuple[str, ...]  # each ends in an answer cue; no separator before it
    asked: tuple[int, ...]  # the needle each question asks about

    @property
    def inserts(self) -> list[tuple[float, str]]:
        return [(n.depth, n.text) for n in self.needles]

    @property
    def suffix(self) -> str:
        return QUESTION_SEPARATOR + self.questions[0]

    @property
    def answers(self) -> list[str]:
        return [self.needles[i].key for i in self.asked]

    def follow_up(self, i: int) -> str:
        """The text between answer ``i - 1`` and answer ``i`` (``i >= 1``)."""
        if not 1 <= i < len(self.questions):
            raise ValueError(f"follow-up {i} of a prompt with {len(self.questions)} questions")
        return ANSWER_SEPARATOR + self.questions[i]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    # a single option draws nothing: the template split keeps the classic prompt's draws
    return options[0] if len(options) == 1 else options[int(rng.integers(len(options)))]


def draw_passkey(
    rng: np.random.Generator,
    split: str = "template",
    *,
    needles: int = 1,
    queries: int = 1,
    key_kinds=("digits",),
    digits=None,
    instruction: bool = True,
    depth: float | None = None,
) -> PasskeySpec:
    """Draw the pieces of one passkey prompt of ``split``.

    ``needles`` needles hide keys of ``key_kinds`` (each needle's kind drawn from them);
    ``digits`` (an int or ``[lo, hi]``) sets digit-key lengths, by default the family's range
    (5 for ``template``, 4-7 for the others). With one needle the needle and question are
    unnamed; with several, each needle names a distinct subject and the ``queries`` questions
    ask about distinct needles, the others being distractors. The first question asks about
    the needle at ``depth`` (drawn uniformly in [0, 1] when None; the others' depths always
    are). ``instruction=False`` leaves the instruction out. The ``template`` split is the
    classic prompt: one needle, one question, digit keys; its random draws are exactly
    the classic tasks' (depth when not given, then the key).
    """
    family = get_family(split)
    needles, queries = int(needles), int(queries)
    if needles < 1 or not 1 <= queries <= needles:
        raise ValueError(
            f"passkey needs needles >= 1 and 1 <= queries <= needles, got needles={needles}, "
            f"queries={queries}"
        )
    kinds = check_key_kinds(key_kinds)
    if split == "template" and (needles > 1 or kinds != ("digits",)):
        raise ValueError(
            "the template split is the classic prompt (one needle, digit keys); use "
            "split='train' or 'heldout' for several needles or other key kinds"
        )
    digit_lengths = family.digits if digits is None else digit_range(digits)
    if needles > len(family.names) and needles > 1:
        raise ValueError(f"passkey has {len(family.names)} names: at most that many needles")

    first_depth = float(rng.random()) if depth is None else float(depth)
    keys: list[str] = []
    needle_kinds: list[str] = []
    while len(keys) < needles:
        kind = _pick(rng, kinds)
        key = random_key(rng, kind, digit_lengths)
        if key not in keys:
            keys.append(key)
            needle_kinds.append(kind)

    if needles == 1:
        prefix = _pick(rng, family.instructions) if instruction else ""
        needle = PasskeyNeedle(_pick(rng, family.needles).format(key=keys[0]), keys[0],
                               needle_kinds[0], "", first_depth)
        return PasskeySpec(split, prefix, (needle,), (_pick(rng, family.questions),), (0,))

    names = [family.names[int(i)] for i in rng.choice(len(family.names), needles, replace=False)]
    prefix = _pick(rng, family.named_instructions) if instruction else ""
    depths = [first_depth] + [float(d) for d in rng.random(needles - 1)]
    made = tuple(
        PasskeyNeedle(_pick(rng, family.named_needles).format(name=name, key=key), key, kind,
                      name, d)
        for name, key, kind, d in zip(names, keys, needle_kinds, depths)
    )
    others = [int(i) + 1 for i in rng.permutation(needles - 1)[: queries - 1]]
    asked = (0, *others)
    questions = tuple(_pick(rng, family.named_questions).format(name=made[i].name) for i in asked)
    return PasskeySpec(split, prefix, made, questions, asked)
