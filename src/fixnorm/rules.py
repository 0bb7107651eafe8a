"""Rules: small per-step jobs on some parameters, and the one ``attach`` that runs them after an optimizer's step.

A rule does one thing (hold norms, centre filters, ...). ``attach(optimizer, rules)`` owns everything around it,
once for every method:

- one step post-hook (torch's public ``register_step_post_hook``), so any ``torch.optim`` optimizer works;
- one non-finite policy: kernels return "bad" flags as device tensors, checked without stalling the device,
  raised as :class:`NonFiniteError` (or counted and skipped with ``nonfinite="skip"``);
- the state: each rule's per-parameter tensors (and the step count) ride in the optimizer's own
  ``state_dict()["state"]`` entries, which every checkpoint API carries, distributed ones included.

FixNorm (``optim.py``) and LAWN (``methods/lawn.py``) are ``HoldNorms``, from the first step or from the end of a
free phase / warm-up; MimicNorm's centring (``methods/mimicnorm.py``) is ``CentreFilters``; ``Mask`` and ``Project``
are the rules pruning and ADMM-style methods build on; ``FollowNorms`` replays a recorded norm trajectory (the
replay diagnostic).
"""
from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .constraints import filter_norms, fix_filter_norms_, fix_tensor_norms_, tensor_norms_fp32
from .errors import FixNormError, NonFiniteError

NONFINITE_POLICIES = ("raise", "skip")


class DeviceFlags:
    """Per-parameter "bad" flags from in-place kernels, checked when it is cheap.

    "raise": CPU flags are checked at once; device flags are copied to pinned memory without a sync and
    raised when their copy has landed (at the latest by :meth:`check`). "skip": they are only counted.
    """

    def __init__(self, policy: str, names: Mapping[torch.Tensor, str]) -> None:
        if policy not in NONFINITE_POLICIES:
            raise FixNormError(f"unknown nonfinite policy {policy!r}; choose one of {NONFINITE_POLICIES}")
        self.policy = policy
        self.names = names
        self._pending: list[tuple[torch.Tensor, Any, list[torch.Tensor], str]] = []
        self._skipped: dict[torch.device, torch.Tensor] = {}

    def flag(self, bad: torch.Tensor, params: list[torch.Tensor], what: str) -> None:
        if self.policy == "skip":
            count = self._skipped.get(bad.device)
            self._skipped[bad.device] = bad.sum() if count is None else count + bad.sum()
            return
        if bad.device.type == "cpu":
            self._pending.append((bad, None, params, what))
            return
        host = torch.empty(bad.shape, dtype=bad.dtype, pin_memory=True)
        host.copy_(bad, non_blocking=True)
        event = torch.cuda.Event() if bad.device.type == "cuda" else None
        if event is not None:
            event.record()
        self._pending.append((host, event, params, what))

    def raise_ready(self, wait: bool = False) -> None:
        """Raise for flags that are ready: CPU ones at once, device ones when their copy has landed."""
        still = []
        for host, event, params, what in self._pending:
            if event is not None and not (wait or event.query()):
                still.append((host, event, params, what))
                continue
            if event is not None:
                event.synchronize()
            if bool(host.any()):
                self._pending = []
                bad_names = [self.names.get(p, "?") for p, b in zip(params, host.tolist()) if b]
                raise NonFiniteError(f"parameter(s) {bad_names[:6]} {what}. The step was applied: reload the last "
                                     "checkpoint. A NaN/inf gradient usually means the learning rate is too high or "
                                     "the loss overflowed (fp16 without GradScaler); nonfinite='skip' skips such "
                                     "updates instead")
        self._pending = still

    def check(self) -> None:
        """Wait for every outstanding flag and raise if any is set (syncs)."""
        self.raise_ready(wait=True)

    @property
    def skipped_count(self) -> int:
        """Flags counted so far under "skip" (syncs)."""
        return int(sum(int(c) for c in self._skipped.values()))


