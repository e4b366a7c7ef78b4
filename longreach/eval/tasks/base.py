"""Samples, the eval-task registry and the prompt builder every task shares.

An eval task turns ``(tokenizer, length, depth, seed)`` into a :class:`Sample`: a prompt of
``length`` tokens (within 1%, counted with that tokenizer) whose key fact sits at ``depth``
(0 = right after the instruction, 1 = right before the question) inside filler text. The
prompt builder and the filler are ``longreach.data.synthetic``'s (training tasks use them too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longreach.data.synthetic import get_haystack


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

