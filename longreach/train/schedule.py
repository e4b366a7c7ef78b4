"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr``."""

from __future__ import annotations

import math
from functools import partial

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup rises linearly to ``lr`` over ``warmup_steps`` steps (the first step already uses
    ``lr / warmup_steps``, never 0); the cosine then falls from ``lr`` to ``min_lr`` at
    ``steps`` and stays there if training runs longer.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = steps - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following ``lr_at``; every param group gets the same multiplier."""
    schedule = partial(
        _multiplier,
        lr=train_cfg.lr,
        min_lr=train_cfg.min_lr,
        warmup_steps=train_cfg.warmup_steps,
        steps=train_cfg.steps,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _multiplier(step: int, **kw) -> float:
    return lr_at(step, **kw) / kw["lr"]
