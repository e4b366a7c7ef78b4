"""BABILong-style bAbI: a short templated story (qa1-qa5 style) scattered through long filler.

The stories are generated offline from templates, in the spirit of the bAbI tasks (Weston et
al., 2015) that BABILong (Kuratov et al., 2024) hides in book text:

- ``qa1`` single supporting fact: people move around; "Where is Mary?"
- ``qa2`` two supporting facts: an object is picked up, then carried; "Where is the apple?"
- ``qa3`` three supporting facts: an object is picked up and carried twice; "Where was the
  apple before the kitchen?"
- ``qa4`` two-argument relations: "The garden is north of the office."; "What is north of
  the office?"
- ``qa5`` three-argument relations: "Fred gave the milk to Bill."; "Who gave the milk to
  Bill?"

The facts keep their story order. The first supporting fact sits at ``depth``; the facts
told before it are spread over the filler before that point, the others after it. The answer
is one word, scored by containment (as BABILong does).
"""

from __future__ import annotations

import numpy as np

from longreach.data.synthetic import build_prompt
from longreach.eval.tasks.base import Sample, register_eval_task

PEOPLE = ("Mary", "John", "Sandra", "Daniel")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
MOVES = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
OBJECTS = ("football", "apple", "milk")
GRABS = ("picked up", "grabbed", "got", "took")
DROPS = ("dropped", "discarded", "put down", "left")
DIRECTIONS = ("north", "south", "east", "west")
GIVERS = ("Bill", "Fred", "Jeff", "Mary")
GIVES = ("gave", "handed", "passed")

INSTRUCTIONS = {
    "qa1": "I will give you context with the facts about positions of different persons "
    "hidden in some random text and a question. You need to answer the question based only "
    "on the information from the facts. If a person was in different locations, use the "
    "latest location to answer the question.",
    "qa2": "I will give you context with the facts about locations and actions of different "
    "persons hidden in some random text and a question. You need to answer the question "
    "based only on the information from the facts. If a person got an item in the first "
    "location and travelled to the second location, the item is also in the second location.",
    "qa3": "I will give you context with the facts about locations and actions of different "
    "persons hidden in some random text and a question. You need to answer the question "
    "based only on the information from the facts. If a person got an item in the first "
    "location and travelled to the second location, the item is also in the second location. "
    "The question asks where the item was right before it reached a location.",
    "qa4": "I will give you context with the facts about different locations and their "
    "relations hidden in some random text and a question. You need to answer the question "
    "based only on the information from the facts.",
    "qa5": "I will give you context with the facts about persons passing objects to each "
    "other hidden in some random text and a question. You need to answer the question based "
    "only on the information from the facts.",
}
QUESTION = "\n\nQuestion: {question}\nAnswer:"
QA_TYPES = tuple(INSTRUCTIONS)
STORY_FACTS = {"qa1": 6, "qa2": 8, "qa3": 8, "qa4": 3, "qa5": 6}


def _pick(rng: np.random.Generator, options, exclude=()):
    choices = [o for o in options if o not in exclude]
    return choices[int(rng.integers(len(choices)))]


