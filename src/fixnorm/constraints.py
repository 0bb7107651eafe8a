"""Norm rules, their multi-tensor kernels, and the plan that assigns a rule to each parameter.

A rule acts in place after the base optimizer's step. Kernels never synchronise with
the host: norms are accumulated in fp32 on the device, a zero or non-finite norm
leaves its tensor (or filter) untouched, and each kernel returns per-parameter
"bad" flags as a device tensor for the caller to check when it is cheap to do so.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import FixNormError
from .roles import ROLE_CLASSIFIER, ROLE_OTHER, Roles

GRANULARITIES = ("tensor", "filter")
OTHERS_POLICIES = ("free", "fixed", "decay")
JOINT_POLICIES = ("free", "hold")  # the jointly scale-invariant groups (Roles.joint): left free, or joint norms held
ROLE_JOINT = "joint-invariant"


def _accumulation_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    """fp32 for fp32 and narrower weights, fp64 for fp64 ones (a norm is never accumulated narrower)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def tensor_norms_fp32(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whole-tensor L2 norms, accumulated in fp32 (fp64 for fp64 weights), stacked into one device vector."""
    dtype = _accumulation_dtype(params)
    try:
        norms = torch._foreach_norm(list(params), 2, dtype=dtype)
    except (TypeError, RuntimeError):  # older torch without the dtype argument
        norms = [torch.linalg.vector_norm(p, dtype=dtype) for p in params]
    return torch.stack(norms)


def filter_norms(p: torch.Tensor) -> torch.Tensor:
    """L2 norm of every slice along dim 0, in fp32 (fp64 for fp64 weights)."""
    return torch.linalg.vector_norm(p.detach().reshape(p.shape[0], -1), dim=1, dtype=_accumulation_dtype([p]))


def fix_tensor_norms_(params: Sequence[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Rescale each tensor to its target norm in place; returns a bool vector of skipped tensors.

    All tensors share one device; ``targets`` is an fp32 vector on it.
    """
    norms = tensor_norms_fp32(params)
    ok = torch.isfinite(norms) & (norms > 0)
    factors = torch.where(ok, targets.to(norms.dtype) / norms, torch.ones_like(norms))
    torch._foreach_mul_(list(params), list(factors.unbind(0)))
    return ~ok


def fix_filter_norms_(params: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Rescale every slice along dim 0 to its target norm; returns per-tensor skipped flags."""
    bad = []
    for p, target in zip(params, targets):
        norms = filter_norms(p)
        ok = torch.isfinite(norms) & (norms > 0)
        factors = torch.where(ok, target.to(norms.dtype) / norms, torch.ones_like(norms))
        p.mul_(factors.view((-1,) + (1,) * (p.ndim - 1)))
        bad.append(~ok.all())
    return torch.stack(bad)


def shorten_step_(p: torch.Tensor, before: torch.Tensor, max_step: float) -> torch.Tensor:
    """Shorten the step ``p - before`` to at most ``max_step`` times ``|before|``, along its own direction.

    The classifier's step cap (FixNorm's ``fc_max_step``). No host sync; a step it does not shorten is left bit for
    bit (``before + (p - before)`` need not round to ``p``), and so is a NaN step, for the non-finite check to name.
    Returns whether it shortened the step, as a 0-dim bool device tensor.
    """
    change = p.detach() - before
    dtype = _accumulation_dtype([p])
    change_norm = torch.linalg.vector_norm(change, dtype=dtype)
    limit = max_step * torch.linalg.vector_norm(before, dtype=dtype)
    factor = torch.clamp(limit / change_norm.clamp_min(torch.finfo(dtype).tiny), max=1.0)
    capped = factor < 1  # False for a NaN change
    p.copy_(torch.where(capped, before + change * factor.to(change.dtype), p))
    return capped


def rotate_by_angle_(p: torch.Tensor, before: torch.Tensor, angle: torch.Tensor | float, per_filter: bool) -> None:
    """Replace the step ``p - before`` by its tangential part, rescaled so it turns ``before`` by ``angle``.

    Used by the angular-update mode: after the projection that follows, the weight
    has turned by exactly ``angle`` radians (per tensor or per filter).
    """
    rows = p.shape[0] if per_filter else 1
    w0 = before.reshape(rows, -1).float()
    u = p.detach().reshape(rows, -1).float() - w0
    r2 = (w0 * w0).sum(1, keepdim=True)
    tangential = u - (u * w0).sum(1, keepdim=True) / r2.clamp_min(1e-30) * w0
    t_norm = tangential.norm(dim=1, keepdim=True)
    scale = torch.where(t_norm > 0, r2.sqrt() * math.tan(float(angle)) / t_norm.clamp_min(1e-30),
                        torch.zeros_like(t_norm))
    p.copy_((w0 + tangential * scale).reshape(p.shape))


@dataclass
class PlanEntry:
    """The rule for one parameter: ``constraint`` is "tensor", "filter" or None (free)."""

    name: str
    shape: tuple[int, ...]
    role: str
    constraint: str | None
    target: str  # human-readable: "initial", "fc_norm=10", "constant 1.0", "-"
    note: str = ""


@dataclass
class Plan:
    """Which norm rule each parameter gets; printable as a table, built from Roles."""

    entries: list[PlanEntry]

    def table(self) -> str:
        rows = [("parameter", "shape", "role", "rule", "target")]
        for e in self.entries:
            rule = f"fix norm per {e.constraint}" if e.constraint else (e.note or "free")
            rows.append((e.name, "x".join(map(str, e.shape)) or "scalar", e.role, rule, e.target))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def build_plan(
    roles: Roles,
    *,
    granularity: str = "tensor",
    target: str | float = "initial",
    fc_norm: float | None = None,
    fc_granularity: str = "tensor",
    others: str = "free",
    others_weight_decay: float = 0.0,
    fc_free: bool = False,
    joint: str = "free",
) -> Plan:
    """Turn measured roles and FixNorm's options into one rule per parameter (``fc_free``: the classifier is not
    held, the base optimizer moves it as it moves the free parameters)."""
    if granularity not in GRANULARITIES:
        raise FixNormError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    if fc_granularity not in ("tensor", "class"):
        raise FixNormError(f"unknown fc_granularity {fc_granularity!r}; choose 'tensor' or 'class'")
    if others not in OTHERS_POLICIES:
        raise FixNormError(f"unknown others policy {others!r}; choose one of {OTHERS_POLICIES}")
    if not (target == "initial" or (isinstance(target, (int, float)) and not isinstance(target, bool)
                                    and math.isfinite(target) and target > 0)):
        raise FixNormError(f"target must be 'initial' or a positive number, got {target!r}")
    if fc_norm is not None and not (isinstance(fc_norm, (int, float)) and math.isfinite(fc_norm) and fc_norm > 0):
        raise FixNormError(f"fc_norm must be a positive number or None, got {fc_norm!r}")
    if fc_norm is not None and not roles.classifier:
        raise FixNormError("fc_norm was given but the analysis found no classifier weight (a final layer that "
                           "is not scale-invariant); name it with overrides={'<pattern>': 'classifier'}")
    if joint not in JOINT_POLICIES:
        raise FixNormError(f"unknown joint policy {joint!r}; choose one of {JOINT_POLICIES}")
    group_of = {name: k for k, group in enumerate(roles.joint) for name in group} if joint == "hold" else {}
    if others_weight_decay and others != "decay":
        raise FixNormError("others_weight_decay is only used with others='decay'")

    entries = []
    for name, shape in roles.shapes.items():
        role = roles.role(name)
        if role in ("filter", "tensor"):
            constraint = "filter" if (granularity == "filter" and role == "filter") else "tensor"
            entries.append(PlanEntry(name, shape, "scale-invariant", constraint,
                                     "initial" if target == "initial" else f"constant {target:g}"))
        elif role == ROLE_CLASSIFIER and fc_free:
            if fc_norm is not None:
                raise FixNormError("fc_norm holds the classifier; with the classifier left free there is nothing to "
                                   "hold: give one of them")
            entries.append(PlanEntry(name, shape, "classifier", None, "-", note="free: trained by the base optimizer"))
        elif role == ROLE_CLASSIFIER:
            constraint = "filter" if fc_granularity == "class" else "tensor"
            entries.append(PlanEntry(name, shape, "classifier", constraint,
                                     "initial" if fc_norm is None else f"fc_norm={fc_norm:g}"))
        elif name in group_of:
            entries.append(PlanEntry(name, shape, ROLE_JOINT, "joint", f"initial (joint, group {group_of[name] + 1})"))
        elif others == "fixed" and len(shape) >= 2:
            entries.append(PlanEntry(name, shape, ROLE_OTHER, "tensor", "initial"))
        elif others == "decay":
            entries.append(PlanEntry(name, shape, ROLE_OTHER, None, "-",
                                     note=f"weight decay {others_weight_decay:g}"))
        else:
            entries.append(PlanEntry(name, shape, ROLE_OTHER, None, "-"))
    return Plan(entries)


def initial_targets(p: torch.Tensor, name: str, constraint: str, value: float | None) -> torch.Tensor:
    """The fp32 target for one parameter: a scalar for "tensor", one per filter for "filter".

    ``value`` is a whole-tensor norm (a per-filter target splits it equally across
    filters); None keeps the current norm(s). A zero or non-finite current norm is an
    error: a zero weight has no direction to hold.
    """
    if constraint == "filter":
        current = filter_norms(p).float()
    else:
        current = torch.linalg.vector_norm(p.detach(), dtype=_accumulation_dtype([p])).float()
    bad = ~(torch.isfinite(current) & (current > 0))
    if bool(bad.any()):
        where = f" (filters {bad.nonzero().flatten().tolist()[:8]})" if constraint == "filter" else ""
        raise FixNormError(f"parameter {name!r} has a zero or non-finite norm{where} when FixNorm is built: a "
                           "zero weight has no direction to hold. Initialise it (e.g. nn.init.kaiming_normal_) "
                           "or give it the role 'other' with overrides=")
    if value is None:
        return current.clone()
    if constraint == "filter":
        return torch.full_like(current, value / math.sqrt(current.numel()))
    return torch.full_like(current, float(value))
