"""Magnitude masks, the weight-correlation metric and weight blocks: the shared pieces of compression studies.

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

Blocks (the second half): b_r x b_c tiles of each weight, their unification (one |value| per block, signs kept) and
pruning, the exact projection onto "a share unified, a share pruned" and a storage counter; ADMM
(``methods/admm.py``) and ``fixnorm unify`` (``train/unify.py``) build on them (docs/compression.md, part B).
"""
from __future__ import annotations

import heapq
import math
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


# -- micro-structured blocks: unification and pruning (Lin et al., arXiv 2106.08301; layout and solver ours) -------
#
# A weight of shape (out, in, kh, kw) is read as the matrix (out, in*kh*kw) and cut into b_r x b_c tiles, row-major
# over the tile grid; tiles at the right and bottom edges are padded, and padding never counts (a block's entries
# are its real weights, B of them). Per block b: its unification a*sign(b) with a = mean|b| (sign(0) = +1), its
# unification error e(b) = sum_i (|b_i| - mean|b|)^2 (the squared distance to that), and its pruning cost ||b||^2
# (the squared distance to zero). Counts are ``round(ratio * n)`` of a layer's n blocks (Python's round, half to
# even, as magnitude_masks). Assignments are int8 tile grids: FREE, UNIFIED, PRUNED.

FREE, UNIFIED, PRUNED = 0, 1, 2
BLOCK_SHAPES = ("1x4", "4x1", "2x2", "4x4", "kernel")  # the shapes the studies expose; any "RxC" is accepted
Block = tuple[int, int]


def block_dims(block: str | Sequence[int], shape: Sequence[int]) -> Block:
    """``(b_r, b_c)`` of a block name ("2x2", "1x4", ..., "kernel" = 1 x kh*kw) for a weight of ``shape``."""
    if len(shape) < 2:
        raise FixNormError(f"blocks need a weight with at least 2 dims (out, in, ...), got shape {tuple(shape)}")
    if isinstance(block, str):
        if block == "kernel":
            return 1, math.prod(shape[2:])  # a linear weight's "kernel" is 1x1: unification leaves it as it is
        rows, sep, cols = block.partition("x")
        if sep and rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0:
            return int(rows), int(cols)
    elif (len(block) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in block)):
        return int(block[0]), int(block[1])
    raise FixNormError(f"unknown block shape {block!r}: give 'RxC' with whole numbers R, C >= 1 (the studies use "
                       f"{', '.join(BLOCK_SHAPES)}; 'kernel' is 1 x kh*kw)")


def tile_grid(shape: Sequence[int], dims: Block) -> tuple[int, int]:
    """Rows and columns of tiles covering the (out, in*kh*kw) matrix of a weight of ``shape`` (edges padded)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return -(-rows // dims[0]), -(-cols // dims[1])


def to_blocks(weight: torch.Tensor, dims: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, real)``: the blocks as rows (n, b_r*b_c), tile-grid row-major, zero-padded, and which entries are
    real weights (not padding)."""
    matrix = weight.reshape(weight.shape[0], -1)
    (rows, cols), (grid_rows, grid_cols) = matrix.shape, tile_grid(weight.shape, dims)
    padded = matrix.new_zeros(grid_rows * dims[0], grid_cols * dims[1])
    padded[:rows, :cols] = matrix
    real = torch.zeros(padded.shape, dtype=torch.bool, device=weight.device)
    real[:rows, :cols] = True

    def cut(m: torch.Tensor) -> torch.Tensor:
        return m.reshape(grid_rows, dims[0], grid_cols, dims[1]).transpose(1, 2).reshape(grid_rows * grid_cols, -1)

    return cut(padded), cut(real)


def from_blocks(blocks: torch.Tensor, shape: Sequence[int], dims: Block) -> torch.Tensor:
    """The inverse of :func:`to_blocks`: block rows back to a tensor of ``shape`` (padding dropped)."""
    (grid_rows, grid_cols), rows, cols = tile_grid(shape, dims), shape[0], math.prod(shape[1:])
    matrix = blocks.reshape(grid_rows, grid_cols, dims[0], dims[1]).transpose(1, 2)
    return matrix.reshape(grid_rows * dims[0], grid_cols * dims[1])[:rows, :cols].reshape(tuple(shape))


