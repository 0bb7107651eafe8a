"""FixNorm: any torch.optim optimizer, followed by a plan of norm rules applied in place.

The wrapper delegates ``param_groups``, ``state`` and ``defaults`` to the base
optimizer, so LR schedulers, GradScaler, ``zero_grad`` and ``add_param_group`` act
on the real thing. Settings live in the param groups (``role``, ``constraint``). The norms are
held by rules (:class:`fixnorm.rules.HoldNorms`: from the first step, or from the end of the free
phase) attached to this optimizer with :func:`fixnorm.rules.attach`, the mechanism LAWN and MimicNorm
use too; their targets live in each parameter's entry of ``state_dict()["state"]``
(``fixnorm_target``, ``fixnorm_held``, ``fixnorm_steps``), where every checkpoint API carries them:
loading a state dict restores them, so a resumed run continues bit-identically. What stays here is
what happens around the base step: the lr bend (``lr_power``), the angular-update mode and the
gradient checks of the unconstrained parameters.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .constraints import (JOINT_POLICIES, Plan, build_plan, filter_norms, fix_filter_norms_, fix_tensor_norms_,
                          initial_targets, rotate_by_angle_, shorten_step_, tensor_norms_fp32)
from .checks import warn_if_base_normalizes, warn_if_mostly_free
from .errors import FixNormError, NonFiniteError
from .roles import Roles, analyze, refuse_lazy_parameters
from .rules import DRIFT_SIGNALS, NONFINITE_POLICIES, Attachment, HoldJointNorms, HoldNorms, equilibrium_constant_of

# Steps of free training before "initial" targets are taken: training, not the initialisation, picks each
# layer's norm (the classifier's above all). Measured in docs/fixnorm.md ("Why the first reconstruction trailed").
DEFAULT_FREE_STEPS = 100
# The scale-invariant weights step with lr0 * (lr / lr0) ** 0.5: weight decay's equilibrium angle per step goes as
# sqrt(lr), so under SGD + WD the weights keep turning late in a decaying schedule while FixNorm at power 1 freezes
# them. Measured in docs/fixnorm.md ("lr_power"): ahead on cosine schedules, neutral on a short step schedule.
DEFAULT_LR_POWER = 0.5
# The held norms of the scale-invariant weights drift with their gradient scale as weight decay's equilibrium norms
# do, over a running mean of this many steps (about weight decay's own relaxation time, (1 - momentum) / (4 lr wd),
# at lr 0.1, wd 5e-4, momentum 0.9). Without it the norms the free phase chose stay while weight decay shrinks its
# norms 2-3x over a 15-epoch ResNet-20 run. Measured in docs/fixnorm.md ("Norms that drift").
DEFAULT_NORM_DRIFT = 500
# With an SGD base no drifting norm is taken above the norm SGD with this weight decay settles at: the free phase only
# grows norms, and at a large lr it blows them up (47x for ResNet-20's stem at lr 0.8) where weight decay would pull
# them back within (1 - momentum) / (4 lr wd) steps. 5e-4 is the usual weight decay of the recipes FixNorm replaces
# (ResNets on CIFAR-style data). Measured in docs/fixnorm.md ("The fourth fix").
DEFAULT_EQUILIBRIUM_WD = 5e-4
# Whether the drift follows weight decay's norm dynamics in the lr by default. Measured in docs/fixnorm.md ("Why FixNorm
# crosses late"): it gives the angle weight decay's law to the end of a cosine schedule (the anneal as early as SGD +
# WD's on the 24-epoch speedrun) but gives up the default's small edge on 3-epoch runs; within noise both ways, and
# the rule fixed before the runs asked for more, so it is off by default.
DEFAULT_DRIFT_FOLLOWS_LR = False
# What moves the held norms (``drift_signal``). "auto": weight decay's own norm equation on the growth each step makes
# ("growth"), with the square-root bend of the steps kept, wherever SGD's law applies and no joint groups are held;
# the gradient law elsewhere. On short runs weight decay's norms keep growing after the free phase where the gradient
# law holds them flat, so at the end of a schedule that ends high FixNorm turned its weights 1.4-1.9x as much as SGD +
# WD at the same lr. Measured in docs/fixnorm.md ("The eighth fix").
DEFAULT_DRIFT_SIGNAL = "auto"
DRIFT_SIGNAL_SETTINGS = ("auto",) + DRIFT_SIGNALS
# The classifier's largest step, as a multiple of its norm before the step (``fc_max_step``). At a large lr the first
# steps from a small initial classifier overwrite it (ResNet-20 at lr 0.8: 1.9x its norm in step 1) and the run never
# recovers what that costs; at the recipes' lr 0.1 the classifier moves at most 0.24x its norm (step 1), then under
# 0.15x, so 0.2 binds at most on the first step there. Measured in docs/fixnorm.md ("The sixth fix"): +2.80 +- 0.65
# points at lr 0.8 on ResNet-20 (5 seeds), +0.09 +- 0.10 at lr 0.1, bit for bit the same runs on the small CNN.
DEFAULT_FC_MAX_STEP: float | None = 0.2
# weights scale-invariant only together (Roles.joint: the convs writing a pre-activation ResNet's residual stream):
# "free" leaves them to the base optimizer, as before the option existed; "hold" holds each group's joint norm; "auto"
# holds them wherever the joint rule applies (norms taken after the free phase, no angular_update, no
# drift_follows_lr), free elsewhere. Measured in docs/fixnorm.md ("Pre-activation networks"): on WRN-16-1 hold - free
# +0.22 +- 0.13 at 10 epochs, +0.17 +- 0.08 at 20 (5 fresh seeds each; the pre-registered rule, >= 2 se, met
# narrowly at 20), level on the 3-epoch README job.
DEFAULT_JOINT = "auto"
JOINT_SETTINGS = ("auto",) + JOINT_POLICIES


def equilibrium_constant(equilibrium_wd: float | str | None, norm_drift: int | None,
                         base: type[torch.optim.Optimizer], base_kwargs: Mapping[str, Any]) -> float | None:
    """Weight decay's equilibrium constant ``K = lr / (2 wd (1 - momentum))`` for FixNorm's ``equilibrium_wd``
    (None for None), with clear errors where SGD's law does not apply."""
    if equilibrium_wd is None:
        return None
    # why SGD's law cannot apply here, in the order an explicit weight decay reports them
    problems = []
    if norm_drift is None:
        problems.append("equilibrium_wd caps each held norm from its gradient scale, which drifting norms measure: it "
                        "needs norm_drift (free_steps >= 1, target='initial', granularity='tensor', no angular_update)")
    if not issubclass(base, torch.optim.SGD):
        problems.append(f"equilibrium_wd={equilibrium_wd} is SGD's equilibrium norm; {base.__name__} settles "
                        "elsewhere. Set equilibrium_wd=None with this base")
    lr = given_lr(base_kwargs)
    if base_kwargs.get("dampening", 0) or lr is None:
        problems.append("equilibrium_wd needs the lr given to FixNorm and no dampening: the equilibrium norm "
                        "depends on both")
    elif not lr > 0:
        problems.append(f"equilibrium_wd needs a positive lr (the equilibrium norm grows with it), got {lr}")
    if equilibrium_wd == "auto":
        if problems:
            return None
        equilibrium_wd = DEFAULT_EQUILIBRIUM_WD
    wd = _positive_weight_decay(equilibrium_wd, equilibrium_wd)
    if problems:
        raise FixNormError(problems[0])
    return equilibrium_constant_of(lr, wd, float(base_kwargs.get("momentum", 0.0)))