class _Story:
    """Facts in story order; each sentence occurs once, so it can be found in the prompt.
    Distractor grabs and drops stay plausible: only free objects are grabbed, only held
    ones dropped."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.facts: list[str] = []
        self.held: dict[str, str] = {}  # object -> who carries it

    def add(self, make) -> int:
        for _ in range(100):
            fact = make()
            if fact not in self.facts:
                self.facts.append(fact)
                return len(self.facts) - 1
        raise RuntimeError("could not draw a new fact")  # the templates have many more

    def move(self, person: str, location: str | None = None) -> int:
        return self.add(lambda: f"{person} {_pick(self.rng, MOVES)} the "
                                f"{location or _pick(self.rng, LOCATIONS)}.")

    def grab(self, person: str, obj: str) -> int:
        self.held[obj] = person
        return self.add(lambda: f"{person} {_pick(self.rng, GRABS)} the {obj} there.")

    def drop(self, person: str, obj: str) -> int:
        del self.held[obj]
        return self.add(lambda: f"{person} {_pick(self.rng, DROPS)} the {obj}.")

    def noise(self, people, objects=()) -> int:
        """A fact about ``people``: a move, or a grab / drop of one of ``objects``."""
        person = _pick(self.rng, people)
        if objects and self.rng.random() < 0.4:
            mine = [o for o in objects if self.held.get(o) == person]
            free = [o for o in objects if o not in self.held]
            if mine and (not free or self.rng.random() < 0.5):
                return self.drop(person, _pick(self.rng, mine))
            if free:
                return self.grab(person, _pick(self.rng, free))
        return self.move(person)


def _split(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    """``total`` facts in ``parts`` random non-negative counts."""
    cuts = np.sort(rng.integers(0, total + 1, size=parts - 1))
    return [int(n) for n in np.diff(np.concatenate([[0], cuts, [total]]))]


def _qa1(rng):
    story, person = _Story(rng), _pick(rng, PEOPLE)
    others = [p for p in PEOPLE if p != person]
    before, after = _split(rng, STORY_FACTS["qa1"] - 1, 2)
    for _ in range(before):
        story.noise(PEOPLE)
    location = _pick(rng, LOCATIONS)
    support = [story.move(person, location)]
    for _ in range(after):
        story.noise(others)
    return story.facts, support, f"Where is {person}?", location


def _qa2(rng):
    story, person, obj = _Story(rng), _pick(rng, PEOPLE), _pick(rng, OBJECTS)
    others = [p for p in PEOPLE if p != person]
    other_objects = [o for o in OBJECTS if o != obj]
    before, middle, after = _split(rng, STORY_FACTS["qa2"] - 2, 3)
    for _ in range(before):
        story.noise(PEOPLE, other_objects)
    support = [story.grab(person, obj)]
    for _ in range(middle):
        story.noise(others, other_objects)
    location = _pick(rng, LOCATIONS)
    support.append(story.move(person, location))
    for _ in range(after):
        story.noise(others, other_objects)
    return story.facts, support, f"Where is the {obj}?", location


def _qa3(rng):
    story, person, obj = _Story(rng), _pick(rng, PEOPLE), _pick(rng, OBJECTS)
    others = [p for p in PEOPLE if p != person]
    other_objects = [o for o in OBJECTS if o != obj]
    before, gap1, gap2, after = _split(rng, STORY_FACTS["qa3"] - 3, 4)
    # the carrier does not move before the pickup: where the object started stays unknown,
    # so "before the {second}" has one answer
    for _ in range(before):
        story.noise(others, other_objects)
    support = [story.grab(person, obj)]
    for _ in range(gap1):
        story.noise(others, other_objects)
    first = _pick(rng, LOCATIONS)
    second = _pick(rng, LOCATIONS, exclude=(first,))
    support.append(story.move(person, first))
    for _ in range(gap2):
        story.noise(others, other_objects)
    support.append(story.move(person, second))
    for _ in range(after):
        story.noise(others, other_objects)
    return story.facts, support, f"Where was the {obj} before the {second}?", first


def _qa4(rng):
    # relations over disjoint pairs of locations: no fact implies another answer
    places = [LOCATIONS[int(i)] for i in rng.permutation(len(LOCATIONS))]
    pairs = [(places[2 * i], places[2 * i + 1]) for i in range(STORY_FACTS["qa4"])]
    directions = [_pick(rng, DIRECTIONS) for _ in pairs]
    facts = [f"The {a} is {d} of the {b}." for (a, b), d in zip(pairs, directions)]
    s = int(rng.integers(len(facts)))
    (a, b), d = pairs[s], directions[s]
    if rng.random() < 0.5:
        return facts, [s], f"What is the {a} {d} of?", b
    return facts, [s], f"What is {d} of the {b}?", a


def _qa5(rng):
    story, holder = _Story(rng), {}
    transfers: list[tuple[int, str, str, str]] = []  # (fact index, giver, object, receiver)
    n = STORY_FACTS["qa5"]
    moves = {int(i) for i in rng.choice(n, size=int(rng.integers(0, 3)), replace=False)}
    for i in range(n):
        if i in moves:  # distractors; at least four facts are transfers
            story.noise(GIVERS)
            continue
        obj = _pick(rng, OBJECTS)
        giver = holder.get(obj) or _pick(rng, GIVERS)
        receiver = _pick(rng, GIVERS, exclude=(giver,))
        index = story.add(lambda g=giver, o=obj, r=receiver: f"{g} {_pick(rng, GIVES)} the {o} to {r}.")
        transfers.append((index, giver, obj, receiver))
        holder[obj] = receiver
    last = {o: t for t in transfers for o in [t[2]]}  # each object's latest transfer
    # every (question, transfer) whose answer the story fixes uniquely
    candidates = []
    for t in transfers:
        index, giver, obj, receiver = t
        same = [u for u in transfers if u[2] == obj and u[3] == receiver]
        if len({u[1] for u in same}) == 1:
            candidates.append((index, f"Who gave the {obj} to {receiver}?", giver))
        same = [u for u in transfers if u[1] == giver and u[2] == obj]
        if len({u[3] for u in same}) == 1:
            candidates.append((index, f"Who did {giver} give the {obj} to?", receiver))
        same = [u for u in transfers if u[1] == giver and u[3] == receiver]
        if len({u[2] for u in same}) == 1:
            candidates.append((index, f"What did {giver} give to {receiver}?", obj))
        if last[obj] is t:
            candidates.append((index, f"Who received the {obj}?", receiver))
            candidates.append((index, f"Who gave the {obj}?", giver))
    index, question, answer = candidates[int(rng.integers(len(candidates)))]
    return story.facts, [index], question, answer


STORIES = {"qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4, "qa5": _qa5}


def _qa_type(qa) -> str:
    name = f"qa{qa}" if isinstance(qa, int) and not isinstance(qa, bool) else str(qa).lower()
    if name not in STORIES:
        raise ValueError(f"babi qa must be one of {', '.join(QA_TYPES)}, got {qa!r}")
    return name


@register_eval_task("babi", metric="contains", qa="qa1",
                    description="BABILong-style bAbI qa1-qa5 stories scattered through filler")
def babi(rng, tokenizer, haystack, length, depth, *, qa="qa1") -> Sample:
    qa = _qa_type(qa)
    facts, support, question, answer = STORIES[qa](rng)
    anchor = support[0]
    # story order is kept: earlier facts before `depth`, later ones after it
    fractions = (sorted(float(f) for f in rng.uniform(0.0, depth, size=anchor))
                 + [depth]
                 + sorted(float(f) for f in rng.uniform(depth, 1.0, size=len(facts) - anchor - 1)))
    prefix = INSTRUCTIONS[qa] + "\n\n"
    prompt, meta = build_prompt(
        rng, tokenizer, haystack, length, prefix=prefix,
        inserts=list(zip(fractions, facts)), suffix=QUESTION.format(question=question),
    )
    meta.update({"depth": depth, "needle_depth_actual": _fact_depth(prompt, prefix, facts, anchor),
                 "qa": qa, "question": question, "facts": facts,
                 "supporting_facts": [facts[i] for i in support]})
    return Sample("babi", prompt, answer, [answer], meta)


def _fact_depth(prompt: str, prefix: str, facts: list[str], anchor: int) -> float:
    """Where fact ``anchor`` sits as a fraction of the filler (the facts taken out)."""
    body = prompt[len(prefix) : prompt.rindex("\n\nQuestion: ")]
    position = body.index(facts[anchor]) - sum(len(f) + 1 for f in facts[:anchor])
    filler = len(body) - sum(len(f) + 1 for f in facts)
    return min(max(position / filler, 0.0), 1.0) if filler > 0 else 0.0
