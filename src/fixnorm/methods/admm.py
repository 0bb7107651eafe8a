"""ADMM towards micro-structured weight unification (Lin et al., arXiv 2106.08301; schedule and defaults ours).

The constrained problem min L(W) s.t. W_l in C_l (a share of each layer's blocks unified, a share pruned; see
:mod:`fixnorm.compress`) is split with Z_l = W_l and solved in scaled form:

- W-step: the optimizer's step on ``L(W) + sum_l rho_l / 2 * ||W_l - Z_l + U_l||^2`` (the squared norm: its
  gradient is ``rho_l (W_l - Z_l + U_l)``; NNI's and other public ports use a non-squared norm, not copied);
- every ``every_steps`` optimizer steps (default: once per epoch, at its last step): ``Z <- Π(W + U)``, the exact
  projection (:func:`fixnorm.compress.unify_projection`), then ``U <- U + W - Z``;
- Z starts at Π(W) of the starting (dense) weights, U at 0, every rho at ``rho``;
- at the end of every epoch (a stage) each layer's ``||W - Z|| / ||W||`` is logged (``admm/residual/<name>``,
  ``admm/residual_max``) and each layer still at or above ``tolerance`` has its rho multiplied by ``rho_growth``,
  with U rescaled by ``rho_old / rho_new`` so the unscaled dual ``rho * U`` is unchanged (Boyd et al. 2011, 3.4.1).

A method ``admm`` whose ``optimizer`` setting names the method that takes the W-steps (any whose optimizer does not
own its training step, as A-FAN). Z, U and rho are the step's state: checkpointed, so a resumed run is bit-exact.
After ADMM, ``fixnorm unify`` projects hard and retrains with the blocks held (``unify_from``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..compress import block_counts, block_dims, prunable_weights, unify_projection
from ..errors import FixNormError
from ..hooks import Hook, RunState, TrainStep
from . import Method, get_method, method_settings, register_method

if TYPE_CHECKING:
    from ..train.config import TrainConfig


@dataclass(frozen=True)
class ADMMSettings:
    """``method_kwargs.admm``."""

    optimizer: str = "sgd"          # the method whose optimizer (and hooks) takes the W-steps
    block: str = "2x2"              # block shape: "RxC" or "kernel" (compress.block_dims)
    ratio: float = 0.5              # share of each layer's blocks unified
    prune_ratio: float = 0.0        # share of each layer's blocks pruned (set to zero)
    first_conv: bool = False        # constrain the first conv too (default: left dense, as the pruning study)
    rho: float = 0.01               # every layer's rho at the start
    rho_growth: float = 2.0         # rho *= this per epoch for layers whose ||W - Z|| / ||W|| >= tolerance
    tolerance: float = 1e-3         # converged: ||W - Z|| / ||W|| below this
    every_steps: int = 0            # Z and U updates every this many optimizer steps (0: at each epoch's last step)

    def __post_init__(self) -> None:
        block_dims(self.block, (4, 4, 3, 3))  # a clear error for an unknown shape, before any training
        block_counts(0, self.ratio, self.prune_ratio)  # each share in [0, 1)
        if self.ratio + self.prune_ratio > 1:
            raise FixNormError(f"method_kwargs.admm: ratio {self.ratio} + prune_ratio {self.prune_ratio} exceed every "
                               "block; together they must leave a share >= 0 free")
        if self.ratio == 0 and self.prune_ratio == 0:
            raise FixNormError("method_kwargs.admm: ratio and prune_ratio are both 0: nothing to constrain")
        if not (self.rho > 0 and self.rho_growth >= 1 and self.tolerance > 0 and self.every_steps >= 0):
            raise FixNormError(f"method_kwargs.admm: rho > 0, rho_growth >= 1, tolerance > 0 and every_steps >= 0; "
                               f"got {self.rho}, {self.rho_growth}, {self.tolerance}, {self.every_steps}")
        if self.optimizer == "admm":
            raise FixNormError("method_kwargs.admm.optimizer names the method ADMM trains with; not admm itself")


class ADMMStep(TrainStep):
    """Cross-entropy plus the ADMM penalty; owns Z, U and rho per constrained weight."""

    def __init__(self, weights: dict[str, torch.Tensor], settings: ADMMSettings) -> None:
        self.names, self.params, self.s = list(weights), list(weights.values()), settings
        self.z: list[torch.Tensor] | None = None
        self.u: list[torch.Tensor] = []
        self.rho: list[float] = []

    def project(self, value: torch.Tensor) -> torch.Tensor:
        """Π: the nearest tensor with the settings' counts of unified and pruned blocks."""
        return unify_projection(value, self.s.block, self.s.ratio, self.s.prune_ratio)[0]

    def on_train_start(self, run: RunState) -> None:
        if self.z is None:  # a resumed run keeps the Z, U and rho of its checkpoint
            self.z = [self.project(p.detach()) for p in self.params]
            self.u = [torch.zeros_like(p, memory_format=torch.preserve_format).detach() for p in self.params]
            self.rho = [float(self.s.rho)] * len(self.params)

    def penalty(self) -> torch.Tensor:
        """``sum_l rho_l / 2 * ||W_l - Z_l + U_l||^2`` (fp32)."""
        assert self.z is not None, "on_train_start sets Z before the first step"
        terms = [rho / 2 * (p.float() - z.float() + u.float()).pow(2).sum()
                 for p, z, u, rho in zip(self.params, self.z, self.u, self.rho)]
        return torch.stack(terms).sum()

    def loss(self, run: RunState, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = run.forward_model(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=run.cfg.label_smoothing)
        return ce + self.penalty(), logits

    @torch.no_grad()
    def update_dual(self) -> None:
        """``Z <- Π(W + U)``, then ``U <- U + W - Z``."""
        assert self.z is not None
        for i, p in enumerate(self.params):
            self.z[i] = self.project(p.detach() + self.u[i])
            self.u[i] = self.u[i] + p.detach() - self.z[i]

    def after_step(self, run: RunState) -> None:
        every = self.s.every_steps or run.steps_per_epoch
        if run.global_step % every == 0:
            self.update_dual()

    @torch.no_grad()
    def residuals(self) -> list[float]:
        """``||W_l - Z_l|| / ||W_l||`` per constrained weight (syncs)."""
        assert self.z is not None
        return [float((p.float() - z.float()).norm() / p.float().norm().clamp_min(1e-30))
                for p, z in zip(self.params, self.z)]

    def on_epoch_end(self, run: RunState, record: dict[str, Any]) -> None:
        residuals = self.residuals()
        record["admm/residual_max"] = max(residuals)
        record["admm/rho_max"] = max(self.rho)
        record.update({f"admm/residual/{n}": r for n, r in zip(self.names, residuals)})
        for i, residual in enumerate(residuals):  # the next stage: a larger rho where W is still far from Z
            if residual >= self.s.tolerance and self.s.rho_growth != 1:
                old, self.rho[i] = self.rho[i], self.rho[i] * self.s.rho_growth
                self.u[i] = self.u[i] * (old / self.rho[i])

    def state_dict(self) -> dict[str, Any]:
        if self.z is None:
            return {}
        return {"z": [z.clone() for z in self.z], "u": [u.clone() for u in self.u], "rho": list(self.rho),
                "names": list(self.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("names") != self.names:
            raise FixNormError(f"the checkpoint's ADMM state covers {state.get('names')}, this run constrains "
                               f"{self.names}: were the ADMM settings (first_conv) or the model changed?")
        self.z = [z.to(p.device) for z, p in zip(state["z"], self.params)]
        self.u = [u.to(p.device) for u, p in zip(state["u"], self.params)]
        self.rho = [float(r) for r in state["rho"]]
        if not all(math.isfinite(r) and r > 0 for r in self.rho):
            raise FixNormError(f"the checkpoint's ADMM rho {self.rho[:4]} are not positive numbers")


def admm_settings(cfg: TrainConfig) -> ADMMSettings:
    return method_settings(cfg, "admm", ADMMSettings)


def constrained_weights(model: nn.Module, settings: ADMMSettings) -> dict[str, torch.Tensor]:
    """The weights ADMM constrains (and ``fixnorm unify`` projects): conv and linear, first conv if asked."""
    return prunable_weights(model, exclude_first_conv=not settings.first_conv)


def setup_admm(model: nn.Module, cfg: TrainConfig, example: torch.Tensor) -> tuple[torch.optim.Optimizer, list[Hook]]:
    """The optimizer and hooks of ``settings.optimizer``, with the ADMM step."""
    settings = admm_settings(cfg)
    optimizer, hooks = get_method(settings.optimizer).build(model, cfg, example)
    if any(isinstance(h, TrainStep) for h in hooks):
        raise FixNormError(f"method {settings.optimizer!r} owns its training step; ADMM cannot train with it")
    return optimizer, [*hooks, ADMMStep(constrained_weights(model, settings), settings)]


def prepare_admm(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The model as the optimizer's method prepares it."""
    return get_method(admm_settings(cfg).optimizer).prepare_model(model, cfg)


register_method(Method("admm", "ADMM towards unified / pruned weight blocks (settings method_kwargs.admm.*: block, "
                       "ratio, prune_ratio, rho, rho_growth; optimizer from method_kwargs.admm.optimizer, default sgd)",
                       setup=setup_admm, settings=ADMMSettings, prepare_model=prepare_admm,
                       uses=lambda cfg: [admm_settings(cfg).optimizer]))
