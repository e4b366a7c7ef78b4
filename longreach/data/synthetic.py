"""Synthetic tasks mixed into training batches, and their registry.

A task is a callable ``task(rng, seq_len, tokenizer, **options) -> (input_ids, labels)``
returning two int64 arrays of length ``seq_len``; ``labels`` is -100 wherever the position
is not scored (HF convention: the model shifts labels internally). Tasks register by name:

    @register_synthetic_task("my_task")
    def my_task(rng, seq_len, tokenizer, *, some_option=3): ...

and are picked in a loader with ``synthetic={"task": "my_task", "fraction": 0.1, **options}``.
The module defining a task must be imported before a loader asks for it.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import numpy as np

IGNORE_INDEX = -100

SyntheticTask = Callable[..., tuple[np.ndarray, np.ndarray]]
_TASKS: dict[str, SyntheticTask] = {}


def register_synthetic_task(name: str) -> Callable[[SyntheticTask], SyntheticTask]:
    """Decorator registering a task under ``name`` (re-registering the same function is fine)."""

    def register(task: SyntheticTask) -> SyntheticTask:
        existing = _TASKS.get(name)
        # Same module and name: the module was imported again (e.g. reloaded), not a clash.
        if existing is not None and _origin(existing) != _origin(task):
            raise ValueError(
                f"synthetic task {name!r} is already registered by {'.'.join(_origin(existing))}"
            )
        _TASKS[name] = task
        return task

    return register


def _origin(task: SyntheticTask) -> tuple[str, str]:
    return (getattr(task, "__module__", "?"), getattr(task, "__qualname__", repr(task)))


def get_synthetic_task(name: str) -> SyntheticTask:
    if name not in _TASKS:
        raise ValueError(
            f"unknown synthetic task {name!r}; registered: {sorted(_TASKS)} (a task is "
            "registered when the module defining it is imported)"
        )
    return _TASKS[name]


def registered_synthetic_tasks() -> list[str]:
    return sorted(_TASKS)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@register_synthetic_task("copy")
def copy_task(
    rng: np.random.Generator,
    seq_len: int,
    tokenizer,
    *,
    min_length: int = 8,
    max_length: int = 64,
    separator: str = "\nRepeat: ",
    alphabet: str = string.ascii_letters + string.digits,
) -> tuple[np.ndarray, np.ndarray]:
    """``<string><separator><string><eos><pad>...``, scored only on the repeated string.

    The string has ``min_length..max_length`` characters drawn from ``alphabet``. It is
    encoded once and the same ids are repeated, so the target is an exact copy of ids; if
    the sample does not fit ``seq_len`` the string's ids are cut to fit.
    """
    if not 1 <= min_length <= max_length:
        raise ValueError(
            f"copy task needs 1 <= min_length <= max_length, got {min_length}, {max_length}"
        )
    length = int(rng.integers(min_length, max_length + 1))
    chars = np.array(list(alphabet))
    text = "".join(chars[rng.integers(0, len(chars), size=length)])
    body = _encode(tokenizer, text)
    sep = _encode(tokenizer, separator)
    room = (seq_len - len(sep) - 1) // 2  # two copies, the separator and eos must fit
    if room < 1:
        raise ValueError(
            f"seq_len={seq_len} is too short for the copy task (separator takes {len(sep)} tokens)"
        )
    body = body[:room]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = np.full(seq_len, pad, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    sample = body + sep + body + [eos]
    input_ids[: len(sample)] = sample
    start = len(body) + len(sep)
    labels[start : start + len(body)] = body
    return input_ids, labels
