"""Mask files and masked runs: how a run trains with some weights held at zero (``mask_from``).

A mask file holds boolean keep masks (True = kept) by parameter name, written atomically by whoever computed them
(``fixnorm prune`` from a dense run's final weights, with :func:`fixnorm.compress.magnitude_masks`). A masked run
zeroes the pruned weights before the method analyses the model (``θ ⊙ m``: FixNorm takes its norms over the kept
entries), masks their gradients as they are computed (they reach no clipping, no momentum, no norm), and keeps them
at zero after every optimizer step through the :class:`fixnorm.rules.Mask` rule, whatever the method's optimizer.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FixNormError
from ..io import atomic_write, load_tagged_state
from ..rules import Attachment, Mask, attach

FORMAT = "fixnorm-masks"


def save_masks(path: str | Path, masks: Mapping[str, torch.Tensor], **about: Any) -> None:
    """Write ``masks`` (name -> bool tensor) atomically; ``about`` records how they were made (plain values)."""
    bad = [n for n, m in masks.items() if not isinstance(m, torch.Tensor) or m.dtype != torch.bool]
    if not masks or bad:
        raise FixNormError(f"masks must be a non-empty mapping of bool tensors; not bool: {bad[:4]}")
    state = {"format": FORMAT, "version": 1, "masks": {n: m.detach().cpu().clone() for n, m in masks.items()},
             "about": dict(about)}
    atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """The masks of a file :func:`save_masks` wrote (read without unpickling code)."""
    return load_mask_file(path)[0]


def load_mask_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The masks of a file :func:`save_masks` wrote and how they were made (its ``about``)."""
    state = load_tagged_state(path, FORMAT, "masks", kind="mask", setting="mask_from",
                              writer="`fixnorm prune` (fixnorm.train.masks.save_masks)")
    return dict(state["masks"]), dict(state.get("about") or {})


def parameters_named_by(entries: Mapping[str, Any], model: nn.Module, source: str,
                        what: str) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` by name, once ``entries`` (a file's masks or layers) is known to be non-empty and
    to name only parameters of ``model``; a clear error otherwise (a file made for another model or method)."""
    params = dict(model.named_parameters())
    if not entries:
        raise FixNormError(f"{source}: no {what}")
    unknown = sorted(set(entries) - set(params))
    if unknown:
        raise FixNormError(f"{source}: {what} {unknown[:4]}, which are not parameters of this {type(model).__name__} "
                           f"(it has e.g. {list(params)[:4]}); made for another model or method?")
    return params


def checked_masks(masks: Mapping[str, Any], model: nn.Module, source: str = "the masks") -> dict[str, torch.Tensor]:
    """``masks`` if every name is a parameter of ``model`` and every mask a bool tensor of its shape; else an error."""
    params = parameters_named_by(masks, model, source, "masks")
    wrong = [f"{n}: {m.dtype if isinstance(m, torch.Tensor) else type(m).__name__} "
             f"{tuple(getattr(m, 'shape', ()))}, parameter {tuple(params[n].shape)}" for n, m in masks.items()
             if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != params[n].shape]
    if wrong:
        raise FixNormError(f"{source} do not fit this model: each must be a bool tensor shaped like its parameter "
                           f"({'; '.join(wrong[:4])})")
    return {n: masks[n] for n in params if n in masks}  # in model order


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """``θ <- θ ⊙ m`` for the masked parameters, in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device))


def attach_masks(model: nn.Module, optimizer: torch.optim.Optimizer, masks: Mapping[str, torch.Tensor]) -> Attachment:
    """Train ``model`` with ``masks``: the Mask rule after every step of ``optimizer`` (its masks are checkpointed
    in the optimizer state, as ``mask_mask``) and the pruned entries of every gradient zeroed as it is computed."""
    params = dict(model.named_parameters())
    names = list(masks)
    rule = Mask([params[n] for n in names], [masks[n] for n in names], names=names)
    attachment = attach(optimizer, [rule], name="mask", names={params[n]: n for n in names})
    for i, name in enumerate(names):  # the rule's masks, read at each backward: a resumed run's, on their device
        params[name].register_hook(lambda grad, i=i: grad * rule.masks[i].to(grad.device))
    return attachment
