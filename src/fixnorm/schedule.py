"""The engine's learning-rate schedules as multipliers of the configured lr, and where each ends.

A leaf module (the config's fields only, read by attribute): the engine steps with :func:`lr_factor`, and methods
whose law depends on the schedule (FixNorm's ``schedule_end``) read :func:`schedule_end` without importing the
engine.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .train.config import TrainConfig

# steps per epoch for schedule_end: fine enough that the last step lies after every milestone inside the run
_FINE_STEPS = 100_000


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The LR multiplier at optimizer step ``s``: linear warm-up, then cosine / step / exponential / constant."""
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        epoch = step / steps_per_epoch
        if cfg.schedule == "cosine":
            t = (step - warmup_steps) / max(1.0, total_steps - warmup_steps)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        if cfg.schedule == "exponential":
            return cfg.gamma ** math.floor((epoch - cfg.warmup_epochs) / cfg.decay_epochs)
        return 1.0

    return factor


def schedule_end(cfg: TrainConfig) -> float:
    """The lr multiplier the run's schedule ends at, clipped to [0, 1]: ``min_lr_ratio`` for a cosine, the last
    step's factor for a step or exponential decay, 1 for a constant lr (a warm-up longer than the run: its end)."""
    if cfg.schedule == "cosine":
        return min(1.0, max(0.0, cfg.min_lr_ratio))
    steps = int(cfg.epochs * _FINE_STEPS)
    return min(1.0, max(0.0, lr_factor(cfg, _FINE_STEPS)(max(0, steps - 1))))