def given_lr(base_kwargs: Mapping[str, Any]) -> float | None:
    """The lr given to FixNorm as a float (None where none was given), a one-element tensor lr (which torch.optim
    accepts) included: SGD's norm laws (the equilibrium norm, the relaxation time, the growth law) are computed
    from it."""
    lr = base_kwargs.get("lr")
    if lr is None:
        return None
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise FixNormError(f"lr must be a number or a one-element tensor, got a tensor of shape {tuple(lr.shape)}")
    elif isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise FixNormError(f"lr must be a number or a one-element tensor, got {lr!r}")
    return float(lr)


def _is_positive_number(value: Any) -> bool:
    """A finite number > 0, not a bool (True would pass as 1): the check every numeric option of FixNorm makes."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def is_schedule_end(value: Any) -> bool:
    """A valid ``schedule_end``: a number from 0 to 1, not a bool. FixNorm checks it, and so does the engine's method
    setting when the config is made."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _positive_weight_decay(value: Any, given: Any) -> float:
    """``value`` as a float, or the error naming ``given``, what the user passed as ``equilibrium_wd``."""
    if not _is_positive_number(value):
        raise FixNormError(f"equilibrium_wd must be 'auto', None or a positive weight decay, got {given!r}")
    return float(value)


def weight_decay_relaxation_steps(equilibrium_wd: float | str | None, drift_applies: bool,
                                  base: type[torch.optim.Optimizer], base_kwargs: Mapping[str, Any]) -> int:
    """Weight decay's relaxation time in steps at the lr of construction, ``(1 - m) / (4 lr wd)``, for
    ``drift_follows_lr`` (wd: ``equilibrium_wd``, ``DEFAULT_EQUILIBRIUM_WD`` for "auto" or None), with clear errors
    where SGD's law does not apply."""
    if not drift_applies:
        raise FixNormError("drift_follows_lr moves the norms training chose: it needs free_steps >= 1, "
                           "target='initial', granularity='tensor' and no angular_update")
    if not issubclass(base, torch.optim.SGD):
        raise FixNormError(f"drift_follows_lr follows SGD + weight decay's norm dynamics; {base.__name__} has "
                           "others. Use drift_follows_lr=False with this base")
    lr = given_lr(base_kwargs)
    if base_kwargs.get("dampening", 0) or lr is None:
        raise FixNormError("drift_follows_lr needs the lr given to FixNorm and no dampening: weight decay's "
                           "relaxation time depends on both")
    wd = _positive_weight_decay(DEFAULT_EQUILIBRIUM_WD if equilibrium_wd in ("auto", None) else equilibrium_wd,
                               equilibrium_wd)
    momentum = float(base_kwargs.get("momentum", 0.0))
    if not (lr > 0):
        raise FixNormError(f"lr={lr}: weight decay's norm law (the default drift, drift_signal='growth' or "
                           "drift_follows_lr) is computed from the lr given to FixNorm; give a positive lr (or "
                           "norm_drift=None)")
    return max(1, round((1.0 - momentum) / (4.0 * lr * wd)))


def classifier_free_steps(fc_free_steps: int | str | None, free_steps: int, base: type[torch.optim.Optimizer],
                          fc_norm: float | None, fc_scale: float) -> int | None:
    """The steps before the classifier's norm is taken (None: never, the classifier stays free) for FixNorm's
    ``fc_free_steps``: "auto" is ``free_steps`` over SGD and None over other bases unless ``fc_scale`` asks for a
    held classifier; "free_steps" is ``free_steps`` over any base (the rule before "auto")."""
    if fc_free_steps == "auto":
        held = issubclass(base, torch.optim.SGD) or fc_norm is not None or fc_scale != 1
        return free_steps if held else None
    if fc_free_steps == "free_steps":
        return free_steps
    if fc_free_steps is None:
        if fc_norm is not None or fc_scale != 1:
            raise FixNormError("fc_free_steps=None leaves the classifier free; fc_norm and fc_scale hold it: give "
                               "one of them")
        return None
    if isinstance(fc_free_steps, bool) or not isinstance(fc_free_steps, int) or fc_free_steps < 0:
        raise FixNormError(f"fc_free_steps must be 'auto', 'free_steps', None or a whole number of steps >= 0, "
                           f"got {fc_free_steps!r}")
    if fc_norm is not None:
        raise FixNormError("fc_free_steps says when the classifier's norm is taken from training; with fc_norm "
                           "given it is held from the first step: give one of them")
    return fc_free_steps