class Rule:
    """One job on ``params`` after every optimizer step.

    Subclasses implement :meth:`apply_` (in place, no host sync; bad flags go to ``flags``) and, when they
    keep per-parameter tensors, :meth:`param_state` / :meth:`load_param_state`.
    """

    params: list[torch.Tensor]
    state_fields: tuple[str, ...] = ()  # names of the per-parameter tensors it checkpoints (none: stateless)

    @property
    def stateful(self) -> bool:
        return bool(self.state_fields)

    def on_attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once by :func:`attach` (check the optimizer, adjust its groups)."""

    def apply_(self, step: int, flags: DeviceFlags) -> None:
        """Act after optimizer step number ``step`` (1 for the first step after attaching)."""
        raise NotImplementedError

    def param_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per-parameter tensors to checkpoint, keyed by the index in ``params``."""
        return {}

    def load_param_state(self, entries: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        """Restore what :meth:`param_state` gave (``step``: the attachment's step count when it was saved)."""


def _bucket_by_layout(params: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``params`` grouped by (device, dtype), for one multi-tensor kernel per group."""
    buckets: OrderedDict[tuple[torch.device, torch.dtype], list[int]] = OrderedDict()
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)
    return list(buckets.values())


def equilibrium_constant_of(lr: float, weight_decay: float, momentum: float) -> float:
    """``K = lr / (2 wd (1 - momentum))``: SGD with weight decay settles a scale-invariant weight where
    ``|w|**4 = K * |g~|**2`` (Kosson et al. 2023)."""
    return lr / (2 * weight_decay * (1 - momentum))


def equilibrium_norms(grad_sq: Sequence[torch.Tensor], constant: float,
                      like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``(constant * grad_sq) ** (1/4)`` per weight: the norm SGD with weight decay settles at for this gradient scale
    (see ``HoldNorms``'s ``ceiling``), shaped, typed and placed like ``like``. A zero or non-finite ``grad_sq`` gives
    +inf: no equilibrium, no cap."""
    out = []
    for g, n in zip(grad_sq, like):
        g = torch.as_tensor(g, dtype=torch.float32).to(n.device).reshape(n.shape)
        norm = (constant * g) ** 0.25
        out.append(torch.where(torch.isfinite(norm) & (norm > 0), norm, torch.full_like(norm, math.inf)).to(n.dtype))
    return out


DRIFT_SIGNALS = ("gradient", "growth")
DRIFT_FLOOR = 1e-3  # a drift factor never goes below this: a vanished gradient does not zero a weight


def running_mean_step(mean: torch.Tensor, value: torch.Tensor, drift_steps: int) -> torch.Tensor:
    """One step of the drift's running mean (time constant ``drift_steps``); a non-finite value leaves it."""
    beta = 1.0 - 1.0 / drift_steps
    return torch.where(torch.isfinite(value), beta * mean + (1.0 - beta) * value, mean)


def running_mean_correction(drift_steps: int, step: int, start: int) -> float:
    """What a running mean that started at zero after step ``start`` is divided by after ``step`` steps."""
    return 1.0 - (1.0 - 1.0 / drift_steps) ** max(step - start, 1)


def drifted_targets(base: torch.Tensor, mean: torch.Tensor, correction: float, ref: torch.Tensor) -> torch.Tensor:
    """The drift law: the norms taken times ``(mean / ref) ** (1/4)`` (weight decay's equilibrium norm goes as the
    square root of the unit-norm gradient), never below DRIFT_FLOOR of them; no reference, no drift."""
    tiny = torch.finfo(torch.float32).tiny
    factor = torch.where(ref > 0, (mean / correction / ref.clamp_min(tiny)) ** 0.25, torch.ones_like(ref))
    return base * factor.clamp_min(DRIFT_FLOOR)


class HoldNorms(Rule):
    """Hold each parameter's L2 norm (the whole tensor's, or each filter's) at a target after every step.

    Args:
        params: the weights to hold.
        names: their names, for messages.
        per: "tensor" (one norm per tensor) or "filter" (one per slice along dim 0).
        targets: fp32 targets, one per parameter (a scalar for "tensor", a vector for "filter"), held from the
            first step; None takes each parameter's norm(s) right after step ``from_step``.
        from_step: with ``targets=None``, the step after which the norms are taken (0: at attach; None: set
            ``from_step`` before the first step). The steps before it are free: "from step k on".
        scale: with ``targets=None``, a factor per parameter index applied to the norm taken (default 1).
        on_hold: called once with the rule when the targets are taken (LAWN turns weight decay off there).
        drift_steps: with ``targets=None`` and ``per="tensor"``: the held norms drift with each weight's gradient
            scale as weight decay's equilibrium norm does. A running mean (time constant ``drift_steps`` steps) of
            the squared unit-norm gradient ``(|g| * |w|)**2`` is kept from the middle of the free phase (the first
            steps' large gradients would otherwise set the reference); after the norms are taken each target is
            ``taken * (mean_now / mean_when_taken) ** (1/4)``. Under SGD with weight decay
            lambda a scale-invariant weight settles where ``|w|**4 = lr * |g~|**2 / (2 * lambda)`` (up to the
            momentum factor), ``|g~|`` being the gradient at unit norm: its equilibrium norm goes as the square
            root of ``|g~|``, which is this rule with the constant taken from the free phase instead of a
            weight decay. None (default): the targets stay where they were taken.
        ceiling: with ``drift_steps``: no norm is taken above weight decay's equilibrium. Under SGD with weight
            decay lambda and momentum m a scale-invariant weight settles where ``|w|**4 = K * |g~|**2`` with
            ``K = lr / (2 * lambda * (1 - m))`` (Kosson et al. 2023); a norm above it decays back within about
            ``(1 - m) / (4 * lr * lambda)`` steps, while the free phase has only the growth half of that dynamics. With
            K given here, each norm taken is ``min(norm, (K * |g~|**2) ** (1/4))``, ``|g~|**2`` the running mean the
            drift keeps. None (default): the norms as the free phase left them.
        drift_lr: with ``drift_steps``: a function returning the scheduler's lr over the lr at construction,
            read once per step. The drift then follows weight decay's norm dynamics in the lr too: ``|w|**4``
            relaxes toward ``K * lr * |g~|**2`` at weight decay's rate, ``drift_lr() / drift_steps`` per step
            (``drift_steps`` is the relaxation time at the lr of construction, ``(1 - m) / (4 * lr * lambda)``). The
            running mean is of ``drift_lr() * (|g| * |w|)**2`` with that per-step weight, and corrected by the
            weights' sum. Under a decaying schedule the held norm then shrinks as ``lr ** (1/4)`` while the lr is
            large and freezes once weight decay could no longer move it, so the weights should step with the
            scheduler's lr (``lr_power=1``): the norm carries the square-root law. None (default): a constant time
            constant, the lr's law left to ``lr_power``.
        drift_signal: with ``drift_lr``, what drives the held norm. "gradient" (default): the law above, weight
            decay's equilibrium as if successive gradients were uncorrelated, anchored where the norms were taken.
            "growth": the norm growth the base step itself produced, measured before the projection: after every
            step ``|w|**4`` becomes ``(1 - r / N) * t**4 + 2 * (|w'|**2 - t**2) * t**2`` (t the held norm the
            step started from, |w'| the norm it reached, r the lr ratio): weight decay's own norm equation with its
            growth term measured instead of modelled. To first order that is decoupled weight decay of
            ``lr * wd / (1 - m)`` per step applied to the norm alone; no anchor, no gradient model.
    """

    state_fields: tuple[str, ...] = ("target", "held")
    DRIFT_ONLY_FIELDS = ("grad_sq", "grad_sq_ref", "base_target")  # checkpointed too when the norms drift
    DRIFT_LR_FIELDS = ("grad_sq_weight",)  # and the running mean's weight when the drift follows the lr

    def __init__(self, params: Sequence[torch.Tensor], *, names: Sequence[str] | None = None, per: str = "tensor",
                 targets: Sequence[torch.Tensor] | None = None, from_step: int | None = 0,
                 scale: Mapping[int, float] | None = None,
                 on_hold: Callable[[HoldNorms], None] | None = None,
                 drift_steps: int | None = None, ceiling: float | None = None,
                 drift_lr: Callable[[], float] | None = None, drift_signal: str = "gradient") -> None:
        if per not in ("tensor", "filter"):
            raise FixNormError(f"HoldNorms per must be 'tensor' or 'filter', got {per!r}")
        if drift_steps is not None:
            if isinstance(drift_steps, bool) or not isinstance(drift_steps, int) or drift_steps < 1:
                raise FixNormError(f"drift_steps must be a whole number of steps >= 1, got {drift_steps!r}")
            if per != "tensor" or targets is not None or not from_step:
                raise FixNormError("drifting norms need per='tensor' and norms taken after a free phase "
                                   "(targets=None, from_step >= 1): the drift is measured against the gradient "
                                   "scale at the moment the norms are taken")
        if drift_lr is not None and drift_steps is None:
            raise FixNormError("drift_lr makes the drift follow the lr; give drift_steps (the relaxation time at the "
                               "lr of construction) too")
        if drift_signal not in DRIFT_SIGNALS:
            raise FixNormError(f"drift_signal must be one of {DRIFT_SIGNALS}, got {drift_signal!r}")
        if drift_signal == "growth" and drift_lr is None:
            raise FixNormError("drift_signal='growth' runs weight decay's norm equation, whose rate follows the lr: "
                               "give drift_lr (FixNorm: drift_follows_lr=True) too")
        self.drift_signal = drift_signal
        if ceiling is not None:
            if drift_steps is None:
                raise FixNormError("ceiling caps the norms from each weight's gradient scale, which only drifting "
                                   "norms measure: give drift_steps too")
            if isinstance(ceiling, bool) or not isinstance(ceiling, (int, float)) or not (
                    math.isfinite(ceiling) and ceiling > 0):
                raise FixNormError(f"ceiling must be a positive number (weight decay's equilibrium constant K), "
                                   f"got {ceiling!r}")
        self.ceiling = ceiling
        self.params = list(params)
        if not self.params:
            raise FixNormError("HoldNorms needs at least one parameter")
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.params))]
        if len(self.names) != len(self.params):
            raise FixNormError("HoldNorms got a different number of names and params")
        if per == "filter":
            flat = [n for n, p in zip(self.names, self.params) if p.ndim < 2]
            if flat:
                raise FixNormError(f"{flat[:4]}: holding filter norms needs ndim >= 2")
        self.per = per
        self.scale = dict(scale or {})
        self.on_hold = on_hold
        self._from_step: int | None = None
        self.targets: list[torch.Tensor] | None = None
        self._kernels: list[tuple[list[torch.Tensor], Any]] | None = None
        self._layout: list[tuple[torch.device, torch.dtype]] = []
        self.drift_steps = drift_steps
        self.drift_lr = drift_lr
        self._mean_weight = 0.0  # with drift_lr: the sum of the running mean's weights so far (its correction)
        if drift_steps is not None:
            self.state_fields = HoldNorms.state_fields + self.DRIFT_ONLY_FIELDS + (
                self.DRIFT_LR_FIELDS if drift_lr is not None else ())
            self._grad_sq = [torch.zeros((), dtype=torch.float32, device=p.device) for p in self.params]
            self._grad_sq_ref: list[torch.Tensor] | None = None
            self._stacks: list[Any] | None = None  # see _drift_stacks
            self._base: list[torch.Tensor] | None = None
        if targets is not None:
            targets = [torch.as_tensor(t, dtype=torch.float32) for t in targets]
            self._check_targets(targets)
            self.targets = [t.to(p.device).clone() for t, p in zip(targets, self.params)]
            self._from_step = 0
        else:
            self.from_step = from_step
            if from_step == 0:
                self.take_targets()

    # -- the moment the norms are taken ---------------------------------------------------------
    @property
    def from_step(self) -> int | None:
        return self._from_step

    @from_step.setter
    def from_step(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise FixNormError(f"from_step must be a whole number of steps >= 0 (or None to set later), got {value!r}")
        if self.targets is not None and self._from_step is not None and value != self._from_step:
            raise FixNormError(f"the norms were already taken after step {self._from_step}; from_step cannot "
                               f"change to {value}")
        self._from_step = value

    @property
    def holding(self) -> bool:
        """Whether the targets are taken and the norms held."""
        return self.targets is not None

    @torch.no_grad()
    def current_norms(self) -> list[torch.Tensor]:
        """Each parameter's norm now (fp32; a vector for "filter"), on its device, without a host sync."""
        if self.per == "filter":
            return [filter_norms(p).float() for p in self.params]
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.params)
        for bucket in _bucket_by_layout(self.params):
            norms = tensor_norms_fp32([self.params[i] for i in bucket]).float()
            for i, n in zip(bucket, norms.unbind(0)):
                out[i] = n
        return out

    @torch.no_grad()
    def checked_norms(self) -> list[torch.Tensor]:
        """:meth:`current_norms`, raising on a zero or non-finite one (syncs)."""
        norms = self.current_norms()
        bad = [n for n, t in zip(self.names, norms) if not bool((torch.isfinite(t) & (t > 0)).all())]
        if bad:
            raise FixNormError(f"parameter(s) {bad[:6]} have a zero or non-finite norm when their norms are taken "
                               f"(after step {self._from_step}): a zero weight has no direction to hold. Initialise "
                               "them, lower the learning rate, or leave them out")
        return norms

    def take_targets(self) -> None:
        """Hold every parameter at its norm(s) now (capped at ``ceiling``'s equilibrium), times its ``scale``."""
        norms = self.checked_norms()
        if self.drift_steps is not None:
            self._grad_sq_ref = self._grad_sq_mean(self._from_step)  # drifting rules take their norms there
            if self.ceiling is not None:
                norms = [torch.minimum(n, e) for n, e in zip(norms, equilibrium_norms(self._grad_sq_ref,
                                                                                      self.ceiling, like=norms))]
        self.targets = [n.clone() * self.scale[i] if i in self.scale else n.clone() for i, n in enumerate(norms)]
        self._kernels = None
        if self.drift_steps is not None:
            self._base = [t.clone() for t in self.targets]
            self._stacks = None
        if self.on_hold is not None:
            self.on_hold(self)

    # -- the step -------------------------------------------------------------------------------
    def _kernel_plan(self) -> list[tuple[list[torch.Tensor], Any]]:
        layout = [(p.device, p.dtype) for p in self.params]
        if self._kernels is None or layout != self._layout:
            assert self.targets is not None
            self._layout = layout
            self.targets = [t.to(p.device) for t, p in zip(self.targets, self.params)]
            kernels = []
            for bucket in _bucket_by_layout(self.params):
                params = [self.params[i] for i in bucket]
                if self.per == "tensor":
                    targets: Any = torch.stack([self.targets[i].reshape(()) for i in bucket])
                else:
                    targets = [self.targets[i] for i in bucket]
                kernels.append((params, targets))
            self._kernels = kernels
        return self._kernels

    @torch.no_grad()
    def project_(self, flags: DeviceFlags) -> None:
        """Every parameter back to its target norm(s) now."""
        for params, targets in self._kernel_plan():
            bad = fix_tensor_norms_(params, targets) if self.per == "tensor" else fix_filter_norms_(params, targets)
            flags.flag(bad, params, "has a zero or non-finite norm after the step (a NaN/inf gradient?)")

    # -- drifting norms --------------------------------------------------------------------------
    def _lr_step(self) -> float:
        """With ``drift_lr``: the lr ratio of this step, after adding its weight to the running mean's sum."""
        assert self.drift_lr is not None and self.drift_steps is not None
        ratio = float(self.drift_lr())
        if not (math.isfinite(ratio) and ratio >= 0):
            raise FixNormError(f"drifting norms that follow the lr got an lr ratio of {ratio!r}; the scheduler's lr "
                               "must be finite and >= 0")
        rate = min(ratio / self.drift_steps, 1.0)
        self._mean_weight = (1.0 - rate) * self._mean_weight + rate
        return ratio

    @torch.no_grad()
    def _track_grad_sq(self, ratio: float | None) -> None:
        """During the free phase: one step of each weight's running mean of (|g| * |w|)**2, |w| its norm now (no
        projection moves it). Once the norms are held :meth:`_drift_step` does this on stacks."""
        for bucket in _bucket_by_layout(self.params):
            params = [self.params[i] for i in bucket]
            old = torch.stack([self._grad_sq[i] for i in bucket])
            new = self._next_mean(old, params, tensor_norms_fp32(params).float(), ratio)
            for i, v in zip(bucket, new.unbind(0)):
                self._grad_sq[i] = v

    def _next_mean(self, mean: torch.Tensor, params: list[torch.Tensor], weight_norms: torch.Tensor,
                   ratio: float | None) -> torch.Tensor:
        """``mean`` (stacked, one per parameter) after one more step of (|g| * |w|)**2 (times the lr ratio, at the
        lr's rate, with ``drift_lr``); a non-finite value leaves it as it was."""
        assert self.drift_steps is not None
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        value = (tensor_norms_fp32(grads).float() * weight_norms) ** 2
        if ratio is None:
            return running_mean_step(mean, value, self.drift_steps)
        rate = min(ratio / self.drift_steps, 1.0)
        return torch.where(torch.isfinite(value), (1.0 - rate) * mean + rate * ratio * value, mean)

    def _drift_start(self) -> int:
        """The running mean counts the steps after this one: the second half of the free phase on."""
        return (self._from_step or 0) // 2

    def _correction(self, step: int) -> float:
        """What the running means are divided by after ``step`` steps: they started at zero."""
        if self.drift_lr is not None:  # the sum of the weights so far (at least one tiny one: never a division by 0)
            return max(self._mean_weight, torch.finfo(torch.float32).tiny)
        return running_mean_correction(self.drift_steps, step, self._drift_start())

    def _grad_sq_mean(self, step: int) -> list[torch.Tensor]:
        """The running means after ``step`` steps, corrected for their start at zero."""
        return [m / self._correction(step) for m in self._grad_sq]

    def _drift_stacks(self) -> list[tuple[list[int], list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]]:
        """Per (device, dtype) bucket: indices, params, and the stacked running means, references, norms taken and
        targets. The per-parameter entries become views of the stacks, so one in-place update serves both."""
        assert self._base is not None and self._grad_sq_ref is not None
        layout = [(p.device, p.dtype) for p in self.params]
        if self._stacks is None or self._kernels is None or layout != self._layout:
            kernels = self._kernel_plan()
            assert self.targets is not None
            self._stacks = []
            for bucket, (params, targets) in zip(_bucket_by_layout(self.params), kernels):
                def stack(values: list[torch.Tensor]) -> torch.Tensor:
                    return torch.stack([values[i].to(targets.device).reshape(()) for i in bucket])
                mean, ref, base = stack(self._grad_sq), stack(self._grad_sq_ref), stack(self._base)
                for j, i in enumerate(bucket):
                    self._grad_sq[i], self.targets[i] = mean[j], targets[j]
                self._stacks.append((bucket, params, mean, ref, base, targets))
        return self._stacks

    @torch.no_grad()
    def _drift_step(self, step: int, ratio: float | None) -> None:
        """Once the norms are held: update the running means and move every target, a few kernels per bucket."""
        if self.drift_signal == "growth":
            assert ratio is not None and self.drift_steps is not None
            self._growth_step(min(ratio / self.drift_steps, 1.0))
            return
        correction = self._correction(step)
        for _, params, mean, ref, base, targets in self._drift_stacks():
            mean.copy_(self._next_mean(mean, params, targets, ratio))  # targets: the norms the gradients were taken at
            targets.copy_(drifted_targets(base, mean, correction, ref))

    @torch.no_grad()
    def _growth_step(self, rate: float) -> None:
        """drift_signal="growth": each target's fourth power takes weight decay's norm equation, its decay at
        ``rate`` and its growth the one this step made (the parameters hold the step's result, not yet projected).
        A non-finite norm leaves the target (the projection reports it); the floor is DRIFT_FLOOR of the norm taken."""
        for _, params, _, _, base, targets in self._drift_stacks():
            reached_sq = tensor_norms_fp32(params).float() ** 2
            held_sq = targets * targets
            quartic = (1.0 - rate) * held_sq * held_sq + 2.0 * (reached_sq - held_sq) * held_sq
            floor = base * DRIFT_FLOOR
            moved = quartic.clamp_min(0.0) ** 0.25
            targets.copy_(torch.where(torch.isfinite(quartic), torch.maximum(moved, floor), targets))

    def apply_(self, step: int, flags: DeviceFlags) -> None:
        if self.drift_steps is not None and step > self._drift_start():
            ratio = self._lr_step() if self.drift_lr is not None else None
            if self.targets is not None:
                self._drift_step(step, ratio)
            else:
                self._track_grad_sq(ratio)
        if self.targets is None:
            if self._from_step is None:
                raise FixNormError("the step from which the norms are held (HoldNorms.from_step, LAWN's "
                                   "warmup_steps) is not set: set it before the first optimizer step")
            if step >= self._from_step:
                self.take_targets()
                if self.scale or self.ceiling is not None:
                    self.project_(flags)  # a scaled or capped weight moves to its new norm now, not one step later
            return
        self.project_(flags)

    # -- state ----------------------------------------------------------------------------------
    def _check_targets(self, targets: Sequence[torch.Tensor]) -> None:
        if len(targets) != len(self.params):
            raise FixNormError(f"HoldNorms got {len(targets)} targets for {len(self.params)} parameters")
        for name, t, p in zip(self.names, targets, self.params):
            shape = (p.shape[0],) if self.per == "filter" else ()
            if tuple(t.shape) not in (shape, (1,) if self.per == "tensor" else shape):
                raise FixNormError(f"the target of {name!r} has the wrong shape {tuple(t.shape)}, expected {shape} "
                                   f"(per {self.per!r})")
            if not bool((torch.isfinite(t) & (t > 0)).all()):
                raise FixNormError(f"target of {name!r} must be positive and finite")

    def param_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """``target`` (a placeholder of ones before the norms are taken) and ``held`` (0 or 1) per parameter.

        The keys are the same before and after the norms are taken: distributed checkpoint loads only the
        keys a fresh optimizer's state dict already has.
        """
        held = torch.tensor(int(self.targets is not None), dtype=torch.int64)
        out = {}
        for i, p in enumerate(self.params):
            if self.targets is not None:
                target = self.targets[i].detach().clone()
            else:
                target = torch.ones((p.shape[0],) if self.per == "filter" else (), dtype=torch.float32)
            out[i] = {"target": target, "held": held.clone()}
            if self.drift_steps is not None:
                held_now = self._base is not None and self._grad_sq_ref is not None
                out[i]["grad_sq"] = self._grad_sq[i].detach().clone()
                out[i]["grad_sq_ref"] = (self._grad_sq_ref[i].detach().clone() if held_now
                                         else torch.ones((), dtype=torch.float32))
                out[i]["base_target"] = (self._base[i].detach().clone() if held_now
                                         else torch.ones((), dtype=torch.float32))
                if self.drift_lr is not None:
                    out[i]["grad_sq_weight"] = torch.tensor(self._mean_weight, dtype=torch.float64)
        return out

    def load_param_state(self, entries: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        if set(entries) != set(range(len(self.params))) or not all("target" in e for e in entries.values()):
            raise FixNormError("the saved norm targets do not match this rule's parameters; was the state saved "
                               "with other parameters held (another plan, another model)?")
        # entries without "held" (FixNorm's layout before rules): held once from_step is reached
        implied = int(self._from_step is not None and step >= self._from_step)
        held = {int(e.get("held", implied)) for e in entries.values()}
        if held not in ({0}, {1}):
            raise FixNormError(f"the saved 'held' flags {sorted(held)} are not all 0 or all 1")
        self._kernels = None
        if self.drift_steps is not None:
            fields = self.DRIFT_ONLY_FIELDS + (self.DRIFT_LR_FIELDS if self.drift_lr is not None else ())
            missing = [f for f in fields if not all(f in e for e in entries.values())]
            if missing:
                raise FixNormError(f"the saved norm state has no {missing}: it was saved without drifting norms "
                                   f"{'that follow the lr ' if self.drift_lr is not None else ''}(another norm_drift); "
                                   "resume with the settings it was trained with")
            if self.drift_lr is not None:
                self._mean_weight = float(entries[0]["grad_sq_weight"])
            def saved(field: str) -> list[torch.Tensor]:
                return [entries[i][field].to(device=p.device, dtype=torch.float32).reshape(()).clone()
                        for i, p in enumerate(self.params)]
            self._grad_sq = saved("grad_sq")
            self._grad_sq_ref, self._base = ((saved("grad_sq_ref"), saved("base_target")) if held == {1}
                                             else (None, None))
            self._stacks = None
        if held == {0}:  # saved during the free steps: the norms are taken later, at from_step
            if self._from_step is not None and 0 < self._from_step <= step:
                raise FixNormError(f"the saved state is at step {step}, past from_step {self._from_step}, but its "
                                   "norms were not taken")
            self.targets = None
            return
        targets = [entries[i]["target"] for i in range(len(self.params))]
        if not all(isinstance(t, torch.Tensor) for t in targets):
            raise FixNormError("a saved norm target is not a tensor")
        self._check_targets(targets)
        self.targets = [t.to(device=p.device, dtype=torch.float32).clone() for t, p in zip(targets, self.params)]
        if self.on_hold is not None:
            self.on_hold(self)


class HoldJointNorms(Rule):
    """Hold the joint L2 norm of each group of weights, ``sqrt(sum of their squared norms)``, at a target.

    For weights that are scale-invariant only together (``Roles.joint``: in a pre-activation ResNet the convs that
    write one stage's residual stream, which the next BatchNorm reads): one factor on the whole group leaves the
    output unchanged, so the joint norm sets the group's effective learning rate as a single weight's norm sets
    its own, while the members' norms relative to each other are part of the function and stay free. The targets
    are taken after step ``from_step`` (0: at construction), times ``scale``; ``drift_steps`` and ``ceiling`` are
    :class:`HoldNorms`'s law with the group's joint gradient and norm (weight decay's equilibrium holds for the
    joint vector as it does for one weight: ``|w|**4 = K * |g~|**2``, ``|g~| = |g| * |w|`` over the group).
    Each member's state entry carries its group's target.
    """

    state_fields: tuple[str, ...] = ("joint_target", "held")
    DRIFT_FIELDS = ("joint_grad_sq", "joint_grad_sq_ref", "joint_base_target")

    def __init__(self, groups: Sequence[Sequence[torch.Tensor]], *, names: Sequence[Sequence[str]] | None = None,
                 from_step: int | None = 0, scale: float = 1.0, drift_steps: int | None = None,
                 ceiling: float | None = None) -> None:
        self.groups = [list(g) for g in groups]
        if not self.groups or any(len(g) < 2 for g in self.groups):
            raise FixNormError("HoldJointNorms needs groups of at least two weights (one weight alone: HoldNorms)")
        self.params = [p for g in self.groups for p in g]
        if len({id(p) for p in self.params}) != len(self.params):
            raise FixNormError("a weight is in two joint groups: the groups must not overlap")
        names = [list(g) for g in names] if names is not None else [
            [f"group{k}.param{i}" for i in range(len(g))] for k, g in enumerate(self.groups)]
        if [len(g) for g in names] != [len(g) for g in self.groups]:
            raise FixNormError("HoldJointNorms got names that do not match its groups")
        self.group_names = names
        self.names = [n for g in names for n in g]
        self.unit = torch.tensor([k for k, g in enumerate(self.groups) for _ in g])  # each param's group
        self._indices: dict[tuple[Any, ...], torch.Tensor] = {}  # index tensors on the weights' device, made once
        if drift_steps is not None and (isinstance(drift_steps, bool) or not isinstance(drift_steps, int)
                                        or drift_steps < 1 or not from_step):
            raise FixNormError("drifting joint norms need drift_steps >= 1 and norms taken after a free phase "
                               f"(from_step >= 1), got drift_steps={drift_steps!r}, from_step={from_step!r}")
        if ceiling is not None and drift_steps is None:
            raise FixNormError("ceiling needs drift_steps: only drifting norms measure the gradient scale")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise FixNormError(f"scale must be a positive number, got {scale!r}")
        self.scale, self.drift_steps, self.ceiling = float(scale), drift_steps, ceiling
        if drift_steps is not None:
            self.state_fields = HoldJointNorms.state_fields + self.DRIFT_FIELDS
        self._grad_sq = torch.zeros(len(self.groups), dtype=torch.float32)
        self._grad_sq_ref: torch.Tensor | None = None
        self._base: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None  # one fp32 joint norm per group
        self._from_step: int | None = None
        self.from_step = from_step
        if from_step == 0:
            self.take_targets()

    from_step = HoldNorms.from_step  # the same checks: a whole number, fixed once the norms are taken

    @property
    def holding(self) -> bool:
        return self.targets is not None

    def _device(self) -> torch.device:
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise FixNormError(f"the weights of a joint group are on several devices {sorted(map(str, devices))}; "
                               "hold their joint norms on one device")
        return next(iter(devices))

    def _index(self, key: tuple[Any, ...], values: Callable[[], list[int]], device: torch.device) -> torch.Tensor:
        """An index tensor on ``device``, copied there once (a copy every step would stall a GPU)."""
        full = (*key, device)
        if full not in self._indices:
            self._indices[full] = torch.tensor(values(), dtype=torch.long).to(device)
        return self._indices[full]

    @torch.no_grad()
    def _member_sq(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each tensor's squared norm (fp32 accumulation), one vector on the group's device, in ``params`` order."""
        device = self._device()
        buckets = _bucket_by_layout(tensors)
        sq = torch.cat([tensor_norms_fp32([tensors[i] for i in b]).float().to(device) for b in buckets]) ** 2
        if len(buckets) == 1:
            return sq
        order = self._index(("order", tuple(map(tuple, buckets))), lambda: torch.tensor(
            [i for b in buckets for i in b]).argsort().tolist(), device)
        return sq[order]

    def _group_sums(self, values: torch.Tensor) -> torch.Tensor:
        unit = self._index(("unit",), self.unit.tolist, values.device)
        return torch.zeros(len(self.groups), dtype=values.dtype, device=values.device).index_add_(0, unit, values)

    def joint_norms(self) -> torch.Tensor:
        """Each group's joint norm now (fp32, on the weights' device, no host sync)."""
        return self._group_sums(self._member_sq(self.params)).sqrt()

    def _unit_grad_sq(self, weight_norms: torch.Tensor) -> torch.Tensor:
        """``(|g| * |w|)**2`` per group: the squared gradient at unit joint norm."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        return self._group_sums(self._member_sq(grads)) * weight_norms ** 2

    def _correction(self, step: int) -> float:
        assert self.drift_steps is not None
        return running_mean_correction(self.drift_steps, step, (self._from_step or 0) // 2)

    @torch.no_grad()
    def take_targets(self, step: int = 0) -> None:
        norms = self.joint_norms()
        bad = [n for k, n in enumerate(self.group_names) if not bool(torch.isfinite(norms[k]) & (norms[k] > 0))]
        if bad:
            raise FixNormError(f"joint group(s) {bad[:3]} have a zero or non-finite norm when their norms are taken "
                               f"(after step {self._from_step}): a zero weight has no direction to hold")
        if self.drift_steps is not None:
            self._grad_sq_ref = self._grad_sq.to(norms.device) / self._correction(step)
            if self.ceiling is not None:
                norms = torch.minimum(norms, equilibrium_norms([self._grad_sq_ref], self.ceiling, like=[norms])[0])
        self.targets = norms * self.scale
        if self.drift_steps is not None:
            self._base = self.targets.clone()

    @torch.no_grad()
    def project_(self, flags: DeviceFlags) -> None:
        assert self.targets is not None
        joint = self.joint_norms()
        unit = self._index(("unit",), self.unit.tolist, joint.device)
        ok = torch.isfinite(joint) & (joint > 0)
        self.targets = self.targets.to(joint.device)
        factors = torch.where(ok, self.targets / joint, torch.ones_like(joint))[unit].unbind(0)
        for bucket in _bucket_by_layout(self.params):
            torch._foreach_mul_([self.params[i] for i in bucket], [factors[i] for i in bucket])
        flags.flag(~ok[unit], self.params, "has a zero or non-finite joint norm after the step (a NaN/inf gradient?)")

    @torch.no_grad()
    def apply_(self, step: int, flags: DeviceFlags) -> None:
        if self.drift_steps is not None and step > (self._from_step or 0) // 2:
            # the gradients were taken at the held norms once they are held, at the current ones before
            value = self._unit_grad_sq(self.targets if self.targets is not None else self.joint_norms())
            self._grad_sq = running_mean_step(self._grad_sq.to(value.device), value, self.drift_steps)
            if self.targets is not None:
                assert self._base is not None and self._grad_sq_ref is not None
                self.targets = drifted_targets(self._base.to(value.device), self._grad_sq, self._correction(step),
                                               self._grad_sq_ref.to(value.device))
        if self.targets is None:
            if self._from_step is None:
                raise FixNormError("HoldJointNorms.from_step is not set: set it before the first optimizer step")
            if step >= self._from_step:
                self.take_targets(step)
                if self.scale != 1 or self.ceiling is not None:
                    self.project_(flags)
            return
        self.project_(flags)

    def param_state(self) -> dict[int, dict[str, torch.Tensor]]:
        held = torch.tensor(int(self.targets is not None), dtype=torch.int64)
        out: dict[int, dict[str, torch.Tensor]] = {}
        for i, k in enumerate(self.unit.tolist()):
            out[i] = {"joint_target": (self.targets[k].detach().clone() if self.targets is not None
                                       else torch.ones((), dtype=torch.float32)), "held": held.clone()}
            if self.drift_steps is not None:
                holding = self._base is not None and self._grad_sq_ref is not None
                out[i]["joint_grad_sq"] = self._grad_sq[k].detach().clone()
                out[i]["joint_grad_sq_ref"] = (self._grad_sq_ref[k].detach().clone() if holding
                                               else torch.ones((), dtype=torch.float32))
                out[i]["joint_base_target"] = (self._base[k].detach().clone() if holding
                                               else torch.ones((), dtype=torch.float32))
        return out

    def load_param_state(self, entries: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        fields = self.state_fields
        if set(entries) != set(range(len(self.params))) or not all(
                all(f in e for f in fields) for e in entries.values()):
            raise FixNormError("the saved joint norm state does not match these joint groups (another plan, another "
                               "model, or saved with other joint or norm_drift settings)")
        held = {int(e["held"]) for e in entries.values()}
        if held not in ({0}, {1}):
            raise FixNormError(f"the saved 'held' flags {sorted(held)} are not all 0 or all 1")

        def per_group(field: str) -> torch.Tensor:
            values = [[float(entries[i][field]) for i, u in enumerate(self.unit.tolist()) if u == k]
                      for k in range(len(self.groups))]
            if any(max(v) != min(v) for v in values):
                raise FixNormError(f"the saved {field} differs between the weights of one joint group: the groups "
                                   "were not these")
            return torch.tensor([v[0] for v in values], dtype=torch.float32)

        if self.drift_steps is not None:
            self._grad_sq = per_group("joint_grad_sq")
            self._grad_sq_ref, self._base = ((per_group("joint_grad_sq_ref"), per_group("joint_base_target"))
                                             if held == {1} else (None, None))
        if held == {0}:
            if self._from_step is not None and 0 < self._from_step <= step:
                raise FixNormError(f"the saved state is at step {step}, past from_step {self._from_step}, but its "
                                   "joint norms were not taken")
            self.targets = None
            return
        targets = per_group("joint_target")
        if not bool((torch.isfinite(targets) & (targets > 0)).all()):
            raise FixNormError("a saved joint norm target is not positive and finite")
        self.targets = targets


class FollowNorms(Rule):
    """Set each parameter's norm after step ``t`` to a recorded trajectory's value at ``t`` (the replay diagnostic).

    ``steps`` (increasing, from 0) and ``norms`` (one row per step, one column per parameter) are a norm trace, e.g.
    what the diagnostics of an SGD + weight decay run recorded; between two recorded steps the norm is interpolated
    linearly. With weight decay's norms replayed, FixNorm's weights see the reference run's effective learning rate
    step by step, so whatever still differs from it is not the norms. A step past the trace's end is an error: the
    trace says nothing about it.
    """

    state_fields = ("followed",)  # the norm set last: checkpointing it lets the attachment restore its step count

    def __init__(self, params: Sequence[torch.Tensor], steps: torch.Tensor, norms: torch.Tensor, *,
                 names: Sequence[str] | None = None) -> None:
        self.params = list(params)
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.params))]
        steps = torch.as_tensor(steps)
        norms = torch.as_tensor(norms)
        if not self.params or len(self.names) != len(self.params):
            raise FixNormError("FollowNorms needs parameters, and as many names as parameters")
        if steps.ndim != 1 or steps.numel() < 1 or steps.dtype.is_floating_point or int(steps[0]) != 0:
            raise FixNormError("a norm trace's steps must be whole step numbers starting at 0")
        if steps.numel() > 1 and not bool((steps[1:] > steps[:-1]).all()):
            raise FixNormError("a norm trace's steps must increase")
        if tuple(norms.shape) != (steps.numel(), len(self.params)):
            raise FixNormError(f"a norm trace of {len(self.params)} parameters over {steps.numel()} steps needs norms "
                               f"of shape {(steps.numel(), len(self.params))}, got {tuple(norms.shape)}")
        if not bool((torch.isfinite(norms) & (norms > 0)).all()):
            raise FixNormError("a norm trace holds a zero or non-finite norm: a weight with no norm has no direction")
        self.steps = [int(s) for s in steps]
        self.norms = norms.double().cpu()
        self.followed = [torch.ones((), dtype=torch.float32) for _ in self.params]

    @property
    def last_step(self) -> int:
        return self.steps[-1]

    def norms_at(self, step: int) -> torch.Tensor:
        """The trace's norms after ``step`` steps (float64, one per parameter), interpolated between records."""
        if not 0 <= step <= self.last_step:
            raise FixNormError(f"the norm trace ends at step {self.last_step}; this run is at step {step}. Replay a "
                               "trace of a run at least as long as this one")
        i = bisect.bisect_right(self.steps, step) - 1
        if self.steps[i] == step:
            return self.norms[i]
        s0, s1 = self.steps[i], self.steps[i + 1]
        weight = (step - s0) / (s1 - s0)
        return self.norms[i] * (1 - weight) + self.norms[i + 1] * weight

    @torch.no_grad()
    def apply_(self, step: int, flags: DeviceFlags) -> None:
        targets = self.norms_at(step).float()
        for bucket in _bucket_by_layout(self.params):
            params = [self.params[i] for i in bucket]
            wanted = targets[bucket].to(params[0].device)
            flags.flag(fix_tensor_norms_(params, wanted), params,
                       "has a zero or non-finite norm after the step (a NaN/inf gradient?)")
        self.followed = list(targets.unbind(0))

    def param_state(self) -> dict[int, dict[str, torch.Tensor]]:
        return {i: {"followed": f.clone()} for i, f in enumerate(self.followed)}

    def load_param_state(self, entries: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        if set(entries) != set(range(len(self.params))):
            raise FixNormError("the saved replay state covers other parameters than this trace's")
        self.followed = [entries[i]["followed"].float().reshape(()).clone() for i in range(len(self.params))]


class CentreFilters(Rule):
    """Subtract from each filter (slice along dim 0) its mean over the other dims, after every step.

    Means in fp32, one ``_foreach_sub_`` per (device, dtype), no host sync. Centres once at attach too.
    """

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.params = list(params)
        if not self.params:
            raise FixNormError("no weights to centre")
        flat = [tuple(p.shape) for p in self.params if p.ndim < 2]
        if flat:
            raise FixNormError(f"centring filters needs ndim >= 2, got shape(s) {flat[:3]}")

    def on_attach(self, optimizer: torch.optim.Optimizer) -> None:
        centre_filters_(self.params)

    def apply_(self, step: int, flags: DeviceFlags) -> None:
        centre_filters_(self.params)


@torch.no_grad()
def centre_filters_(params: Iterable[torch.Tensor]) -> None:
    """Subtract from each filter (slice along dim 0) its mean over dims 1.., in place (fp32 means)."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for p in params:
        if p.ndim < 2:
            raise FixNormError(f"centring filters needs tensors with ndim >= 2, got shape {tuple(p.shape)}")
        mean = p.mean(dim=tuple(range(1, p.ndim)), keepdim=True, dtype=torch.float32).to(p.dtype)
        tensors, means = groups.setdefault((p.device, p.dtype), ([], []))
        tensors.append(p)
        means.append(mean)
    for tensors, means in groups.values():
        torch._foreach_sub_(tensors, means)


class Mask(Rule):
    """Hold pruned entries at zero: ``w <- w * mask`` at attach and after every step (pruning, lottery tickets).

    Masks are boolean tensors shaped like their parameters (True keeps the entry); they are checkpointed with the
    optimizer's state. Masking after the step equals masking in the forward pass for the kept weights (a pruned
    weight is zero in every forward either way); a pruned weight's momentum may be non-zero but never reaches it.
    """

    state_fields = ("mask",)

    def __init__(self, params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], *,
                 names: Sequence[str] | None = None) -> None:
        self.params = list(params)
        self.names = list(names) if names is not None else [f"param{i}" for i in range(len(self.params))]
        if not self.params or len(masks) != len(self.params) or len(self.names) != len(self.params):
            raise FixNormError("Mask needs one boolean mask (and one name) per parameter, at least one")
        self.masks = [self._checked(m, p, n) for m, p, n in zip(masks, self.params, self.names)]

    @staticmethod
    def _checked(mask: Any, p: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != p.shape:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise FixNormError(f"the mask of {name!r} must be a bool tensor of shape {tuple(p.shape)}, got {got}")
        return mask.to(p.device).clone()

    @torch.no_grad()
    def _apply(self) -> None:
        for i, p in enumerate(self.params):
            if self.masks[i].device != p.device:  # the model moved after attach
                self.masks[i] = self.masks[i].to(p.device)
            p.mul_(self.masks[i])

    def on_attach(self, optimizer: torch.optim.Optimizer) -> None:
        self._apply()

    def apply_(self, step: int, flags: DeviceFlags) -> None:
        self._apply()

    def density(self) -> float:
        """The fraction of entries kept (syncs)."""
        kept = sum(int(m.sum()) for m in self.masks)
        return kept / sum(m.numel() for m in self.masks)

    def param_state(self) -> dict[int, dict[str, torch.Tensor]]:
        return {i: {"mask": m.clone()} for i, m in enumerate(self.masks)}

    def load_param_state(self, entries: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        if set(entries) != set(range(len(self.params))) or not all("mask" in e for e in entries.values()):
            raise FixNormError("the saved masks do not match this rule's parameters")
        self.masks = [self._checked(entries[i]["mask"], p, n) for i, (p, n) in enumerate(zip(self.params, self.names))]


class Project(Rule):
    """``w <- project(w)`` after every step: a projection onto a set (a box, a sparsity or block pattern, ADMM's
    constraint set). ``project`` maps a tensor to a tensor of the same shape; its own settings are the caller's."""

    def __init__(self, params: Sequence[torch.Tensor], project: Callable[[torch.Tensor], torch.Tensor], *,
                 at_attach: bool = True) -> None:
        self.params = list(params)
        if not self.params or not callable(project):
            raise FixNormError("Project needs parameters and a callable project(tensor) -> tensor")
        self.project = project
        self.at_attach = at_attach

    @torch.no_grad()
    def _apply(self) -> None:
        for p in self.params:
            value = self.project(p.detach())
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                raise FixNormError(f"project returned {type(value).__name__} "
                                   f"{tuple(getattr(value, 'shape', ()))} for a parameter of shape {tuple(p.shape)}")
            p.copy_(value)

    def on_attach(self, optimizer: torch.optim.Optimizer) -> None:
        if self.at_attach:
            self._apply()

    def apply_(self, step: int, flags: DeviceFlags) -> None:
        self._apply()