def block_costs(weight: torch.Tensor, dims: Block) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block, in float64: ``(mean|b|, e(b), ||b||^2)`` over its real entries."""
    blocks, real = to_blocks(weight.detach().double(), dims)
    magnitude = blocks.abs()
    mean = magnitude.sum(1) / real.sum(1)
    error = ((magnitude - mean[:, None]) ** 2 * real).sum(1)
    return mean, error, (blocks ** 2).sum(1)


def block_sums(x: torch.Tensor, dims: Block) -> torch.Tensor:
    """``x`` with each entry replaced by the sum of its block's entries (one value per block, repeated)."""
    blocks = to_blocks(x, dims)[0]  # padding is zero: it adds nothing
    return from_blocks(blocks.sum(1, keepdim=True).expand_as(blocks), x.shape, dims)


def expand_blocks(assignment: torch.Tensor, shape: Sequence[int], dims: Block) -> torch.Tensor:
    """A tile-grid assignment repeated over each block's entries: a tensor of ``shape``."""
    blocks = assignment.reshape(-1, 1).expand(-1, dims[0] * dims[1])
    return from_blocks(blocks, shape, dims)


def project_blocks(weight: torch.Tensor, dims: Block, assignment: torch.Tensor) -> torch.Tensor:
    """A copy of ``weight`` with the UNIFIED blocks at ``mean|b| * sign(b)`` and the PRUNED ones at zero; the FREE
    entries bitwise unchanged."""
    if tuple(assignment.shape) != tile_grid(weight.shape, dims):
        raise FixNormError(f"an assignment of shape {tuple(assignment.shape)} does not fit a weight of shape "
                           f"{tuple(weight.shape)} in {dims[0]}x{dims[1]} blocks (tile grid "
                           f"{tile_grid(weight.shape, dims)})")
    mean = block_costs(weight, dims)[0]
    blocks = to_blocks(weight.detach(), dims)[0]
    sign = torch.where(blocks >= 0, 1.0, -1.0).to(torch.float64)  # sign(0) = +1
    unified = from_blocks((mean[:, None] * sign), weight.shape, dims).to(weight.dtype)
    kind = expand_blocks(assignment.to(weight.device), weight.shape, dims)
    out = torch.where(kind == UNIFIED, unified, weight.detach())
    return torch.where(kind == PRUNED, torch.zeros_like(out), out)


