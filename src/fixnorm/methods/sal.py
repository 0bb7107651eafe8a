"""SAL: regularisation as constraints, solved with a stochastic augmented Lagrangian (after Lavado, Soares &
Micheletti 2023, arXiv 2310.16647): the soft-constraint counterpart of FixNorm's hard projection.

Each weight (ndim >= 2) gets the inequality ``g_l(W) = |W_l|^2 / c_l - 1 <= 0``: its norm at most a bound (by
default its norm at initialisation). The loss of a step is the augmented Lagrangian in Powell-Hestenes-Rockafellar
form, ``CE + sum_l (rho/2) [max(0, g_l + mu_l/rho)^2 - (mu_l/rho)^2]``, and after every ``dual_every`` optimizer
steps the multipliers take a dual-ascent step ``mu_l <- max(0, mu_l + rho g_l)``. A constraint with slack and no
multiplier adds nothing to the loss; a violated one is pushed back, harder as its multiplier grows. Optionally rho
grows by ``rho_growth`` (up to ``rho_max``) whenever a dual step finds the total violation not below ``tau`` times
the last one.

Reconstruction: the paper's text was not available, only its abstract and the authors' code (dlavado/SAL). That
code uses equality constraints on elementwise violations (``weight * |theta|``, biases included, so never
satisfiable), an unsquared penalty, multipliers overwritten with ``rho * c`` whenever the violation improves, and a
data loss weighted 1.5; none of that fits "a satisfied constraint leaves the loss unchanged", so we built the
textbook inequality form on per-layer norms, which puts SAL beside FixNorm (same quantity: a norm per weight;
FixNorm holds it exactly, SAL bounds it softly). docs/related-methods.md says what we measured.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FixNormError
from ..hooks import Hook, RunState, TrainStep
from . import Method, method_settings, register_method
from .baselines import base_optimizer

if TYPE_CHECKING:
    from ..train.config import TrainConfig


class NormConstraints:
    """``g_l = |W_l|^2 / c_l - 1 <= 0`` for each weight, its multipliers ``mu`` and penalty ``rho``."""

    def __init__(self, params: list[nn.Parameter], bounds: torch.Tensor, rho: float) -> None:
        if not params or len(params) != len(bounds):
            raise FixNormError("SAL needs one positive bound per constrained weight")
        if not bool((bounds > 0).all()) or not math.isfinite(rho) or rho <= 0:
            raise FixNormError(f"SAL bounds and rho must be positive, got bounds {bounds.tolist()[:4]}, rho {rho}")
        self.params = params
        self.bounds = bounds.detach().to(torch.float32)          # c_l: squared norms
        self.mu = torch.zeros(len(params), dtype=torch.float32, device=bounds.device)
        self.rho = float(rho)

    def values(self) -> torch.Tensor:
        """g_l for every weight (differentiable), fp32."""
        squares = torch.stack([p.float().pow(2).sum() for p in self.params])
        return squares / self.bounds.to(squares.device) - 1

    def penalty(self) -> torch.Tensor:
        """``sum_l (rho/2) [max(0, g_l + mu_l/rho)^2 - (mu_l/rho)^2]`` (zero for slack constraints with mu = 0)."""
        g, shift = self.values(), self.mu / self.rho
        return self.rho / 2 * (torch.clamp(g + shift.to(g.device), min=0).pow(2) - shift.pow(2).to(g.device)).sum()

    @torch.no_grad()
    def dual_step(self) -> torch.Tensor:
        """``mu_l <- max(0, mu_l + rho g_l)``; returns the total violation ``sum_l max(0, g_l)`` (a device tensor)."""
        g = self.values()
        self.mu = torch.clamp(self.mu + self.rho * g.to(self.mu.device), min=0)
        return torch.clamp(g, min=0).sum()


@dataclass(frozen=True)
class SALSettings:
    """``method_kwargs.sal``."""

    bound_scale: float = 1.0    # each weight's norm at most bound_scale x its norm at initialisation
    rho: float = 1.0            # the penalty parameter (the authors' rho0)
    dual_every: int = 1         # optimizer steps between dual-ascent steps ("stochastic": every step)
    rho_growth: float = 1.0     # rho x this when a dual step finds the violation not below tau x the last one
    tau: float = 0.9
    rho_max: float = 10.0

    def __post_init__(self) -> None:
        if not (self.bound_scale > 0 and self.rho > 0 and self.dual_every >= 1 and self.rho_growth >= 1
                and 0 < self.tau <= 1 and self.rho_max >= self.rho):
            raise FixNormError(f"method_kwargs.sal: bound_scale > 0, rho > 0, dual_every >= 1, rho_growth >= 1, "
                               f"0 < tau <= 1 and rho_max >= rho; got {self}")


class SALStep(TrainStep):
    """The augmented-Lagrangian loss of a step, the dual step after it, their state in the checkpoint."""

    def __init__(self, constraints: NormConstraints, settings: SALSettings) -> None:
        self.c, self.s = constraints, settings
        self.last_violation: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None

    def loss(self, run: RunState, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = run.forward_model(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=run.cfg.label_smoothing)
        return ce + self.c.penalty(), logits

    def after_step(self, run: RunState) -> None:
        if run.global_step % self.s.dual_every:
            return
        violation = self.c.dual_step()
        if self.s.rho_growth > 1 and self.last_violation is not None:
            if float(violation) > self.s.tau * float(self.last_violation):  # (a sync, only with growth on)
                self.c.rho = min(self.c.rho * self.s.rho_growth, self.s.rho_max)
        self.last_violation = violation
        values = torch.stack([violation, (self.c.mu > 0).float().sum(), torch.ones((), device=violation.device)])
        self._sums = values if self._sums is None else self._sums + values

    def on_epoch_end(self, run: RunState, record: dict[str, Any]) -> None:
        if self._sums is not None:
            violation, active, steps = (float(v) for v in self._sums)
            record.update({"sal/violation": violation / steps, "sal/active": active / steps})
        record.update({"sal/rho": self.c.rho, "sal/mu_max": float(self.c.mu.max())})
        self._sums = None

    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.c.mu.clone(), "rho": self.c.rho, "bounds": self.c.bounds.clone(),
                "last_violation": self.last_violation}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["mu"].shape) != tuple(self.c.mu.shape):
            raise FixNormError("the checkpoint's SAL multipliers do not match this model's constrained weights")
        self.c.mu = state["mu"].to(self.c.mu.device)
        self.c.bounds = state["bounds"].to(self.c.bounds.device)
        self.c.rho = float(state["rho"])
        self.last_violation = state["last_violation"]


def setup_sal(model: nn.Module, cfg: TrainConfig, example: torch.Tensor) -> tuple[torch.optim.Optimizer, list[Hook]]:
    """``cfg.base`` without weight decay (the constraints replace it) and SAL's step."""
    settings = method_settings(cfg, "sal", SALSettings)
    params = [p for p in model.parameters() if p.requires_grad]
    constrained = [p for p in params if p.ndim >= 2]
    if not constrained:
        raise FixNormError("SAL constrains weights with ndim >= 2; this model has none")
    with torch.no_grad():
        bounds = torch.stack([p.float().pow(2).sum() for p in constrained]) * settings.bound_scale ** 2
    if not bool((bounds > 0).all()):
        raise FixNormError("SAL bounds a weight by its initial norm: a weight is all zeros (give bound_scale a "
                           "model without zero-initialised weights)")
    cls, kwargs = base_optimizer(cfg)
    optimizer = cls(params, **kwargs)
    return optimizer, [SALStep(NormConstraints(constrained, bounds, settings.rho), settings)]


register_method(Method("sal", "SAL: each weight's norm bounded by its initial norm (x bound_scale) through a "
                       "stochastic augmented Lagrangian (multipliers by dual ascent, penalty rho); base optimizer "
                       "from `base`, no weight decay", setup=setup_sal, settings=SALSettings))
