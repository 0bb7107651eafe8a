"""FixNorm as a training method: no weight decay, fixed norms, the classifier norm a setting of its own."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import FixNormError
from ..optim import DEFAULT_FC_MAX_STEP, DEFAULT_FREE_STEPS, DEFAULT_JOINT, FixNorm, is_schedule_end
from ..rules import FollowNorms, attach
from ..schedule import schedule_end
from . import Method, method_settings, register_method
from .baselines import base_optimizer

if TYPE_CHECKING:
    from ..train.config import TrainConfig


@dataclass(frozen=True)
class FixNormSettings:
    """``method_kwargs.fixnorm``; each key is also accepted at the top level of a config (``--set free_steps=0``,
    ``--fc-norm 5``). The meaning of each is in :class:`fixnorm.FixNorm`'s docstring; docs/fixnorm.md says
    which defaults were measured and how."""

    fc_norm: float | None = None          # the classifier's norm, held from step 0; None: the one training chose
    fc_scale: float = 1.0                 # with fc_norm unset: the classifier at fc_scale x the norm training chose
    norm_scale: float = 1.0               # scale-invariant weights at norm_scale x the norm training chose
    granularity: str = "tensor"           # "tensor" or "filter": what one held norm covers
    target_norm: float | None = None      # scale-invariant weights' norm; None: the norm training chose
    fc_granularity: str = "tensor"        # "tensor" or "class" (one norm per row)
    others: str = "free"                  # the remaining parameters: "free", "fixed" or "decay"
    others_weight_decay: float = 0.0      # with others="decay"
    free_steps: int = DEFAULT_FREE_STEPS  # steps of free training before the chosen norms are taken
    fc_free_steps: int | str | None = "auto"  # the classifier's own free phase; None: never held; "auto": free_steps
                                              # over SGD, None over other bases; "free_steps": free_steps
    fc_max_step: float | None = DEFAULT_FC_MAX_STEP  # no step moves the classifier by more than this x its norm
    warmup_count: bool | str = "auto"     # free phases counted in full-lr steps through a warm-up; "auto": over SGD
    angular_update: float | None = None   # rotational mode: radians per step for scale-invariant weights
    lr_power: float | str = "auto"        # scale-invariant weights step with lr0 * (lr / lr0) ** lr_power; "auto": 1
                                          # where the gradient law's drift follows the lr or drift_signal="growth" is
                                          # given, DEFAULT_LR_POWER otherwise (the default growth law included)
    schedule_end: float | str = "auto"    # the lr_power bend applies to the decay above this lr factor; "auto": the
                                          # factor the run's schedule ends at (0 for a cosine to zero)
    angle_power: float = 1.0              # rotational mode: the angle follows (lr / lr0) ** angle_power
    norm_drift: int | str | None = "auto"  # held norms drift over N steps; "auto" where the norms come from a free
                                           # phase per tensor: weight decay's relaxation time at lr0 under the
                                           # growth law (500 steps at lr 0.1), 500 under the gradient law; None: off
    drift_follows_lr: bool | str = "auto"  # the drift follows weight decay's norm dynamics in the lr too
    drift_signal: str = "auto"            # what moves the norms: "gradient" (the uncorrelated-gradient law),
                                          # "growth" (weight decay's norm equation on the growth each step makes)
                                          # or "auto": growth with the lr_power bend over SGD, no joint groups held
    equilibrium_wd: float | str | None = "auto"  # no drifting norm above SGD + weight decay's equilibrium for this
                                                 # wd; "auto": 5e-4 with an SGD base and drifting norms; None: off
    joint: str = DEFAULT_JOINT            # weights scale-invariant only together (a pre-activation net's residual
                                          # writers): "auto" (hold where it applies), "hold" or "free"
    nonfinite: str = "raise"              # a NaN gradient or zero norm: "raise" (the run stops, naming the parameter)
                                          # or "skip" (that tensor's step is skipped and counted)
    norm_replay: str | None = None        # the replay diagnostic: a run folder (or its norm_trace.pt) recorded with
                                          # diagnostics=true ("{seed}" is replaced by the run's seed); the weights
                                          # of norm_replay_roles follow its norms
    norm_replay_roles: str = "all"        # "all", "scale-invariant" or "classifier"


def fixnorm_settings(cfg: TrainConfig) -> FixNormSettings:
    return decide_fixnorm(cfg, method_settings(cfg, "fixnorm", FixNormSettings))


def decide_fixnorm(cfg: TrainConfig, s: FixNormSettings) -> FixNormSettings:
    """``schedule_end="auto"`` becomes the lr factor the run's schedule ends at (``fixnorm.schedule.schedule_end``);
    a number is checked."""
    if s.schedule_end == "auto":
        return dataclasses.replace(s, schedule_end=schedule_end(cfg))
    if not is_schedule_end(s.schedule_end):
        raise FixNormError(f"method_kwargs.fixnorm.schedule_end must be auto or a number from 0 to 1 (the lr factor "
                           f"the schedule ends at), got {s.schedule_end!r}")
    return s


def build_fixnorm(model: nn.Module, cfg: TrainConfig, example: torch.Tensor) -> torch.optim.Optimizer:
    s = fixnorm_settings(cfg)
    cls, kwargs = base_optimizer(cfg)
    target = "initial" if s.target_norm is None else s.target_norm
    optimizer = FixNorm(model, example, base=cls, fc_norm=s.fc_norm, granularity=s.granularity, target=target,
                        fc_granularity=s.fc_granularity, others=s.others, others_weight_decay=s.others_weight_decay,
                        free_steps=s.free_steps, fc_scale=s.fc_scale, norm_scale=s.norm_scale, lr_power=s.lr_power,
                        schedule_end=float(s.schedule_end),
                        angular_update=s.angular_update, angle_power=s.angle_power, norm_drift=s.norm_drift,
                        drift_follows_lr=s.drift_follows_lr, drift_signal=s.drift_signal,
                        equilibrium_wd=s.equilibrium_wd, fc_free_steps=s.fc_free_steps, warmup_count=s.warmup_count,
                        fc_max_step=s.fc_max_step, joint=s.joint,
                        nonfinite=s.nonfinite, **kwargs)
    if s.norm_replay is not None:  # "{seed}" in the path: each seed replays its own reference run
        replay_norms(optimizer, model, s.norm_replay.replace("{seed}", str(cfg.seed)), s.norm_replay_roles)
    return optimizer


REPLAY_ROLES = ("all", "scale-invariant", "classifier")


def replay_norms(optimizer: FixNorm, model: nn.Module, trace: str, roles: str = "all") -> FollowNorms:
    """The replay diagnostic: after every step the weights of ``roles`` take the norms a reference run's weights had
    after the same number of steps (its norm trace), on top of FixNorm's own projection. Replaying an SGD + weight
    decay run's norms gives FixNorm its effective learning rate step by step: what still differs is not the norms."""
    from ..diagnostics import load_norm_trace  # the trace format lives with the diagnostics that record it

    if roles not in REPLAY_ROLES:
        raise FixNormError(f"norm_replay_roles must be one of {REPLAY_ROLES}, got {roles!r}")
    names, steps, norms = load_norm_trace(trace)
    chosen = {"all": set(optimizer.roles.scale_invariant) | set(optimizer.roles.classifier),
              "scale-invariant": set(optimizer.roles.scale_invariant),
              "classifier": set(optimizer.roles.classifier)}[roles]
    named = dict(model.named_parameters())
    wanted = [n for n in named if n in chosen and named[n].requires_grad]
    missing = [n for n in wanted if n not in names]
    if missing or not wanted:
        raise FixNormError(f"the norm trace {trace} has no {missing[:4] or roles} weights of this model: replay a "
                           "trace of the same architecture")
    columns = [names.index(n) for n in wanted]
    rule = FollowNorms([named[n] for n in wanted], steps, norms[:, columns], names=wanted)
    attach(optimizer, [rule], name="replay", nonfinite=optimizer.nonfinite, names={named[n]: n for n in wanted})
    return rule


register_method(Method("fixnorm", "FixNorm: scale-invariant weights and the classifier held at fixed norms "
                       "(base optimizer from `base`; `weight_decay` is not used)", build_fixnorm,
                       settings=FixNormSettings, decide=decide_fixnorm))
