"""Checks on what a user hands FixNorm that are not errors but deserve a word: warnings, never prints.

A base optimizer that normalises weights itself (Nero projects every neuron to zero mean and unit
norm after each step) makes FixNorm's norm rule a second normalisation of the same tensors: the
run still trains, but neither rule's target is the norm the weights end with, and nothing says so.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

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
