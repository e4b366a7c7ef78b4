"""Samples, the eval-task registry and the prompt builder every task shares.

An eval task turns ``(tokenizer, length, depth, seed)`` into a :class:`Sample`: a prompt of
``length`` tokens (within 1%, counted with that tokenizer) whose key fact sits at ``depth``
(0 = right after the instruction, 1 = right before the question) inside filler text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longreach.eval.tasks.haystack import Haystack, get_haystack, nearest_boundary

LENGTH_TOLERANCE = 0.01  # prompts are within 1% of the requested token length
_MAX_FIT_ROUNDS = 12


@dataclass
class Sample:
    """One eval prompt. ``answers`` are the strings a correct generation contains."""

    task: str
    prompt: str
    answer: str
    answers: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def continuation(self) -> str:
        """The text a perfect model writes right after the prompt."""
        return " " + " ".join(self.answers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "prompt": self.prompt,
            "answer": self.answer,
            "answers": list(self.answers),
            "metadata": dict(self.metadata),
        }


@dataclass(frozen=True)
class EvalTask:
    """A registered task: ``build(rng, tokenizer, haystack, length, depth, **options)``."""

    name: str
    build: Callable[..., Sample]
    metric: str  # the headline metric (what the heatmap shows)
    options: dict[str, Any]  # defaults; ``--option key=value`` overrides them
    description: str = ""


_EVAL_TASKS: dict[str, EvalTask] = {}


def register_eval_task(name: str, *, metric: str, description: str = "", **options: Any):
    def wrap(build: Callable[..., Sample]) -> Callable[..., Sample]:
        _EVAL_TASKS[name] = EvalTask(name, build, metric, dict(options), description)
        return build

    return wrap


def available_eval_tasks() -> list[str]:
    return sorted(_EVAL_TASKS)


def get_eval_task(name: str) -> EvalTask:
    if name not in _EVAL_TASKS:
        raise ValueError(f"unknown eval task {name!r}; available: {', '.join(available_eval_tasks())}")
    return _EVAL_TASKS[name]


def check_depth(depth: float) -> float:
    depth = float(depth)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] (a fraction of the filler), got {depth}")
    return depth


def sample_seed(seed: int, length: int, depth: float, index: int) -> np.random.SeedSequence:
    """The random stream of one grid cell sample: same arguments, same sample."""
    return np.random.SeedSequence([int(seed), int(length), int(round(depth * 1_000_000)), int(index)])


def make_sample(
    task: str,
    tokenizer,
    length: int,
    depth: float,
    *,
    seed: int = 0,
    index: int = 0,
    haystack: str = "builtin",
    **options: Any,
) -> Sample:
    """Build sample ``index`` of ``task`` at ``length`` tokens and needle ``depth``."""
    spec = get_eval_task(task)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(
            f"task {task!r} got unknown option(s) {unknown}; valid options: {sorted(spec.options)}"
        )
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be a positive number of tokens, got {length!r}")
    depth = check_depth(depth)
    rng = np.random.default_rng(sample_seed(seed, length, depth, index))
    sample = spec.build(
        rng, tokenizer, get_haystack(haystack, tokenizer), int(length), depth,
        **{**spec.options, **options},
    )
    sample.metadata.update({"seed": int(seed), "index": int(index), "haystack": str(haystack)})
    return sample


def count_tokens(tokenizer, text: str) -> int:
    """Prompt length as the runner feeds it (special tokens such as BOS included)."""
    return len(tokenizer.encode(text))


def build_prompt(
    rng: np.random.Generator,
    tokenizer,
    haystack: Haystack,
    length: int,
    prefix: str,
    inserts: list[tuple[float, str]],
    suffix: str,
) -> tuple[str, dict[str, Any]]:
    """``prefix + filler-with-inserts + suffix`` of ``length`` tokens (within 1%).

    ``inserts`` are ``(fraction, text)``: each text goes at the sentence boundary of the
    filler closest to ``fraction`` of it. Returns the prompt and metadata (the first insert's
    requested and actual depth, the token count).
    """
    scaffold_text = prefix + " ".join(text for _, text in inserts) + suffix
    scaffold = count_tokens(tokenizer, scaffold_text)
    if scaffold >= length * (1 - LENGTH_TOLERANCE):
        raise ValueError(
            f"length {length} is too short: the prompt scaffolding (instruction, needles, "
            f"question) alone takes {scaffold} tokens"
        )
    start = haystack.random_start(rng)
    budget = length - scaffold
    best: tuple[int, str, float] | None = None
    for _ in range(_MAX_FIT_ROUNDS):
        filler = haystack.filler(start, budget)
        prompt, actual = _assemble(prefix, filler, inserts, suffix)
        n = count_tokens(tokenizer, prompt)
        if best is None or abs(n - length) < abs(best[0] - length):
            best = (n, prompt, actual)
        if n == length:
            break
        budget += length - n
        if budget < 0:
            break
    n, prompt, actual = best
    if abs(n - length) > LENGTH_TOLERANCE * length:
        raise ValueError(
            f"could not fit the prompt to {length} tokens (closest: {n}); the length is too "
            "short for this task"
        )
    meta = {"length": length, "prompt_tokens": n, "depth": inserts[0][0] if inserts else None,
            "needle_depth_actual": actual}
    return prompt, meta


def _assemble(prefix: str, filler: str, inserts: list[tuple[float, str]], suffix: str):
    """Place the inserts into the filler; return the text and the first insert's depth."""
    cuts = [(nearest_boundary(filler, fraction), i, text) for i, (fraction, text) in enumerate(inserts)]
    pieces, last, first_depth = [], 0, None
    for cut, i, text in sorted(cuts):
        pieces.append(filler[last:cut].rstrip())
        pieces.append(text)
        last = cut
        if i == 0:
            first_depth = cut / len(filler) if filler else 0.0
    pieces.append(filler[last:].lstrip())
    body = " ".join(p for p in pieces if p)
    return prefix + body + suffix, first_depth