class Attachment:
    """Rules attached to an optimizer by :func:`attach`: their step count, flags and state-dict entries."""

    def __init__(self, optimizer: torch.optim.Optimizer, rules: Sequence[Rule], *, name: str,
                 nonfinite: str = "raise", names: Mapping[torch.Tensor, str] | None = None,
                 allow_empty: bool = False) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise FixNormError(f"rules attach to a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if (not rules and not allow_empty) or not all(isinstance(r, Rule) for r in rules):
            raise FixNormError("attach needs a non-empty list of fixnorm.rules.Rule objects")
        if not name.isidentifier():
            raise FixNormError(f"the attachment's name {name!r} must be an identifier (it prefixes state keys)")
        for hook in getattr(optimizer, "_optimizer_step_post_hooks", {}).values():
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, Attachment) and owner.name == name:
                raise FixNormError(f"this optimizer already has rules attached under the name {name!r}; give the new "
                                   "attachment another name, or remove() the old one")
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for rule in rules:
            missing = [tuple(p.shape) for p in rule.params if id(p) not in owned]
            if missing:
                raise FixNormError(f"{type(rule).__name__}: {len(missing)} parameter(s) (shapes {missing[:3]}) are "
                                   "not trained by this optimizer; a rule acts only on parameters the optimizer steps")
        self.optimizer = optimizer
        self.rules: list[Rule] = []
        self.name = name
        self.steps = 0
        self.flags = DeviceFlags(nonfinite, names or {})
        for rule in rules:
            self.add_rule(rule)
        self._stashed: dict[int, dict[str, Any]] | None = None
        self._handles = [optimizer.register_step_pre_hook(self._refuse_sparse_gradients),
                         optimizer.register_step_post_hook(self._after_step)]
        if any(rule.stateful for rule in rules):  # stateless rules (centring) add nothing to checkpoints
            self._handles += [optimizer.register_state_dict_post_hook(self._pack),
                              optimizer.register_load_state_dict_pre_hook(self._unpack),
                              optimizer.register_load_state_dict_post_hook(self._restore)]
        if nonfinite == "skip":
            self._handles.append(optimizer.register_step_pre_hook(self._zero_bad_gradients))

    def add_rule(self, rule: Rule) -> None:
        """Attach one more rule (after the others); a parameter keeps each state field of one rule only."""
        taken = {(id(p), f) for r in self.rules for p in r.params for f in r.state_fields}
        clash = [f for p in rule.params for f in rule.state_fields if (id(p), f) in taken]
        if clash:
            raise FixNormError(f"two rules of the attachment {self.name!r} keep the state {clash[0]!r} of one "
                               "parameter; attach them under different names")
        rule.on_attach(self.optimizer)
        self.rules.append(rule)

    # -- the step -------------------------------------------------------------------------------
    def _refuse_sparse_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Before the step: the rules measure gradients and weights densely, which a sparse gradient refuses."""
        sparse = [p for rule in self.rules for p in rule.params if p.grad is not None and p.grad.is_sparse]
        if sparse:
            names = [self.flags.names.get(p, str(tuple(p.shape))) for p in sparse]
            raise FixNormError(f"parameter(s) {names[:6]} got a sparse gradient (nn.Embedding or EmbeddingBag with "
                               "sparse=True); the norm rules need dense ones. Build the layer with sparse=False, "
                               "or leave it to the base optimizer: FixNorm(..., roles=fixnorm.analyze(model, "
                               f"example, overrides={{{names[0]!r}: 'other'}}))")

    @torch.no_grad()
    def _zero_bad_gradients(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """"skip": a non-finite gradient of a ruled parameter is zeroed before the step, and counted."""
        params = [p for rule in self.rules for p in rule.params if p.grad is not None]  # sparse: refused already
        for bucket in _bucket_by_layout([p.grad for p in params]):
            grads = [params[i].grad for i in bucket]
            bad = ~torch.isfinite(tensor_norms_fp32(grads))
            for g, b in zip(grads, bad.unbind(0)):
                g.copy_(torch.where(b, torch.zeros_like(g), g))
            self.flags.flag(bad, [params[i] for i in bucket], "has a non-finite gradient")

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.flags.raise_ready()
        self.steps += 1
        for rule in self.rules:
            rule.apply_(self.steps, self.flags)
        self.flags.raise_ready()

    def check(self) -> None:
        """Wait for the outstanding device-side checks and raise if any failed (syncs)."""
        self.flags.check()

    @property
    def skipped_count(self) -> int:
        return self.flags.skipped_count

    def remove(self) -> None:
        """Detach: no more rule steps and no more state-dict entries."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- state: per-parameter entries of the optimizer's state dict -----------------------------
    def _keys(self) -> tuple[str, str]:
        return f"{self.name}_steps", f"{self.name}_"

    def _positions(self) -> dict[int, int]:
        order = [p for g in self.optimizer.param_groups for p in g["params"]]
        return {id(p): i for i, p in enumerate(order)}

    def _pack(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        self.flags.check()
        steps_key, prefix = self._keys()
        positions = self._positions()
        packed = dict(state_dict["state"])  # the entries are the live state dicts: copy before adding to them
        steps = torch.tensor(self.steps, dtype=torch.int64)
        for rule in self.rules:
            if not rule.stateful:
                continue
            saved = rule.param_state()
            for i, p in enumerate(rule.params):
                key = positions[id(p)]
                entry = dict(packed.get(key, {}))
                entry[steps_key] = steps.clone()
                for field, value in saved.get(i, {}).items():
                    entry[prefix + field] = value
                packed[key] = entry
        state_dict["state"] = packed
        return state_dict

    def _unpack(self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Take this attachment's entries out (the base optimizer sees only its own) and keep them for _restore."""
        steps_key, prefix = self._keys()
        order = [key for group in state_dict.get("param_groups", []) for key in group.get("params", [])]
        position = {key: i for i, key in enumerate(order)}
        mine: dict[int, dict[str, Any]] = {}
        packed = {}
        for key, entry in dict(state_dict.get("state", {})).items():
            if isinstance(entry, Mapping) and steps_key in entry:
                if key not in position:
                    raise FixNormError(f"state entry {key!r} belongs to no saved parameter group")
                entry = dict(entry)
                mine[position[key]] = {k: entry.pop(k) for k in list(entry) if k == steps_key or k.startswith(prefix)}
                if not entry:  # nothing of the base optimizer's: leave no empty entry (Adam inits on len == 0)
                    continue
            packed[key] = entry
        if not mine:
            raise FixNormError(f"this optimizer state has no {self.name!r} rule state (no {steps_key!r} entries, "
                               "so no norm targets or other rule state): it was saved without these rules attached "
                               "(or by an older fixnorm), so their state cannot be restored")
        state_dict = dict(state_dict)
        state_dict["state"] = packed
        self._stashed = mine
        return state_dict

    def _restore(self, optimizer: torch.optim.Optimizer) -> None:
        mine, self._stashed = self._stashed or {}, None
        steps_key, prefix = self._keys()
        positions = self._positions()
        expected = {positions[id(p)] for rule in self.rules if rule.stateful for p in rule.params}
        if set(mine) != expected:
            raise FixNormError(f"the saved {self.name!r} rule state covers other parameters than this attachment's; "
                               "was it saved with other rules or another model?")
        steps = {int(entry[steps_key]) for entry in mine.values()}
        if len(steps) != 1 or min(steps) < 0:
            raise FixNormError(f"the saved {self.name!r} step counts {sorted(steps)[:4]} are not one whole number")
        self.steps = steps.pop()
        # a saved field no rule reads is state that would be dropped silently (e.g. drifting norms' running means
        # loaded into fixed norms): the run would go on as another run
        wanted = {(positions[id(p)], prefix + f) for rule in self.rules for p in rule.params for f in rule.state_fields}
        extra = sorted({k[len(prefix):] for key, saved in mine.items() for k in saved
                        if k != steps_key and (key, k) not in wanted})
        if extra:
            raise FixNormError(f"the saved {self.name!r} rule state has {extra}, which these rules do not keep: it "
                               "was saved with other settings (drifting norms saved with norm_drift set, e.g. a "
                               "FixNorm-over-Adam run saved when norm_drift 'auto' still drifted there: resume it "
                               "with norm_drift=500); resume with the settings it was trained with")
        for rule in self.rules:
            if not rule.stateful:
                continue
            entries: dict[int, dict[str, torch.Tensor]] = {}
            for i, p in enumerate(rule.params):
                saved = mine[positions[id(p)]]
                fields = {f: saved[prefix + f] for f in rule.state_fields if prefix + f in saved}
                if fields:
                    entries[i] = fields
            rule.load_param_state(entries, self.steps)
        self.flags = DeviceFlags(self.flags.policy, self.flags.names)


def attach(optimizer: torch.optim.Optimizer, rules: Sequence[Rule], *, name: str = "rules",
           nonfinite: str = "raise", names: Mapping[torch.Tensor, str] | None = None) -> Attachment:
    """Run ``rules`` after every ``optimizer.step()``, their state inside ``optimizer.state_dict()``.

    ``name`` prefixes the state entries (two attachments on one optimizer need different names);
    ``names`` maps parameters to names for error messages. Returns the :class:`Attachment`
    (``.check()``, ``.remove()``, ``.steps``).
    """
    return Attachment(optimizer, rules, name=name, nonfinite=nonfinite, names=names)