def block_counts(n_blocks: int, ratio: float, prune_ratio: float = 0.0) -> tuple[int, int]:
    """``(round(ratio * n), round(prune_ratio * n))``, checked: ratios in [0, 1), together at most every block."""
    for name, value in (("ratio", ratio), ("prune_ratio", prune_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise FixNormError(f"{name} must be a share of blocks in [0, 1), got {value!r}")
    unified, pruned = int(round(ratio * n_blocks)), int(round(prune_ratio * n_blocks))
    if unified + pruned > n_blocks:
        raise FixNormError(f"ratio {ratio} and prune_ratio {prune_ratio} ask for {unified} + {pruned} of "
                           f"{n_blocks} blocks: together they must leave a share >= 0 free")
    return unified, pruned


def _smallest(costs: torch.Tensor, count: int, among: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the ``count`` smallest ``costs`` (among the given indices), ties by index."""
    among = torch.arange(len(costs)) if among is None else among
    return among[torch.argsort(costs[among], stable=True)[:count]]


def _running_smallest_sums(costs: list[float], count: int) -> list[float]:
    """``out[t]``: the sum of the ``count`` smallest of ``costs[:t]`` (inf while t < count), by a max-heap."""
    out, heap, total = [math.inf] * (len(costs) + 1), [], 0.0
    if count == 0:
        return [0.0] * (len(costs) + 1)
    for t, cost in enumerate(costs, start=1):
        if len(heap) < count:
            heapq.heappush(heap, -cost)
            total += cost
        elif cost < -heap[0]:
            total += cost + heapq.heappushpop(heap, -cost)
        if len(heap) == count:
            out[t] = total
    return out


def assign_blocks(unify_cost: torch.Tensor, prune_cost: torch.Tensor, unified: int, pruned: int) -> torch.Tensor:
    """The exact two-cardinality assignment: ``unified`` blocks UNIFIED and ``pruned`` PRUNED, disjoint, minimising
    the summed unify costs plus the summed prune costs (codes per block, int8).

    Why it is exact: sort the blocks by ``d = prune_cost - unify_cost`` (ties by index). In an optimal assignment no
    pruned block p follows a unified block u in that order, else swapping them changes the cost by
    ``d_u - d_p <= 0``. So some threshold t splits it: the pruned blocks are the ``pruned`` cheapest to prune among
    the first t, the unified ones the ``unified`` cheapest to unify among the rest, two independent choices. Scanning
    every t with running heaps is O(n log n); the first best t wins. One kind only: the cheapest ones, ties by index.
    """
    n = len(unify_cost)
    codes = torch.full((n,), FREE, dtype=torch.int8)
    unify_cost, prune_cost = unify_cost.double().cpu(), prune_cost.double().cpu()
    if pruned == 0 or unified == 0:
        codes[_smallest(unify_cost, unified)] = UNIFIED
        codes[_smallest(prune_cost, pruned)] = PRUNED
        return codes
    order = torch.argsort(prune_cost - unify_cost, stable=True)
    prefix = _running_smallest_sums(prune_cost[order].tolist(), pruned)
    suffix = _running_smallest_sums(unify_cost[order].flip(0).tolist(), unified)[::-1]
    totals = [p + s for p, s in zip(prefix, suffix)]
    t = min(range(n + 1), key=totals.__getitem__)
    codes[_smallest(prune_cost, pruned, order[:t])] = PRUNED
    codes[_smallest(unify_cost, unified, order[t:])] = UNIFIED
    return codes


def greedy_assign_blocks(unify_cost: torch.Tensor, prune_cost: torch.Tensor, unified: int,
                         pruned: int) -> torch.Tensor:
    """The greedy heuristic, for comparison: prune the cheapest to prune, then unify the cheapest of the rest."""
    codes = torch.full((len(unify_cost),), FREE, dtype=torch.int8)
    codes[_smallest(prune_cost.double().cpu(), pruned)] = PRUNED
    codes[_smallest(unify_cost.double().cpu(), unified, torch.nonzero(codes == FREE).flatten())] = UNIFIED
    return codes


def assignment_cost(unify_cost: torch.Tensor, prune_cost: torch.Tensor, codes: torch.Tensor) -> float:
    """The squared distance an assignment moves the weight: its unify costs plus its prune costs."""
    codes = codes.flatten()
    return float(unify_cost.double().cpu()[codes == UNIFIED].sum() + prune_cost.double().cpu()[codes == PRUNED].sum())


def unify_assignment(weight: torch.Tensor, block: str | Sequence[int], ratio: float, prune_ratio: float = 0.0, *,
                     exact: bool = True) -> torch.Tensor:
    """The tile-grid assignment (int8) of the exact projection of ``weight`` onto "``round(ratio * n)`` blocks
    unified and ``round(prune_ratio * n)`` pruned" (``exact=False``: the greedy heuristic)."""
    dims = block_dims(block, weight.shape)
    _, error, square = block_costs(weight, dims)
    unified, pruned = block_counts(len(error), ratio, prune_ratio)
    codes = (assign_blocks if exact else greedy_assign_blocks)(error, square, unified, pruned)
    return codes.reshape(tile_grid(weight.shape, dims))


def unify_projection(weight: torch.Tensor, block: str | Sequence[int], ratio: float,
                     prune_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Π(weight), assignment)``: the nearest weight (in L2) with the stated counts of unified and pruned blocks."""
    assignment = unify_assignment(weight, block, ratio, prune_ratio)
    return project_blocks(weight, block_dims(block, weight.shape), assignment), assignment


@torch.no_grad()
def unify_blocks_(weight: torch.Tensor, block: str | Sequence[int], ratio: float,
                  prune_ratio: float = 0.0) -> torch.Tensor:
    """Unify in place the ``round(ratio * n)`` blocks with the least unification error (ties by index), and with
    ``prune_ratio`` prune blocks too, jointly optimal; returns the tile-grid assignment (FREE, UNIFIED, PRUNED)."""
    projected, assignment = unify_projection(weight, block, ratio, prune_ratio)
    weight.copy_(projected)
    return assignment


def storage_bits(shape: Sequence[int], block: str | Sequence[int], assignment: torch.Tensor, *,
                 value_bits: int = 32) -> int:
    """Bits to store one weight so compressed: a FREE block ``value_bits`` per entry, a UNIFIED block one magnitude
    (``value_bits``) and one sign bit per entry, a PRUNED block nothing; plus, per block, an index of
    ``ceil(log2(k))`` bits for the k kinds present in the layer (none when every block is of one kind)."""
    dims = block_dims(block, shape)
    if tuple(assignment.shape) != tile_grid(shape, dims):
        raise FixNormError(f"an assignment of shape {tuple(assignment.shape)} does not fit a weight of shape "
                           f"{tuple(shape)} in {dims[0]}x{dims[1]} blocks")
    sizes = to_blocks(torch.zeros(tuple(shape), dtype=torch.bool), dims)[1].sum(1)
    codes = assignment.flatten().cpu()
    free, unified = int(sizes[codes == FREE].sum()), codes == UNIFIED
    kinds = len(set(codes.tolist()))
    return (value_bits * free + int(unified.sum()) * value_bits + int(sizes[unified].sum())
            + len(codes) * math.ceil(math.log2(kinds)))
