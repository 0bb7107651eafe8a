"""Checks on what a user hands FixNorm that are not errors but deserve a word: warnings, never prints.

A base optimizer that normalises weights itself (Nero projects every neuron to zero mean and unit
norm after each step) makes FixNorm's norm rule a second normalisation of the same tensors: the
run still trains, but neither rule's target is the norm the weights end with, and nothing says so.

A model whose weights are mostly neither scale-invariant (alone or jointly) nor the classifier, such as
a pre-LN transformer, where no normalisation follows a linear layer, gets almost nothing from FixNorm:
those weights train as the base optimizer would without weight decay, and nothing says so either.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .constraints import Plan

# above this share of the weights' elements left free (no norm held, no decay), FixNorm warns
FREE_SHARE_WARNING = 0.5

# optimizer class name -> (the group option that switches its normalisation, what it then does)
NORMALIZING_OPTIMIZERS: dict[str, tuple[str | None, str]] = {
    # Nero (Liu et al. 2021; pytorch-optimizer's Nero, jxbz/nero): constraints=True is the default
    "Nero": ("constraints", "projects every neuron of each weight (ndim > 1) to zero mean and unit norm after "
                            "each step"),
}


def base_normalizes_weights(optimizer: torch.optim.Optimizer | type[torch.optim.Optimizer],
                            options: dict[str, Any] | None = None) -> str | None:
    """What ``optimizer`` (an instance, or a class with the ``options`` it will get) does to weight norms, or None.

    Known by class name (no import of the optimizer's package); an instance is asked through its
    param groups, so ``Nero(..., constraints=False)`` passes.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    known = next((NORMALIZING_OPTIMIZERS[c.__name__] for c in cls.__mro__ if c.__name__ in NORMALIZING_OPTIMIZERS),
                 None)
    if known is None:
        return None
    switch, what = known
    if switch is not None:
        if isinstance(optimizer, type):
            enabled = (options or {}).get(switch, True)
        else:
            enabled = any(group.get(switch, True) for group in optimizer.param_groups)
        if not enabled:
            return None
    return f"{cls.__name__} {what}" + (f" ({switch}=True)" if switch else "")


def warn_if_base_normalizes(optimizer: torch.optim.Optimizer | type[torch.optim.Optimizer],
                            options: dict[str, Any] | None = None, *, stacklevel: int = 3) -> bool:
    """Warn (UserWarning) when the base optimizer already normalises weights; returns whether it warned.

    Meant for where FixNorm (or a method that holds norms, such as LAWN) builds its base optimizer.
    """
    what = base_normalizes_weights(optimizer, options)
    if what is None:
        return False
    name = optimizer.__name__ if isinstance(optimizer, type) else type(optimizer).__name__
    switch = NORMALIZING_OPTIMIZERS.get(name, (None, ""))[0]
    fix = f"pass {switch}=False to {name}" if switch else "use a base optimizer that leaves norms alone"
    warnings.warn(f"the base optimizer already normalises weights: {what}. FixNorm then fixes the same norms a "
                  f"second time and neither target holds; {fix}, or use {name} without FixNorm.",
                  UserWarning, stacklevel=stacklevel)
    return True


def free_weights(plan: Plan, trainable: set[str]) -> tuple[float, list[str]]:
    """The share of the trainable weights' elements (ndim >= 2) whose norm nothing controls, and their names.

    Free means the plan gives a weight neither a held norm (alone, per filter or jointly) nor weight decay and it
    is not the classifier (which FixNorm over an Adam-like base leaves to the base optimizer on purpose).
    """
    total, free, names = 0, 0, []
    for entry in plan.entries:
        if entry.name not in trainable or len(entry.shape) < 2:
            continue
        size = math.prod(entry.shape)
        total += size
        if entry.role == "other" and entry.constraint is None and not entry.note:
            free += size
            names.append(entry.name)
    return (free / total if total else 0.0), names


def warn_if_mostly_free(plan: Plan, trainable: set[str], base_name: str, *, stacklevel: int = 3) -> bool:
    """Warn (UserWarning) when more than ``FREE_SHARE_WARNING`` of the weights are free; returns whether it warned."""
    share, names = free_weights(plan, trainable)
    if share <= FREE_SHARE_WARNING:
        return False
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    warnings.warn(f"FixNorm controls no norm for {100 * share:.0f}% of this model's weight elements ({shown}): they "
                  f"are neither scale-invariant, alone or jointly, nor the classifier, so they train as under "
                  f"{base_name} without weight decay. A pre-LN transformer is like this (no normalization follows "
                  f"its linear layers), and so is a pre-activation ResNet with joint='free' (joint='auto' holds "
                  f"its residual-stream writers together). Pass others='decay' with others_weight_decay=<wd> to decay them, or use "
                  f"weight decay without FixNorm on this model; print(opt.roles) says why each weight is free.",
                  UserWarning, stacklevel=stacklevel)
    return True
