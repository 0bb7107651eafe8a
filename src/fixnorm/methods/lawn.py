"""LAWN (Logit Attenuating Weight Normalization, Gupta et al. 2021, arXiv 2108.05839), stacked on any optimizer.

Train freely for a warm-up; then hold every weight of the *final homogeneous sub-network* (the layers after
the last normalisation whose ops are positively homogeneous, found by :func:`fixnorm.analyze`) at the norm
it had at the end of the warm-up, projecting back after every step, with weight decay off for those weights.
The logits are then a degree-k homogeneous function of weights whose norms cannot grow: their scale is
bounded ("attenuated"), which keeps the loss from collapsing and the network adaptive; the paper reports
the largest gains for Adam and for large batches.

``LAWN`` works without the engine: it attaches to an optimizer through ``register_step_post_hook``.
The ``lawn`` method wraps it for the engine (settings ``warmup_epochs`` and ``layers``).
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import FixNormError
from ..roles import Roles, analyze
from ..rules import HoldNorms, attach
from ..hooks import Hook, RunState
from . import Method, method_settings, register_method
from .baselines import decayed_optimizer

if TYPE_CHECKING:
    from ..train.config import TrainConfig

FINAL_HOMOGENEOUS = "final_homogeneous"


class LAWN:
    """Hold chosen weights at their end-of-warm-up norms after every step of ``optimizer``.

    Args:
        model: the model the optimizer trains (for parameter names and the analysis).
        optimizer: any torch optimizer, ``fixnorm.FixNorm`` included, that owns the parameters.
        example_inputs: a batch for ``model(*example_inputs)`` (a mapping: ``model(**example_inputs)``);
            needed only to find the final homogeneous sub-network when neither ``roles`` nor a list of names
            is given.
        warmup_steps: optimizer steps of free training. The norms are recorded right after step
            ``warmup_steps`` (0: at construction) and restored after every later step. ``None``
            defers it: set ``lawn.warmup_steps`` before the first step (the engine does, once it
            knows the steps per epoch).
        params: ``None`` or ``"final_homogeneous"`` (the analysis decides) or a list of parameter names.
        roles: a :class:`fixnorm.Roles` from ``analyze``, to skip the analysis.
        nonfinite: "raise" (default) raises ``NonFiniteError`` when a held weight's norm turns zero or
            non-finite (a NaN/inf gradient); "skip" zeroes such gradients and counts them.

    It is one rule, :class:`fixnorm.rules.HoldNorms` from step ``warmup_steps`` on, attached to the optimizer
    with :func:`fixnorm.rules.attach`: the recorded norms and the step count live in ``optimizer.state_dict()``.

    Weight decay: after the warm-up the constrained weights get ``weight_decay = 0`` (the paper's
    constrained phase uses no weight decay; decay, coupled or decoupled, would only fight the
    projection). A param group with weight decay that mixes constrained and other parameters is
    split at construction, the constrained ones moving to a copy of the group, so that decay can be
    turned off for them alone. Build LAWN before an LR scheduler, so that the scheduler sees the split.
    The step counter counts calls of ``optimizer.step()`` (a step GradScaler skips is not counted).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, Any] | None = None,
        *,
        warmup_steps: int | None,
        params: str | Sequence[str] | None = None,
        roles: Roles | None = None,
        nonfinite: str = "raise",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise FixNormError(f"LAWN needs the model (an nn.Module), got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise FixNormError(f"LAWN needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        named = dict(model.named_parameters())
        self.names = _resolve_names(model, named, example_inputs, params, roles)
        self.params = [named[n] for n in self.names]
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in zip(self.names, self.params) if id(p) not in owned]
        if missing:
            raise FixNormError(f"parameter(s) {missing[:6]} are not trained by this optimizer; LAWN constrains only "
                               "parameters the optimizer steps")
        _check_warmup(warmup_steps)
        self.optimizer = optimizer
        self.rule = HoldNorms(self.params, names=self.names, per="tensor", from_step=None,
                              on_hold=lambda rule: self._decay_off())
        if warmup_steps == 0:
            self.rule.checked_norms()  # fail before touching the optimizer
        self._split_decay_groups()
        self.attachment = attach(optimizer, [self.rule], name="lawn", nonfinite=nonfinite,
                                 names=dict(zip(self.params, self.names)))
        self.warmup_steps = warmup_steps

    # -- the warm-up length ------------------------------------------------------------------
    @property
    def warmup_steps(self) -> int | None:
        return self.rule.from_step

    @warmup_steps.setter
    def warmup_steps(self, value: int | None) -> None:
        _check_warmup(value)
        if self.rule.holding and value != self.rule.from_step:
            raise FixNormError(f"the warm-up already ended at step {self.rule.from_step} and the norms are "
                               f"recorded; warmup_steps cannot change to {value}")
        self.rule.from_step = value
        if value is not None and not self.rule.holding and self.step_count >= value:
            self.rule.take_targets()

    @property
    def step_count(self) -> int:
        """Calls of ``optimizer.step()`` since LAWN was attached."""
        return self.attachment.steps

    @property
    def constrained(self) -> bool:
        """Whether the warm-up is over and the norms are held."""
        return self.rule.holding

    # -- weight decay ----------------------------------------------------------------------------
    def _split_decay_groups(self) -> None:
        """Move constrained weights out of decayed groups they share with others (see the class docstring)."""
        mine = {id(p) for p in self.params}
        for group in list(self.optimizer.param_groups):
            inside = [p for p in group["params"] if id(p) in mine]
            if not inside or len(inside) == len(group["params"]) or not group.get("weight_decay"):
                continue
            group["params"] = [p for p in group["params"] if id(p) not in mine]
            settings = {k: v for k, v in group.items() if k != "params"}
            self.optimizer.add_param_group({**settings, "params": inside})

    def _decay_off(self) -> None:
        mine = {id(p) for p in self.params}
        for group in self.optimizer.param_groups:
            if group.get("weight_decay") and any(id(p) in mine for p in group["params"]):
                if not all(id(p) in mine for p in group["params"]):
                    raise FixNormError("a param group with weight decay mixes LAWN's weights with others (was a "
                                       "group added after LAWN was built?); give LAWN's weights their own group")
                group["weight_decay"] = 0.0

    # -- inspection ----------------------------------------------------------------------------
    def check(self) -> None:
        """Raise if a projection since the last check met a zero or non-finite norm (syncs with the device)."""
        self.attachment.check()

    def norms(self) -> dict[str, float]:
        """Current fp32 norm of every constrained weight (syncs; for logging and tests)."""
        return {n: float(v) for n, v in zip(self.names, self.rule.current_norms())}

    def targets(self) -> dict[str, float] | None:
        """The recorded norms, or None during the warm-up."""
        if self.rule.targets is None:
            return None
        return {n: float(t) for n, t in zip(self.names, self.rule.targets)}

    def remove(self) -> None:
        """Detach from the optimizer (no more projections, no more state entries)."""
        self.attachment.remove()

    # -- state: the targets and the step count are in the optimizer's state dict; this is the set-up --------
    def state_dict(self) -> dict[str, Any]:
        return {"version": 2, "warmup_steps": self.warmup_steps, "names": list(self.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") not in (1, 2):
            raise FixNormError("not a LAWN state dict (expected the dict LAWN.state_dict() returns)")
        if list(state["names"]) != self.names:
            raise FixNormError(f"the saved LAWN state constrains {state['names'][:4]}..., this LAWN constrains "
                               f"{self.names[:4]}...; was it saved from another model or another `params`?")
        if state["version"] == 1:
            raise FixNormError("this LAWN state was saved by an older fixnorm, which kept the targets outside the "
                               "optimizer's state dict; it cannot be resumed by this version: start the run again")
        if self.warmup_steps is None:  # the engine sets it after loading, from the epoch length
            self.rule.from_step = state["warmup_steps"]
        elif state["warmup_steps"] != self.warmup_steps:
            raise FixNormError(f"the saved LAWN warm-up is {state['warmup_steps']} steps, this one's is "
                               f"{self.warmup_steps}")


def _check_warmup(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise FixNormError(f"warmup_steps must be an integer >= 0 (or None to set it later), got {value!r}")


def _resolve_names(model: nn.Module, named: dict[str, torch.Tensor], example_inputs: Any,
                   params: str | Sequence[str] | None, roles: Roles | None) -> list[str]:
    if params is None or params == FINAL_HOMOGENEOUS:
        if roles is None:
            if example_inputs is None:
                raise FixNormError("LAWN needs example_inputs (a batch for model(*example_inputs)) to find the final "
                                   "homogeneous sub-network, or roles= from fixnorm.analyze(), or params=[names]")
            roles = analyze(model, example_inputs)
        if set(roles.shapes) != set(named):
            raise FixNormError("roles do not match the model's parameters; were they analysed on another model?")
        if not roles.final_homogeneous:
            raise FixNormError("the analysis found no final homogeneous sub-network (the output comes straight from a "
                               "normalisation or a non-homogeneous op such as sigmoid or GELU); name the weights to "
                               "constrain with params=[...]")
        return list(roles.final_homogeneous)
    if isinstance(params, str) or not all(isinstance(n, str) for n in params):
        raise FixNormError(f"params must be None, {FINAL_HOMOGENEOUS!r} or a list of parameter names, got {params!r}")
    names = list(params)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise FixNormError(f"unknown parameter name(s) {unknown[:6]}; names look like {list(named)[:4]}")
    if len(set(names)) != len(names) or not names:
        raise FixNormError(f"params must name each parameter once and at least one, got {names}")
    return names


def glob_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Weights (ndim >= 2) matching any glob, in model order; a pattern that matches no weight is an error."""
    named = dict(model.named_parameters())
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [n for n, p in named.items() if fnmatch.fnmatchcase(n, pattern) and p.ndim >= 2]
        if not matched:
            raise FixNormError(f"LAWN layer pattern {pattern!r} matches no weight (ndim >= 2); names look like "
                               f"{list(named)[:4]}")
        chosen.update(matched)
    return [n for n in named if n in chosen]


# -- the engine method -------------------------------------------------------------------------
DEFAULT_WARMUP_FRACTION = 0.2  # of cfg.epochs, when warmup_epochs is not given (our choice, see docs/lawn.md)


@dataclass(frozen=True)
class LAWNSettings:
    """``method_kwargs.lawn``."""

    warmup_epochs: float | None = None    # free epochs before the norms are held; None: DEFAULT_WARMUP_FRACTION
    layers: str | list[str] = FINAL_HOMOGENEOUS  # which weights: the final homogeneous layers, or name globs

    def __post_init__(self) -> None:
        if self.warmup_epochs is not None and self.warmup_epochs < 0:
            raise FixNormError(f"method_kwargs.lawn.warmup_epochs must be a number >= 0, got {self.warmup_epochs!r}")
        if self.layers != FINAL_HOMOGENEOUS and not (isinstance(self.layers, list) and self.layers):
            raise FixNormError(f"method_kwargs.lawn.layers must be {FINAL_HOMOGENEOUS!r} or a list of "
                               f"parameter-name globs, got {self.layers!r}")


def lawn_settings(cfg: TrainConfig) -> LAWNSettings:
    """The ``lawn`` method's settings, checked, with ``warmup_epochs`` resolved to a number."""
    settings = method_settings(cfg, "lawn", LAWNSettings)
    if settings.warmup_epochs is None:
        settings = replace(settings, warmup_epochs=DEFAULT_WARMUP_FRACTION * cfg.epochs)
    return settings


def setup_lawn(model: nn.Module, cfg: TrainConfig,
               example: torch.Tensor) -> tuple[torch.optim.Optimizer, list[Hook]]:
    """The base optimizer (``cfg.base``, ``cfg.weight_decay`` on weights) with LAWN attached, and LAWN's hook."""
    settings = lawn_settings(cfg)
    optimizer = decayed_optimizer(model, cfg)
    layers = settings.layers
    params = FINAL_HOMOGENEOUS if layers == FINAL_HOMOGENEOUS else glob_names(model, layers)
    lawn = LAWN(model, optimizer, example, warmup_steps=None, params=params)
    return optimizer, [LAWNHook(lawn, settings.warmup_epochs)]


def build_lawn(model: nn.Module, cfg: TrainConfig, example: torch.Tensor) -> torch.optim.Optimizer:
    """The optimizer of ``setup_lawn`` alone (for use outside the engine)."""
    return setup_lawn(model, cfg, example)[0]


class LAWNHook(Hook):
    """Sets the warm-up in steps once the engine knows the epoch length; logs and checkpoints LAWN."""

    def __init__(self, lawn: LAWN, warmup_epochs: float) -> None:
        self.lawn, self.warmup_epochs = lawn, warmup_epochs

    def on_train_start(self, trainer: RunState) -> None:
        steps = round(self.warmup_epochs * trainer.steps_per_epoch)
        if self.lawn.warmup_steps is not None and self.lawn.warmup_steps != steps:
            raise FixNormError(f"the checkpoint's LAWN warm-up is {self.lawn.warmup_steps} steps, "
                               f"this run's is {steps}")
        self.lawn.warmup_steps = steps

    def on_epoch_end(self, trainer: RunState, record: dict[str, Any]) -> None:
        norms = self.lawn.norms()
        record["lawn_constrained"] = int(self.lawn.constrained)
        record["lawn_norm"] = math.sqrt(sum(v * v for v in norms.values()))

    def state_dict(self) -> dict[str, Any]:
        return self.lawn.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lawn.load_state_dict(state)


register_method(Method(
    "lawn", "LAWN: free warm-up, then the final homogeneous sub-network's weight norms held at their warm-up-end "
    "values (base optimizer from `base`, `weight_decay` on weights, off for the held ones after warm-up; settings "
    "method_kwargs.lawn.warmup_epochs, .layers)", setup=setup_lawn, settings=LAWNSettings))
