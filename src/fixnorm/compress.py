"""Magnitude masks and the weight-correlation metric: the shared pieces of pruning studies.

``magnitude_masks`` keeps all but the smallest-magnitude weights, per layer or over all layers together, with one
stated rounding: a scope of n eligible weights at sparsity s prunes exactly ``round(s * n)`` of them, smallest
magnitude first, ties broken by position (a stable sort). Iterative pruning passes the previous masks: the new mask
prunes only among the kept weights, so masks are nested, and round k at rate r keeps ``round((1 - r)^k * n)``
(sparsity ``1 - (1 - r)^k``). Unlike open_lth's global pruning, no extra weight and no tie is removed.

``weight_correlation`` is R_p of Liu et al. (ICML 2021, "Lottery Ticket Preserves Weight Correlation"): per layer,
the overlap of the top-p largest-magnitude positions of two weight sets, summed over layers and divided by the
summed top-p counts; about p for unrelated weights, 1 for the same (or sign-flipped) weights.

Masks act in training through :class:`fixnorm.rules.Mask` (masked entries exactly zero after every step, whatever
the optimizer); Powerpropagation's pruning helper uses the same keep rule.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import FixNormError

SCOPES = ("layer", "global")


def prunable_weights(model: nn.Module, *, exclude_first_conv: bool = False) -> dict[str, torch.Tensor]:
    """The conv and linear weights of ``model`` by parameter name, in model order (the first conv left out if asked:
    the paper's layer-wise setting)."""
    weights = {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
               if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
               and isinstance(getattr(m, "weight", None), torch.Tensor)}
    if exclude_first_conv:
        first = next((n for n, w in weights.items() if w.ndim > 2), None)
        weights.pop(first, None)
    if not weights:
        raise FixNormError(f"{type(model).__name__} has no conv or linear weights to prune")
    return weights


def keep_smallest_pruned(scores: torch.Tensor, prune: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """A keep mask over flat ``scores``: False for the ``prune`` smallest among ``eligible`` (ties by position)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device) if eligible is None else eligible.clone()
    if prune:
        candidates = torch.nonzero(keep).flatten()
        order = torch.argsort(scores[candidates], stable=True)
        keep[candidates[order[:prune]]] = False
    return keep


def magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float, *, scope: str = "layer",
                    previous: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Boolean keep masks (True = kept) pruning ``round(sparsity * n)`` of the n weights of each scope.

    ``previous`` (masks of the last round) restricts pruning to weights it kept, and the count is of all n weights:
    the result has ``round(sparsity * n)`` pruned in total and is nested in ``previous``.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise FixNormError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if scope not in SCOPES:
        raise FixNormError(f"scope must be one of {SCOPES}, got {scope!r}")
    names = list(weights)
    if previous is not None and set(previous) != set(names):
        raise FixNormError("previous masks cover other weights than these")
    scores = [weights[n].detach().abs().reshape(-1).float().cpu() for n in names]
    kept = [previous[n].reshape(-1).cpu().bool() if previous is not None else None for n in names]

    def pruned_count(total: int, already_kept: int) -> int:
        prune = int(round(sparsity * total)) - (total - already_kept)
        if prune < 0:
            raise FixNormError(f"sparsity {sparsity} is below the previous masks' sparsity "
                               f"{(total - already_kept) / total:.4f}: masks only tighten")
        return prune

    if scope == "layer":
        masks = []
        for s, k in zip(scores, kept):
            already = s.numel() if k is None else int(k.sum())
            masks.append(keep_smallest_pruned(s, pruned_count(s.numel(), already), k))
    else:
        flat = torch.cat(scores)
        eligible = None if previous is None else torch.cat(kept)
        already = flat.numel() if eligible is None else int(eligible.sum())
        masks = list(torch.split(keep_smallest_pruned(flat, pruned_count(flat.numel(), already), eligible),
                                 [s.numel() for s in scores]))
    return {n: m.reshape(weights[n].shape).to(weights[n].device) for n, m in zip(names, masks)}


def iterative_sparsity(rate: float, rounds: int) -> float:
    """The sparsity after ``rounds`` rounds at ``rate`` per round: ``1 - (1 - rate)^rounds``."""
    if not 0 < rate < 1 or rounds < 0:
        raise FixNormError(f"iterative pruning needs 0 < rate < 1 and rounds >= 0, got {rate}, {rounds}")
    return 1 - (1 - rate) ** rounds


def weight_correlation(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], p: float,
                       names: Sequence[str] | None = None) -> float:
    """R_p: the share of each layer's top-``p`` largest-|w| positions in ``first`` that are also top-``p`` in
    ``second``, counted over all layers together (``round(p * n)`` positions per layer, ties by position)."""
    if not 0 < p <= 1:
        raise FixNormError(f"p must be in (0, 1], got {p!r}")
    names = list(first) if names is None else list(names)
    overlap, count = 0, 0
    for name in names:
        a, b = first[name].detach().abs().reshape(-1).float().cpu(), second[name].detach().abs().reshape(-1).float().cpu()
        if a.shape != b.shape:
            raise FixNormError(f"{name}: shapes {tuple(first[name].shape)} and {tuple(second[name].shape)} differ")
        k = int(round(p * a.numel()))
        if k == 0:
            continue
        top_a = torch.zeros(a.numel(), dtype=torch.bool)
        top_b = torch.zeros(b.numel(), dtype=torch.bool)
        top_a[torch.argsort(a, descending=True, stable=True)[:k]] = True
        top_b[torch.argsort(b, descending=True, stable=True)[:k]] = True
        overlap += int((top_a & top_b).sum())
        count += k
    if count == 0:
        raise FixNormError("no layer has a top-p position at this p")
    return overlap / count
