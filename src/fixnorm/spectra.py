"""Rank and curvature diagnostics: do the weights keep weight decay's low-rank bias, how curved is the loss per layer.

Rank (Galanti & Poggio 2022, "SGD and Weight Decay Secretly Minimize the Rank of Your Neural Network"): per weight
matrix (a conv weight flattened to out x rest) the *numerical rank*, the number of singular values above
``tolerance`` x the largest (default 1e-3: a stated choice, the paper's threshold idea at a relative scale so
that FixNorm's and weight decay's norms compare), and the *effective rank* (Roy & Vetterli 2007), ``exp`` of the
entropy of the singular values normalised to sum 1: a smooth count, 1 for rank one, ``min(m, n)`` for a flat
spectrum.

Curvature (as "Revisiting Initialization of Neural Networks", 2020, uses the Hessian's norm per layer): per weight,
the top eigenvalue of its diagonal block of the loss Hessian on a fixed probe batch, by power iteration on
Hessian-vector products (double backward). For a scale-invariant weight the curvature scales as ``1/||w||^2``, so it
is also reported at unit norm (``x ||w||^2``), where FixNorm and weight-decay runs compare.

Both are engine hooks (``rank_every``, ``curvature_every`` in epochs) adding ``rank/...`` and ``curvature/...``
columns to metrics.csv.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FixNormError
from .hooks import Hook, RunState
from .models.layers import DropPath, KeepBatchNormStatistics
from .roles import analyze

DEFAULT_RANK_TOLERANCE = 1e-3


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as a matrix: out x rest (a conv's filters are its rows)."""
    if weight.ndim < 2:
        raise FixNormError(f"rank needs a matrix or a conv weight, got shape {tuple(weight.shape)}")
    return weight.detach().reshape(weight.shape[0], -1)


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of ``as_matrix(weight)`` in float64, largest first."""
    return torch.linalg.svdvals(as_matrix(weight).double())


def numerical_rank(weight: torch.Tensor, tolerance: float = DEFAULT_RANK_TOLERANCE) -> int:
    """How many singular values exceed ``tolerance`` x the largest (0 for a zero matrix)."""
    s = singular_values(weight)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > tolerance * s[0]).sum())


def effective_rank(weight: torch.Tensor) -> float:
    """``exp(H(p))`` with ``p = s / sum(s)`` (Roy & Vetterli 2007); 0 for a zero matrix."""
    s = singular_values(weight)
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class RankHook(Hook):
    """Numerical and effective rank of every weight matrix (ndim >= 2) every ``every`` epochs.

    Columns ``rank/<param>/numerical``, ``rank/<param>/effective`` and the mean over layers of the effective rank
    relative to its maximum, ``rank/effective_fraction`` (1: flat spectra; small: low rank).
    """

    def __init__(self, every: int = 1, tolerance: float = DEFAULT_RANK_TOLERANCE) -> None:
        if every < 1 or not 0 < tolerance < 1:
            raise FixNormError(f"rank: every must be >= 1 epochs and tolerance in (0, 1), got {every}, {tolerance}")
        self.every, self.tolerance = every, tolerance

    @torch.no_grad()
    def on_epoch_end(self, run: RunState, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        if epoch % self.every:
            return
        fractions = []
        for name, p in run.model.named_parameters():
            if p.ndim < 2:
                continue
            effective = effective_rank(p)
            record[f"rank/{name}/numerical"] = numerical_rank(p, self.tolerance)
            record[f"rank/{name}/effective"] = effective
            fractions.append(effective / min(as_matrix(p).shape))
        if fractions:
            record["rank/effective_fraction"] = sum(fractions) / len(fractions)


# -- curvature ---------------------------------------------------------------------------------------------
def hessian_vector_product(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                           vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` for the Hessian of ``loss_fn()`` in ``params`` (double backward); no ``.grad`` is touched."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    return list(torch.autograd.grad(dot, list(params)))


def top_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], iterations: int = 20,
                   generator: torch.Generator | None = None) -> float:
    """The largest-magnitude eigenvalue of the Hessian block of ``params``, by power iteration (Rayleigh quotient).

    Deterministic given ``generator`` (the start vector). ``iterations`` HVPs.
    """
    if iterations < 1:
        raise FixNormError(f"power iteration needs iterations >= 1, got {iterations}")
    vectors = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((v * v).sum() for v in vectors))
    vectors = [v / norm for v in vectors]
    eigenvalue = 0.0
    for _ in range(iterations):
        hv = hessian_vector_product(loss_fn, params, vectors)
        eigenvalue = float(sum((h * v).sum() for h, v in zip(hv, vectors)))
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        if float(norm) == 0.0:
            return 0.0
        vectors = [h / norm for h in hv]
    return eigenvalue


class CurvatureHook(Hook):
    """Per weight, the top eigenvalue of its Hessian block on a fixed probe batch, every ``every`` epochs.

    Columns ``curvature/<param>/top`` and, for scale-invariant weights, ``curvature/<param>/top_unit_norm``
    (``top x ||w||^2``); ``curvature/top_max`` the largest over layers. The probe is the first ``probe_size``
    training images (un-augmented), in fp32. The loss is the one training sees: BatchNorm with batch statistics
    (its running statistics restored afterwards), where scale invariance holds; dropout off, so that every
    Hessian-vector product is of the same function.
    """

    def __init__(self, every: int = 1, probe_size: int = 256, iterations: int = 20) -> None:
        if every < 1 or probe_size < 1 or iterations < 1:
            raise FixNormError(f"curvature: every, probe_size and iterations must be >= 1, got {every}, "
                               f"{probe_size}, {iterations}")
        self.every, self.probe_size, self.iterations = every, probe_size, iterations

    def on_train_start(self, run: RunState) -> None:
        probe = run.probe_images(self.probe_size)
        if probe is None:
            raise FixNormError("curvature needs stored training images for its probe (not a streamed dataset)")
        self.probe = probe
        roles = getattr(run.optimizer, "roles", None) or analyze(run.model, run.example_input())
        self.invariant = set(roles.scale_invariant)

    def on_epoch_end(self, run: RunState, record: dict[str, Any]) -> None:
        if int(record["epoch"]) % self.every:
            return
        model = run.model
        modes = {m: m.training for m in model.modules()}
        model.train()
        for m in model.modules():
            if isinstance(m, (nn.Dropout, DropPath)):
                m.eval()
        x = run.prepare_batch(self.probe[0]).float()
        y = self.probe[1]
        tops = []
        try:
            with KeepBatchNormStatistics([model]):
                for index, (name, p) in enumerate(model.named_parameters()):
                    if p.ndim < 2 or not p.requires_grad:
                        continue
                    generator = torch.Generator().manual_seed(index)
                    top = top_eigenvalue(lambda: F.cross_entropy(model(x).float(), y), [p], self.iterations,
                                         generator)
                    record[f"curvature/{name}/top"] = top
                    if name in self.invariant:
                        record[f"curvature/{name}/top_unit_norm"] = top * float(p.detach().double().norm()) ** 2
                    tops.append(top)
        finally:
            for m, mode in modes.items():
                m.training = mode
        if tops:
            record["curvature/top_max"] = max(tops)


def spectra_hooks(rank_every: int, curvature_every: int, *, rank_tolerance: float = DEFAULT_RANK_TOLERANCE,
                  curvature_probe: int = 256, curvature_iterations: int = 20) -> list[Hook]:
    """The hooks a config asks for (0: off)."""
    hooks: list[Hook] = []
    if rank_every:
        hooks.append(RankHook(rank_every, rank_tolerance))
    if curvature_every:
        hooks.append(CurvatureHook(curvature_every, curvature_probe, curvature_iterations))
    return hooks
