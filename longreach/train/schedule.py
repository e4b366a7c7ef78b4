"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr``.

Why not transformers' ``get_cosine_with_min_lr_schedule_with_warmup``: its cosine is the
same, but (checked on 5.17-5.24; ``tests/train/test_trainer.py`` pins the differences)
  - its warmup starts at 0: the first optimizer step has learning rate 0 and changes nothing
    (AdamW's moments still move), where ours starts at ``lr / warmup_steps``;
  - past ``num_training_steps`` its cosine climbs back towards ``lr`` (half a period more),
    where ours stays at ``min_lr``.
Taking it would shift every recipe's warmup by one step (and waste the first); the ten lines
below are the whole schedule.
"""

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