class FixNorm(torch.optim.Optimizer):
    """Train without weight decay: hold scale-invariant weights and the classifier at fixed norms.

    Args:
        model: the model whose parameters are optimised.
        example_inputs: a tensor or tuple for ``model(*example_inputs)``, or a mapping for
            ``model(**example_inputs)`` (a Hugging Face batch), used by
            :func:`fixnorm.analyze` to find the roles; not needed when ``roles`` is given.
        base: the optimizer class that computes the step (SGD, Adam, RMSprop, ...).
        fc_norm: norm of the classifier weight, held from the first step; None takes its norm at
            the end of the free phase (at construction with ``free_steps=0``).
        fc_scale: with ``fc_norm=None``, hold the classifier at ``fc_scale`` times the norm it
            has when its target is taken: a classifier norm relative to the one training chose
            (what ``fixnorm tune`` searches, centred on the default 1).
        norm_scale: with ``target="initial"``, hold every scale-invariant weight at ``norm_scale``
            times the norm it has when its target is taken. Their effective learning rate is
            lr / norm²: 1/2 gives them 4x the effective learning rate, with the lr (and so the
            classifier's and the free parameters' steps) unchanged. After a free phase the norms
            reached grow with the lr, so the lr alone barely moves the effective learning rate of
            these weights; this is the knob that does.
        roles: the result of :func:`fixnorm.analyze`, to skip the analysis.
        granularity: "tensor" fixes each scale-invariant weight's norm; "filter" fixes
            each filter's norm where the weight is filter-invariant.
        target: "initial" keeps each weight's norm at construction; a number sets
            every scale-invariant weight's norm to it (split equally across filters).
        fc_granularity: "tensor" fixes the classifier matrix's norm; "class" fixes each
            row at ``fc_norm / sqrt(num_classes)``, so the matrix norm is ``fc_norm`` too.
        others: policy for the remaining parameters: "free" (default), "fixed" (weights
            with ndim >= 2 held at their initial norm, 1-D ones free) or "decay"
            (the base optimizer's weight decay ``others_weight_decay`` on them).
        nonfinite: "raise" (default) raises FixNormError, after the step, on a non-finite
            gradient or a zero/non-finite norm; "skip" zeroes a non-finite gradient before
            the step, leaves a tensor with a bad norm untouched, and counts both in
            ``skipped_count``. Neither ever divides by a zero norm.
        angular_update: when given, every scale-invariant weight turns by exactly this
            many radians per step (scaled by lr / the lr at construction, so schedules
            apply); see :func:`from_weight_decay`.
        angle_power: in angular-update mode the angle follows ``(lr / lr_at_construction) **
            angle_power``: 1 makes the LR schedule the angle schedule; 0.5 follows it as
            weight decay's equilibrium angle sqrt(2 lr wd / (1 + momentum)) does.
        lr_power: the scale-invariant weights step with ``lr0 * (lr / lr0) ** lr_power`` (lr0: the
            lr at construction): 0.5 makes their effective-LR schedule follow the square root of
            the schedule, as weight decay's equilibrium angle does; 1 makes the schedule itself theirs.
            "auto" (default): 1 where the gradient law's drift follows the lr (``drift_follows_lr``: the norm
            carries the square-root law) or ``drift_signal="growth"`` is given, ``DEFAULT_LR_POWER`` (0.5) otherwise,
            the default growth law included. A constant schedule is unaffected.
        schedule_end: the lr factor your schedule ends at (its last lr / the lr at construction, 0 to 1). The
            ``lr_power`` bend then applies to the decay above that floor: the weights step with ``lr0 * (e + (1 -
            e) * ((r - e) / (1 - e)) ** lr_power)``, r = lr / lr0, e = ``schedule_end``, and with the scheduler's lr
            at or below it, so at the schedule's end their angle is annealed by as much as the schedule anneals.
            0 (default: a schedule that ends at zero, such as cosine) is the plain ``lr0 * r ** lr_power``; 1 no
            bend. Why: with a schedule ending at a quarter of its lr the plain square root anneals the angle to
            only half its start, and FixNorm trailed SGD + weight decay by 0.7 points (docs/fixnorm.md, "The
            seventh fix"). The engine sets it from the config (``schedule_end="auto"``).
        norm_drift: the scale-invariant weights' held norms drift with their gradient scale as
            weight decay's equilibrium norms do (``HoldNorms(drift_steps=...)``: a running mean over
            this many steps of the squared unit-norm gradient, the norm going as its fourth root,
            relative to the moment the norm was taken after the free phase). "auto" (default):
            ``DEFAULT_NORM_DRIFT`` steps (weight decay's relaxation time at lr0 under the default growth law, see
            ``drift_follows_lr``) where the norms come from a free phase per tensor
            (``free_steps >= 1``, ``target="initial"``, ``granularity="tensor"``, no ``angular_update``)
            and the base is SGD, off otherwise: the fourth-root law is SGD's equilibrium; under Adam-like
            bases the step's size, and so weight decay's equilibrium norm, does not depend on the gradient's
            scale (measured: over Adam the drift cost 0.15 ± 0.04 points, docs/fixnorm.md). A number asks
            for it (an error where it cannot apply); None: fixed norms.
        drift_follows_lr: the drifting norms follow weight decay's norm dynamics in the lr as well:
            ``|w|**4`` relaxes toward ``K * lr * |g~|**2`` at weight decay's rate, ``(lr / lr0) / N`` per
            step, N = ``norm_drift`` ("auto": weight decay's relaxation time at lr0, ``(1 - momentum) /
            (4 lr0 wd)`` with wd ``equilibrium_wd``, 5e-4 for "auto" or None) (``HoldNorms(drift_lr=...)``).
            While the lr is large the held norm goes as ``lr ** (1/4)`` (the square-root law of the angle);
            once the lr is too small for weight decay to move a norm within the run, the norm freezes and the
            angle follows the lr, as under SGD + weight decay late in a decaying schedule or right after a
            milestone drop. The weights then step with the scheduler's lr (``lr_power`` "auto" is 1; another
            value is an error, except with ``drift_signal="growth"``). True needs an SGD base, the lr and drifting
            norms; "auto" (default): True where ``drift_signal`` is (or "auto" chose) "growth",
            ``DEFAULT_DRIFT_FOLLOWS_LR`` (off) under the gradient law where those hold and ``lr_power`` is "auto"
            or 1; False: the drift keeps a fixed time constant and the lr's law is ``lr_power``'s (and "auto" keeps
            the gradient law).
        drift_signal: what moves the held norms. "auto" (default, ``DEFAULT_DRIFT_SIGNAL``):
            "growth" with the ``lr_power`` bend kept where SGD's law applies (an SGD base without dampening, the lr,
            norms taken after a free phase per tensor, no ``angular_update``, ``norm_drift`` on, ``drift_follows_lr``
            "auto") and no joint groups are held; "gradient" elsewhere. Measured in docs/fixnorm.md ("The eighth
            fix"): +0.14 +- 0.05 points over "gradient" on four held-out schedules that end high, level on two that
            end at zero. "gradient": the law above,
            weight decay's equilibrium for uncorrelated gradients; measured on SGD + weight decay's own
            gradients it grows the norms more than weight decay does (docs/fixnorm.md). "growth": weight decay's
            norm equation driven by the norm growth FixNorm's own steps make, measured before each projection
            (``HoldNorms(drift_signal="growth")``): to first order decoupled weight decay ``lr * wd / (1 -
            momentum)`` per step on the norm alone, so the effective lr is weight decay's, step by step, with its
            feedback. Needs ``drift_follows_lr`` ("auto" becomes True). An explicit ``lr_power`` (with
            ``schedule_end``) bends the steps on top: the growth those bent steps make is what the norms take, the
            decay keeps the scheduler's rate (docs/fixnorm.md, "The eighth fix").
        equilibrium_wd: with drifting norms (SGD base): no scale-invariant weight is held above the norm
            SGD with this weight decay settles at, ``|w|**4 = K |g~|**2`` with ``K = lr / (2 wd (1 - momentum))``
            (lr and momentum as given to FixNorm; ``HoldNorms(ceiling=K)``). Weight decay pulls a norm above
            it back within ``(1 - momentum) / (4 lr wd)`` steps; the free phase only grows, and at a large lr
            it blows norms up that FixNorm would then hold. "auto" (default): ``DEFAULT_EQUILIBRIUM_WD``
            (5e-4) where the norms drift and the base is SGD without dampening, off otherwise; a number
            asks for it (an error where it cannot apply); None: no ceiling.
        fc_free_steps: when the classifier's norm is taken: a number of steps (its own free phase); None
            leaves it free for the whole run (the base optimizer moves it as it moves biases); "free_steps"
            is ``free_steps``; "auto" (default) is ``free_steps`` over SGD and None over other bases (Adam,
            RMSprop, ...) unless ``fc_scale`` asks for a held classifier. An adaptive step moves the
            classifier by about lr per coordinate whatever its gradient, so a free phase counted in steps
            leaves it far below the norm its own training reaches (over Adam at lr 1e-3: 2.7 after 100
            steps, 4.3 after 700) and holds the logits too cold; measured in docs/fixnorm.md.
        fc_max_step: no step moves the classifier's weight matrix by more than this multiple of its norm
            before the step (the step's direction is kept, its length shortened; the momentum buffer is left as
            the base wrote it). At a large lr the first steps from a small initial classifier overwrite it
            (ResNet-20 at lr 0.8: 1.9x its norm in step 1, its norm 1.85 -> 12 in ten steps) and the run
            never recovers what they cost, under SGD + weight decay as under FixNorm; at the recipes' lr 0.1
            the classifier moves at most 0.24x its norm (step 1), then under 0.15x. Default
            ``DEFAULT_FC_MAX_STEP`` (see docs/fixnorm.md, "The sixth fix"); None: no cap.
        free_steps: the weights whose target is "initial" train freely (plain base steps,
            no projection) for this many steps and are then held at the norms they have
            reached: training, not the initialisation, chooses each layer's norm and so
            its effective learning rate. Explicit targets (``fc_norm``, a number for
            ``target``) are held from the first step. 0 holds the norms at construction (the
            first reconstruction's rule). Default ``DEFAULT_FREE_STEPS`` (100).
        total_steps: the number of optimizer steps the run will take, where a factory builds the
            optimizer and no loop of yours is there to call :meth:`check_horizon` (timm's
            ``create_optimizer_v2``, the HF Trainer's ``optimizer_cls_and_kwargs``): checked at
            construction, so a run that would end inside the free phase is refused before it starts.
        warmup_steps: the linear warm-up of the lr schedule, in optimizer steps: the free phases
            (``free_steps``, ``fc_free_steps``) are then counted in full-lr steps, a warm-up step at a
            fraction of the lr counting as that fraction (:func:`steps_through_warmup`); see
            :meth:`count_warmup`. The engine passes its own warm-up.
        warmup_count: whether the free phases are counted in full-lr steps through a warm-up: "auto" (default)
            over SGD, where how far training moves a norm is set by the lr it moves it with, and not over other
            bases (an adaptive step grows the norms by about as much at any lr, so a longer phase only takes
            larger norms: over Adam the count cost 0.15 ± 0.02 points on 16 seeds, docs/fixnorm.md); True over
            any base; False never (a warm-up is then ignored and each phase is ``free_steps`` steps).
        joint: the weights that are scale-invariant only together (``Roles.joint``; in a pre-activation ResNet the
            convs that write one stage's residual stream, found by ``analyze(..., joint=True)``). "hold": each
            group's joint norm is held (taken after the free phase, times ``norm_scale``, drifting and capped as
            the scale-invariant weights' norms are), the members' norms relative to each other left free; they
            step with the scale-invariant weights' ``lr_power``. "free": the base optimizer moves them, nothing
            holds or decays them (the behaviour before the option existed). "auto" (default): "hold" where it
            applies (``target="initial"``, no ``angular_update``, no ``drift_follows_lr``: per-tensor laws the
            joint rule does not have), "free" elsewhere; ``joint_policy`` says which. Finding the groups costs one
            float64 backward pass per weight that is neither scale-invariant nor a classifier, at construction.
            See docs/fixnorm.md, "Pre-activation networks".
        **base_kwargs: passed to ``base`` (lr, momentum, betas, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, Any] | None = None,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        fc_norm: float | None = None,
        *,
        roles: Roles | None = None,
        granularity: str = "tensor",
        target: str | float = "initial",
        fc_granularity: str = "tensor",
        others: str = "free",
        others_weight_decay: float = 0.0,
        nonfinite: str = "raise",
        angular_update: float | None = None,
        angle_power: float = 1.0,
        free_steps: int = DEFAULT_FREE_STEPS,
        fc_scale: float = 1.0,
        norm_scale: float = 1.0,
        lr_power: float | str = "auto",
        schedule_end: float = 0.0,
        norm_drift: int | str | None = "auto",
        drift_follows_lr: bool | str = "auto",
        drift_signal: str = DEFAULT_DRIFT_SIGNAL,
        equilibrium_wd: float | str | None = "auto",
        fc_free_steps: int | str | None = "auto",
        fc_max_step: float | None = DEFAULT_FC_MAX_STEP,
        total_steps: int | None = None,
        warmup_steps: float = 0,
        warmup_count: bool | str = "auto",
        joint: str = DEFAULT_JOINT,
        **base_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise FixNormError(f"FixNorm needs the model (an nn.Module), got {type(model).__name__}; "
                               "it analyses the model to find which weights to constrain")
        if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
            raise FixNormError(f"base must be a torch.optim.Optimizer class such as torch.optim.SGD, got {base!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise FixNormError(f"unknown nonfinite policy {nonfinite!r}; choose one of {NONFINITE_POLICIES}")
        if angular_update is not None and not (0 < angular_update < math.pi / 2):
            raise FixNormError(f"angular_update must be in (0, pi/2) radians, got {angular_update!r}")
        if not _is_positive_number(angle_power):
            raise FixNormError(f"angle_power must be a positive number, got {angle_power!r}")
        if lr_power != "auto" and not _is_positive_number(lr_power):
            raise FixNormError(f"lr_power must be 'auto' or a positive number, got {lr_power!r}")
        if not is_schedule_end(schedule_end):
            raise FixNormError(f"schedule_end is the lr factor the schedule ends at (last lr / first lr), from 0 to "
                               f"1, got {schedule_end!r}")
        if not _is_positive_number(fc_scale):
            raise FixNormError(f"fc_scale must be a positive number, got {fc_scale!r}")
        if fc_max_step is not None and not _is_positive_number(fc_max_step):
            raise FixNormError(f"fc_max_step must be a positive number (a multiple of the classifier's norm) or "
                               f"None, got {fc_max_step!r}")
        if not _is_positive_number(norm_scale):
            raise FixNormError(f"norm_scale must be a positive number, got {norm_scale!r}")
        if norm_scale != 1 and target != "initial":
            raise FixNormError("norm_scale scales the norms training chose; with a numeric target there is nothing "
                               "to scale: give one of them")
        if fc_scale != 1 and fc_norm is not None:
            raise FixNormError("fc_scale scales the classifier norm that training chose; with fc_norm given there is "
                               "nothing to scale: give one of them")
        if isinstance(free_steps, bool) or not isinstance(free_steps, int) or free_steps < 0:
            raise FixNormError(f"free_steps must be a whole number of steps >= 0, got {free_steps!r}")
        self._fc_free_setting = fc_free_steps
        if not (isinstance(warmup_count, bool) or warmup_count == "auto"):
            raise FixNormError(f"warmup_count must be 'auto', True or False, got {warmup_count!r}")
        # the count is SGD's law, as the drift and the ceiling are: "auto" applies it over SGD only
        self.warmup_count: bool = issubclass(base, torch.optim.SGD) if warmup_count == "auto" else warmup_count
        fc_free_steps = classifier_free_steps(fc_free_steps, free_steps, base, fc_norm, fc_scale)
        drift_applies = free_steps > 0 and target == "initial" and granularity == "tensor" and angular_update is None
        if drift_follows_lr not in (True, False, "auto"):
            raise FixNormError(f"drift_follows_lr must be 'auto', True or False, got {drift_follows_lr!r}")
        if drift_signal not in DRIFT_SIGNAL_SETTINGS:
            raise FixNormError(f"drift_signal must be one of {DRIFT_SIGNAL_SETTINGS}, got {drift_signal!r}")
        if joint not in JOINT_SETTINGS:  # before the analysis, which "hold" makes longer (build_plan checks too)
            raise FixNormError(f"unknown joint policy {joint!r}; choose one of {JOINT_SETTINGS}")
        # the joint groups are looked for wherever they could be held (drift_signal "auto" needs to know)
        joint_possible = (target == "initial" and angular_update is None and drift_follows_lr is not True
                          and drift_signal != "growth")
        if base_kwargs.get("weight_decay"):
            raise FixNormError(
                f"weight_decay={base_kwargs['weight_decay']} would act on the constrained weights, where the "
                "projection undoes it: FixNorm replaces weight decay. Drop it, or use others='decay', "
                "others_weight_decay=... to decay only the unconstrained parameters")
        if roles is None:
            if example_inputs is None:
                raise FixNormError("FixNorm needs example_inputs (a batch for model(*example_inputs)) to find "
                                   "the parameter roles, or roles= from fixnorm.analyze()")
            roles = analyze(model, example_inputs, joint=joint == "hold" or (joint == "auto" and joint_possible))
        if drift_signal == "auto":  # weight decay's norm equation with the bend, where SGD's law applies
            # (an lr <= 0 is refused where the law's relaxation time is computed from it)
            growth_applies = (drift_applies and drift_follows_lr == "auto" and norm_drift is not None
                              and issubclass(base, torch.optim.SGD) and not base_kwargs.get("dampening", 0)
                              and given_lr(base_kwargs) is not None and joint != "hold"
                              and not (roles.joint and joint == "auto"))
            drift_signal = "growth" if growth_applies else "gradient"
            if growth_applies and lr_power == "auto":
                lr_power = DEFAULT_LR_POWER
        self.drift_signal: str = drift_signal  # "growth" or "gradient", after "auto" was decided
        if drift_signal == "growth":
            if drift_follows_lr is False:
                raise FixNormError("drift_signal='growth' runs weight decay's norm equation, whose rate follows the "
                                   "lr: it needs drift_follows_lr=True (or 'auto')")
            drift_follows_lr = True
        if drift_follows_lr == "auto":  # weight decay's law over SGD where the norms drift, unless lr_power is set
            drift_follows_lr = (DEFAULT_DRIFT_FOLLOWS_LR and drift_applies and issubclass(base, torch.optim.SGD)
                                and norm_drift is not None and lr_power in ("auto", 1))
        if drift_follows_lr:
            relaxation = weight_decay_relaxation_steps(equilibrium_wd, drift_applies, base, base_kwargs)
            if norm_drift == "auto":
                norm_drift = relaxation
            if lr_power == "auto":
                lr_power = 1.0
            elif lr_power != 1 and drift_signal != "growth":
                raise FixNormError("drift_follows_lr moves the held norms with the lr as weight decay's do, which "
                                   f"already gives the square-root law; lr_power={lr_power} would apply the lr's law "
                                   "a second time: leave lr_power at 'auto' (1), or use drift_signal='growth', whose "
                                   "norms follow the growth measured, not a law in the lr")
        if lr_power == "auto":
            lr_power = DEFAULT_LR_POWER
        if norm_drift == "auto":  # the drift is SGD's law: an adaptive step's size ignores the gradient's scale
            norm_drift = DEFAULT_NORM_DRIFT if drift_applies and issubclass(base, torch.optim.SGD) else None
        elif norm_drift is not None:
            if isinstance(norm_drift, bool) or not isinstance(norm_drift, int) or norm_drift < 1:
                raise FixNormError(f"norm_drift must be a whole number of steps >= 1 (or None), got {norm_drift!r}")
            if not drift_applies:
                raise FixNormError("norm_drift moves the norms training chose with each weight's gradient scale: it "
                                   "needs free_steps >= 1, target='initial', granularity='tensor' and no "
                                   "angular_update")
        ceiling = equilibrium_constant(equilibrium_wd, norm_drift, base, base_kwargs)
        joint_applies = target == "initial" and angular_update is None and not drift_follows_lr
        if joint == "auto":
            joint = "hold" if joint_applies else "free"
        if joint == "hold" and not joint_applies:
            raise FixNormError("joint='hold' holds the joint norms training chose, with the default drift: it does "
                               "not combine with a numeric target, angular_update or drift_follows_lr (per-tensor "
                               "laws); use joint='free' with those")
        named = dict(model.named_parameters())
        refuse_lazy_parameters(named)  # roles= skips the analysis, which refuses them too
        if set(roles.shapes) != set(named):
            missing = sorted(set(named) ^ set(roles.shapes))[:5]
            raise FixNormError(f"roles do not match the model's parameters (differ in {missing}); "
                               "were they analysed on another model?")

        self.roles = roles
        self.plan: Plan = build_plan(roles, granularity=granularity, target=target, fc_norm=fc_norm,
                                     fc_granularity=fc_granularity, others=others,
                                     others_weight_decay=others_weight_decay, fc_free=fc_free_steps is None,
                                     joint=joint)
        self.fc_free_steps = fc_free_steps
        self.joint_policy: str = joint  # "hold" or "free", after "auto" was decided
        self.nonfinite = nonfinite
        self._names: dict[torch.Tensor, str] = {p: n for n, p in named.items()}
        self._grad_params: dict[bool | None, list[list[torch.Tensor]]] | None = None
        self.free_steps = free_steps
        self._free_phases: dict[str, int] = {}  # role -> its free phase in full-lr steps (before a warm-up)
        self._capped_steps: torch.Tensor | None = None  # classifier steps fc_max_step shortened (a device count)
        self.warmup_steps: float = 0  # the warm-up given to count_warmup (counted only where warmup_count holds)
        self._layout: list[tuple[torch.device, torch.dtype]] = []  # parameters' (device, dtype) of the cache
        # the rules, by constraint: weights held from the first step (explicit targets, or free_steps=0) and
        # weights held from the end of the free phase (their norms then, the classifier's times fc_scale, the
        # scale-invariant weights' times norm_scale)
        held: OrderedDict[str, tuple[list[torch.Tensor], list[str], list[torch.Tensor]]] = OrderedDict()
        later: OrderedDict[tuple[str, bool, int], tuple[list[torch.Tensor], list[str], dict[int, float]]] = \
            OrderedDict()

        groups: OrderedDict[tuple[str, str | None], dict[str, Any]] = OrderedDict()
        for entry in self.plan.entries:
            p = named[entry.name]
            if not p.requires_grad:
                continue
            role = entry.role.replace("-", "_")
            group = groups.setdefault((role, entry.constraint), {"params": [], "role": role,
                                                                 "constraint": entry.constraint})
            group["params"].append(p)
            if entry.constraint == "joint":  # held by HoldJointNorms below, one norm per group
                pass
            elif entry.constraint is not None:
                value = None
                if entry.role == "classifier" and fc_norm is not None:
                    value = float(fc_norm)
                elif entry.role == "scale-invariant" and target != "initial":
                    value = float(target)
                initial = initial_targets(p, entry.name, entry.constraint, value)  # fails on a zero norm now
                scale = 1.0
                if value is None:
                    scale = float({"classifier": fc_scale, "scale-invariant": norm_scale}.get(entry.role, 1.0))
                # (a classifier left free, fc_free_steps None, has no constraint and never gets here)
                from_step = fc_free_steps if entry.role == "classifier" else free_steps
                if value is None and from_step > 0:
                    drifts = norm_drift is not None and entry.role == "scale-invariant"
                    params, names, scales = later.setdefault((entry.constraint, drifts, from_step), ([], [], {}))
                    self._free_phases[entry.role] = from_step
                    if scale != 1:
                        scales[len(params)] = scale
                else:
                    params, names, targets = held.setdefault(entry.constraint, ([], [], []))
                    targets.append(initial * scale if scale != 1 else initial)
                params.append(p)
                names.append(entry.name)
            if role == "other" and others == "decay":
                group["weight_decay"] = others_weight_decay
            if lr_power != 1 and role in ("scale_invariant", "joint_invariant"):
                group["lr_power"] = float(lr_power)
                if schedule_end:
                    group["schedule_end"] = float(schedule_end)
            if fc_max_step is not None and role == "classifier":
                group["max_step"] = float(fc_max_step)
            if angular_update is not None and role == "scale_invariant":
                group["angular_update"] = angular_update
                group["angle_power"] = float(angle_power)
        if not groups:
            raise FixNormError("the model has no trainable parameters")
        param_groups = list(groups.values())
        for g in param_groups:
            if "angular_update" in g or "lr_power" in g:
                g["lr_ref"] = base_kwargs.get("lr", None)
        try:
            self.base = base(param_groups, **base_kwargs)
        except ValueError as exc:
            if "group" not in str(exc):
                raise
            raise FixNormError(f"{base.__name__} does not accept parameter groups ({exc}); FixNorm puts each role "
                               "in its own group, so it cannot wrap this optimizer") from exc
        except TypeError as exc:
            raise FixNormError(f"{base.__name__} rejected the options {sorted(base_kwargs)}: {exc}. FixNorm's own "
                               "options are fc_norm, roles, granularity, target, fc_granularity, others, "
                               "others_weight_decay, nonfinite, angular_update, angle_power, free_steps, fc_scale, "
                               "norm_scale, lr_power, schedule_end, norm_drift, drift_follows_lr, drift_signal, equilibrium_wd, "
                               "fc_free_steps, fc_max_step, total_steps, warmup_steps, warmup_count") from exc
        for g in self.base.param_groups:
            if ("angular_update" in g or "lr_power" in g) and g["lr_ref"] is None:
                g["lr_ref"] = g["lr"]
            # a base default such as AdamW's weight_decay=0.01 must not reach the groups we own
            if "weight_decay" in g:
                g["weight_decay"] = others_weight_decay if g["role"] == "other" else 0.0
        self._init_hooks()
        warn_if_base_normalizes(self.base, stacklevel=3)
        warn_if_mostly_free(self.plan, {n for n, p in named.items() if p.requires_grad}, base.__name__, stacklevel=3)
        rules: list[HoldNorms | HoldJointNorms] = [HoldNorms(ps, names=ns, per=c, targets=ts)
                                                   for c, (ps, ns, ts) in held.items()]
        # the rules that wait for a free phase, with its length in full-lr steps (count_warmup stretches them)
        self._waiting: list[tuple[HoldNorms | HoldJointNorms, int]] = [
            (HoldNorms(ps, names=ns, per=c, from_step=k, scale=sc, drift_steps=norm_drift if d else None,
                       ceiling=ceiling if d else None,
                       drift_lr=self._lr_ratio_of("scale_invariant", c, float(base_kwargs["lr"]))
                       if d and drift_follows_lr else None,
                       drift_signal=drift_signal if d and drift_follows_lr else "gradient"), k)
            for (c, d, k), (ps, ns, sc) in later.items()]
        joint_groups = [[named[n] for n in g] for g in self.roles.joint] if joint == "hold" else []
        partly_frozen = [g for g in self.roles.joint if joint == "hold" and not all(named[n].requires_grad for n in g)
                         and any(named[n].requires_grad for n in g)]
        if partly_frozen:  # what trains of such a group is not scale-invariant: no joint norm to hold
            raise FixNormError(f"joint='hold': the group {partly_frozen[0]} is scale-invariant only as a whole, and "
                               "some of it is frozen (requires_grad=False); freeze all of it or none, or use "
                               "joint='free'")
        joint_groups = [g for g in joint_groups if all(p.requires_grad for p in g)]
        if joint_groups:  # scale-invariant together: their joint norms, taken with the scale-invariant weights'
            joint_rule = HoldJointNorms(joint_groups, names=[[self._names[p] for p in g] for g in joint_groups],
                                        from_step=free_steps, scale=norm_scale, drift_steps=norm_drift,
                                        ceiling=ceiling if norm_drift is not None else None)
            if free_steps > 0:
                self._waiting.append((joint_rule, free_steps))
                self._free_phases.setdefault("scale-invariant", free_steps)
            else:
                rules.append(joint_rule)
        rules += [rule for rule, _ in self._waiting]
        # attached to this optimizer itself: the projection runs as its first step post-hook, and the targets and
        # the step count are "fixnorm_target" / "fixnorm_held" / "fixnorm_steps" entries of its state dict
        self._rules = Attachment(self, rules, name="fixnorm", nonfinite=nonfinite, names=self._names,
                                 allow_empty=True)
        self._flags = self._rules.flags
        self._follow_parameters()
        self._project_at_construction()
        if warmup_steps:
            self.count_warmup(warmup_steps)
        if total_steps is not None:
            self.check_horizon(total_steps)

    # -- delegation: the base optimizer owns groups, state and defaults -----------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base.defaults = value

    def _lr_ratio_of(self, role: str, constraint: str, lr0: float) -> Callable[[], float]:
        """The scheduler's lr of the group (role, constraint) over ``lr0``, read when called (the group is looked up
        each time: ``load_state_dict`` replaces the group dicts)."""
        def ratio() -> float:
            for g in self.base.param_groups:
                if g.get("role") == role and g.get("constraint") == constraint:
                    return float(g["lr"]) / lr0
            raise FixNormError(f"no {role} group with constraint {constraint!r}: were the param groups replaced?")
        return ratio

    def _init_hooks(self) -> None:
        """The hook tables torch.optim.Optimizer.__init__ would create, without its own param groups."""
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return f"FixNorm(base={type(self.base).__name__}, nonfinite={self.nonfinite!r})\n{self.plan.table()}"

    # -- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """One base step, then every constrained parameter back to its target norm.

        In "raise" mode nothing is read before the base step (it would cost a pass over every
        gradient): a non-finite gradient is caught afterwards, through the norm it spoils
        (constrained weights) or the gradient itself (the rest), and the error names it.
        """
        self._flags.raise_ready(wait=True)  # the last step's flags
        self._check_settings()
        self._follow_parameters()  # once per step, before any cached bucket is used
        if closure is None and self.nonfinite == "skip":  # (the rules' own pre-hook did the constrained ones)
            self._check_gradients(self._grad_buckets(constrained=False))  # zero bad gradients before the step
        before = self._save_for_rotation()
        before_cap = self._save_for_cap()
        scheduled = self._bend_lr()
        try:
            if closure is not None:
                with torch.enable_grad():
                    loss = self.base.step(closure)
            else:
                loss = self.base.step()
        finally:
            for g, lr in scheduled:
                g["lr"] = lr
        free_phase = self._in_free_phase()
        self._cap_steps(before_cap)
        self._rotate(before)  # the projection follows, as this optimizer's first step post-hook (fixnorm.rules)
        if self.nonfinite == "raise":
            # constrained weights were checked by the projection's norms (a NaN gradient spoils them);
            # the unconstrained ones (biases, norm parameters: a sliver of the elements) through their gradients,
            # and during the free phase every gradient (the projection does not see the free weights yet)
            self._check_gradients(self._grad_buckets(constrained=None if free_phase else False))
        self._flags.raise_ready(wait=False)
        return loss

    def _in_free_phase(self) -> bool:
        return any(not rule.holding for rule in self._rules.rules if isinstance(rule, (HoldNorms, HoldJointNorms)))

    def _hold_rules(self) -> list[HoldNorms]:
        return [rule for rule in self._rules.rules if isinstance(rule, HoldNorms)]

    def norm_targets(self) -> dict[str, torch.Tensor]:
        """The fp32 target of every held weight by name (a vector per filter); none yet during the free phase."""
        return {name: target for rule in self._hold_rules() if rule.targets is not None
                for name, target in zip(rule.names, rule.targets)}

    @property
    def steps_done(self) -> int:
        """Calls of ``step()`` so far (a step GradScaler skips is not counted); restored by load_state_dict."""
        return self._rules.steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add parameters; they are free unless the group says ``constraint="tensor"|"filter"``.

        A constrained group is held at its norms at this moment, or at ``target_norm``.
        """
        constraint = param_group.get("constraint")
        if constraint not in (None, "tensor", "filter"):
            raise FixNormError(f"unknown constraint {constraint!r}; choose None, 'tensor' or 'filter'")
        if constraint and param_group.get("weight_decay"):
            raise FixNormError("weight_decay on a constrained param group would be undone by the projection; "
                               "set it to 0 or leave the group unconstrained")
        param_group = dict(param_group)
        param_group.setdefault("role", "added")
        param_group["constraint"] = constraint
        target_norm = param_group.pop("target_norm", None)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group["params"] = params
        names = [self._names.get(p, f"added_group{len(self.param_groups)}.{i}") for i, p in enumerate(params)]
        targets = []
        if constraint:
            for p, name in zip(params, names):
                if p.ndim < 2 and constraint == "filter":
                    raise FixNormError(f"{name}: a 'filter' constraint needs ndim >= 2")
                targets.append(initial_targets(p, name, constraint, target_norm))
        self.base.add_param_group(param_group)
        for p, name in zip(params, names):
            self._names.setdefault(p, name)
        if constraint:
            self._rules.add_rule(HoldNorms(params, names=names, per=constraint, targets=targets))
        self._grad_params = None

    def count_warmup(self, warmup_steps: float) -> None:
        """Count the free phases in full-lr steps through a linear warm-up of ``warmup_steps`` optimizer steps.

        A free phase exists to let training choose the norms; inside a warm-up it ends at a fraction of the lr,
        with the norms near their initialisation (measured in docs/fixnorm.md, "Through a warm-up"). Each phase is
        stretched to the number of steps that trains as far as ``free_steps`` full-lr steps would
        (:func:`steps_through_warmup`). Call it before the first step (the engine does, before it restores a
        checkpoint); 0 puts the phases back to their step counts. Where ``warmup_count`` is off (by default over
        a base other than SGD) the warm-up is recorded and the phases keep their step counts."""
        if self.steps_done and warmup_steps != self.warmup_steps:
            raise FixNormError(f"count_warmup after {self.steps_done} steps: the free phase has begun; "
                               "give the warm-up before the first step")
        self.warmup_steps = warmup_steps
        for rule, free_steps in self._waiting:
            rule.from_step = steps_through_warmup(free_steps, self._counted_warmup)

    @property
    def _counted_warmup(self) -> float:
        """The warm-up the free phases are counted through: the one given, where ``warmup_count`` holds."""
        return self.warmup_steps if self.warmup_count else 0

    def check_horizon(self, total_steps: int) -> None:
        """Refuse a run of ``total_steps`` optimizer steps (counted from this optimizer's first) that ends before
        a free phase does: no norm would ever be held and the run would be the base optimizer without weight decay,
        trained under FixNorm's name. Warns where a free phase covers more than a quarter of the run (the
        defaults were measured with 100 free steps in runs of 700 to 7,000). The engine calls it; call it from a
        loop of your own with the number of steps you will take."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise FixNormError(f"total_steps must be a whole number of optimizer steps >= 1, got {total_steps!r}")
        if not self._free_phases:  # every norm held from the first step, or none held at all
            return
        # the step after which each role's norms are taken, through the warm-up; the longest free phase
        taken_after = {role: steps_through_warmup(k, self._counted_warmup) for role, k in self._free_phases.items()}
        role, after = max(taken_after.items(), key=lambda item: item[1])
        what = {"classifier": "the classifier's norm"}.get(role, "the scale-invariant weights' norms")
        name = "fc_free_steps" if role == "classifier" and self._fc_free_setting not in ("auto", "free_steps") \
            else "free_steps"  # "auto" and "free_steps" give the classifier free_steps' moment
        setting = f"{name}={after}"
        if after != self._free_phases[role]:  # stretched through a warm-up
            setting = (f"{name}={self._free_phases[role]} full-lr steps, {after} steps through the "
                       f"{self.warmup_steps:g}-step warm-up")
        if after >= total_steps:
            raise FixNormError(
                f"the run takes {total_steps} optimizer steps but FixNorm takes {what} after {setting}: "
                f"{'it' if role == 'classifier' else 'they'} would never be held, and the run would be "
                f"{type(self.base).__name__} without weight decay. Give {name} well below "
                f"{total_steps} (the defaults were measured with the free phase at 1-15% of the run), or train longer")
        if 4 * after > total_steps:
            warnings.warn(f"FixNorm's free phase ({setting}) covers {100 * after / total_steps:.0f}% of this "
                          f"{total_steps}-step run, in which {what} {'is' if role == 'classifier' else 'are'} not "
                          "held and nothing decays; the defaults were measured with it at 1-15%", stacklevel=2)

    def _check_settings(self) -> None:
        for g in self.param_groups:
            if g.get("constraint") and g.get("weight_decay"):
                raise FixNormError(f"param group {g.get('role')!r} is norm-constrained but has weight_decay="
                                   f"{g['weight_decay']}; the projection would undo it. Set it to 0")

    # -- kernels ---------------------------------------------------------------------------
    def _follow_parameters(self) -> None:
        """Drop the cached buckets when a parameter has changed device or dtype since they were built.

        A model moved after its optimizer was built (``model.cuda()``, ``model.to(torch.bfloat16)``, as
        HF's Trainer and Fabric do) keeps its Parameter objects; the targets follow them, in fp32, without
        a host sync (a one-time copy, then the kernels run where the weights are).
        """
        layout = [(p.device, p.dtype) for g in self.param_groups for p in g["params"]]
        if layout != self._layout:  # (the rules follow on their own)
            self._layout = layout
            self._grad_params = None

    @torch.no_grad()
    def _project_at_construction(self) -> None:
        """Move weights onto explicit targets now; leave those already there (within 16 ulps) bit for bit.

        Lightning and the HF Trainer restore a checkpoint's weights before they build the optimizer: a
        projection of weights that are already at their targets would move them by an ulp and break resume.
        """
        for rule in self._hold_rules():
            if not rule.holding:
                continue
            for p, target in zip(rule.params, rule.targets):
                target = target.reshape(1) if rule.per == "tensor" else target
                current = tensor_norms_fp32([p]) if rule.per == "tensor" else filter_norms(p)
                tolerance = 16 * torch.finfo(p.dtype).eps
                if bool(((current.double() / target.double() - 1).abs() <= tolerance).all()):
                    continue
                bad = fix_tensor_norms_([p], target) if rule.per == "tensor" else fix_filter_norms_([p], [target])
                if bool(bad.any()):
                    raise NonFiniteError(f"parameter {self._names.get(p, '?')!r} has a zero or non-finite norm "
                                         "when FixNorm is built")

    def _grad_buckets(self, constrained: bool | None) -> list[list[torch.Tensor]]:
        """Parameters by device: all of them (None) or only the unconstrained ones (False); cached."""
        if self._grad_params is None:
            every: OrderedDict[torch.device, list[torch.Tensor]] = OrderedDict()
            free: OrderedDict[torch.device, list[torch.Tensor]] = OrderedDict()
            for g in self.param_groups:
                for p in g["params"]:
                    every.setdefault(p.device, []).append(p)
                    if not g.get("constraint"):
                        free.setdefault(p.device, []).append(p)
            self._grad_params = {None: list(every.values()), False: list(free.values())}
        return self._grad_params[constrained]

    def _check_gradients(self, buckets: list[list[torch.Tensor]]) -> None:
        for bucket in buckets:
            params = [p for p in bucket if p.grad is not None and not p.grad.is_sparse]
            if not params:
                continue
            grads = [p.grad for p in params]
            bad = ~torch.isfinite(tensor_norms_fp32(grads))
            if self.nonfinite == "skip":
                for g, b in zip(grads, bad.unbind(0)):
                    g.copy_(torch.where(b, torch.zeros_like(g), g))
            self._flags.flag(bad, params, "has a non-finite gradient")

    def check(self) -> None:
        """Wait for outstanding device-side checks and raise if any failed (syncs; for tests and logging)."""
        self._flags.check()

    @property
    def skipped_count(self) -> int:
        """Tensors whose gradient was non-finite or whose norm was zero/non-finite so far (syncs)."""
        return self._flags.skipped_count

    def _bend_lr(self) -> list[tuple[dict[str, Any], Any]]:
        """lr_power != 1: scale-invariant groups step with :func:`stepping_lr` (restored after the step)."""
        changed = []
        for g in self.param_groups:
            lr = stepping_lr(g)
            if lr != g["lr"]:
                changed.append((g, g["lr"]))
                g["lr"] = lr
        return changed

    # -- the classifier's step cap (fc_max_step) -------------------------------------------------
    def _save_for_cap(self) -> list[tuple[float, list[torch.Tensor], list[torch.Tensor]]]:
        saved = []
        for g in self.param_groups:
            if g.get("max_step") is not None:
                params = [p for p in g["params"] if p.grad is not None and p.ndim >= 2]
                if params:
                    saved.append((g["max_step"], params, [p.detach().clone() for p in params]))
        return saved

    @torch.no_grad()
    def _cap_steps(self, saved: list[tuple[float, list[torch.Tensor], list[torch.Tensor]]]) -> None:
        """:func:`shorten_step_` on each saved weight; the count of capped steps stays a device tensor (no sync)."""
        for max_step, params, before in saved:
            for p, b in zip(params, before):
                count = shorten_step_(p, b, max_step).to(torch.int64)
                self._capped_steps = count if self._capped_steps is None else self._capped_steps + count

    @property
    def capped_steps(self) -> int:
        """How many times ``fc_max_step`` has shortened a classifier step in this process (reads a device value)."""
        return 0 if self._capped_steps is None else int(self._capped_steps)

    # -- angular-update mode -----------------------------------------------------------------
    def _save_for_rotation(self) -> list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]:
        saved: list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]] = []
        if not any(g.get("angular_update") is not None for g in self.param_groups):
            return saved
        holding = {p for rule in self._hold_rules() if rule.holding for p in rule.params}
        for g in self.param_groups:
            if g.get("angular_update") is not None and g.get("constraint"):
                params = [p for p in g["params"] if p.grad is not None and p in holding]
                saved.append((g, params, [p.detach().clone() for p in params]))
        return saved

    def _rotate(self, saved: list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]]) -> None:
        for g, params, before in saved:
            angle = g["angular_update"] * (g["lr"] / g["lr_ref"]) ** g.get("angle_power", 1.0)
            for p, b in zip(params, before):
                rotate_by_angle_(p, b, angle, per_filter=g["constraint"] == "filter")

    # -- state dict: the base optimizer's; the rules add their entries through the state-dict hooks --------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, each held parameter's target in its own state entry.

        Per-parameter entries (``fixnorm_target``, fp32; ``fixnorm_held``; ``fixnorm_steps``, added by the
        rules' attachment) are what every checkpoint API carries, including
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, which keeps only ``state`` and
        ``param_groups`` (renamed by parameter name, sharded under FSDP).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.base.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        state_dict = _from_version_1(dict(state_dict))
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        try:
            self.base.load_state_dict(state_dict)
        except ValueError as exc:  # torch's "different number of parameter groups" / "parameter group ... size"
            roles = [g.get("role") for g in self.param_groups]
            raise FixNormError(f"the saved optimizer state does not fit this FixNorm ({exc}); its parameter groups "
                               f"are one per role, here {roles}: was it saved with other settings (joint, "
                               "fc_free_steps, others, another model)?") from exc
        self._grad_params = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _from_version_1(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The first layout kept the targets in a top-level ``"fixnorm"`` entry: move them to per-parameter entries."""
    legacy = state_dict.pop("fixnorm", None)
    if not (isinstance(legacy, Mapping) and "targets" in legacy):
        return state_dict
    steps = torch.as_tensor(int(legacy.get("steps", 0)), dtype=torch.int64)
    state = dict(state_dict.get("state", {}))
    for key, target in legacy["targets"].items():
        key = int(key)
        state[key] = {**state.get(key, {}), "fixnorm_target": target, "fixnorm_steps": steps.clone()}
    state_dict["state"] = state
    return state_dict


def steps_through_warmup(free_steps: int, warmup_steps: float) -> int:
    """The optimizer steps a free phase of ``free_steps`` full-lr steps takes under a linear warm-up of
    ``warmup_steps`` steps (lr x (t + 1) / warmup_steps at step t, the engine's, timm's and HF's shape): a warm-up
    step at a fraction of the lr counts as that fraction of a step. Without a warm-up, ``free_steps`` itself.

    The norms a free phase reaches are set by how far training has moved, not by how many steps it took; a
    100-step phase inside a warm-up ends at a fraction of the lr, with the norms near their initialisation."""
    if isinstance(free_steps, bool) or not isinstance(free_steps, int) or free_steps < 0:
        raise FixNormError(f"free_steps must be a whole number of steps >= 0, got {free_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, float)) or not (
            math.isfinite(warmup_steps) and warmup_steps >= 0):
        raise FixNormError(f"warmup_steps must be a number of steps >= 0, got {warmup_steps!r}")
    steps, mass = 0, 0.0
    while mass < free_steps - 1e-9:
        if steps + 1 >= warmup_steps:  # the rest at the full lr
            return steps + math.ceil(free_steps - mass - 1e-9)
        steps += 1
        mass += steps / warmup_steps
    return steps


def stepping_lr(group: Mapping[str, Any]) -> float:
    """The lr a param group's weights actually step with: ``lr_ref * (e + (1 - e) * ((r - e) / (1 - e)) **
    lr_power)``, r = lr / lr_ref, e = the group's ``schedule_end`` (0: ``lr_ref * r ** lr_power``).

    ``lr`` is what the scheduler set; groups without ``lr_power`` (or power 1), and any lr at or below the
    schedule's end, step with it as it is. Diagnostics use this for the effective learning rate.
    """
    power, ref = group.get("lr_power", 1.0), group.get("lr_ref")
    if power == 1.0 or not ref:
        return group["lr"]
    end, ratio = group.get("schedule_end", 0.0), group["lr"] / ref
    if end >= 1.0 or ratio <= end:  # at e = 0 the formula below is ref * ratio ** power exactly
        return group["lr"]
    return ref * (end + (1 - end) * ((ratio - end) / (1 - end)) ** power)


def from_weight_decay(lr: float, weight_decay: float, momentum: float = 0.0) -> dict[str, float]:
    """FixNorm settings with the same equilibrium angular update as an SGD + weight-decay recipe.

    Scale-invariant weights under SGD with momentum and weight decay settle where their
    angular update per step is sqrt(2 * lr * wd / (1 + momentum)) radians (Wan et al.
    2020, "Spherical Motion Dynamics"; Kosson et al. 2023, "Rotational Equilibrium").
    The result sets ``angular_update`` to that angle, so FixNorm(model, x, **result)
    turns every scale-invariant weight by it on every step instead of on average.
    """
    for label, value in (("lr", lr), ("weight_decay", weight_decay)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise FixNormError(f"{label} must be a positive number, got {value!r}")
    if not (0 <= momentum < 1):
        raise FixNormError(f"momentum must be in [0, 1), got {momentum!r}")
    return {"lr": float(lr), "momentum": float(momentum),
            "angular_update": math.sqrt(2 * lr * weight_decay / (1 + momentum))}


def constrained_parameters(optimizer: FixNorm) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, parameter) for every norm-constrained parameter, in plan order."""
    for g in optimizer.param_groups:
        if g.get("constraint"):
            for p in g["params"]:
                yield optimizer._names.get(p, "?"), p
