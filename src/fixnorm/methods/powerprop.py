"""Powerpropagation (Schwarz et al., NeurIPS 2021): weights reparametrised as ``w = v * |v|^(alpha - 1)``.

The gradient with respect to ``v`` is ``alpha * |v|^(alpha - 1) * dL/dw``: small weights learn slowly
("rich get richer"), so training leaves many weights near zero and magnitude pruning afterwards
costs less accuracy. ``alpha = 1`` is the plain network.

The reparametrisation is a ``torch.nn.utils.parametrize`` parametrization, so every tool that
reads ``module.weight`` sees ``w`` while the optimizer trains ``v`` (the state dict holds it as
``<module>.parametrizations.weight.original``). Pruning is a second parametrization, a fixed
0/1 mask applied to ``w``: pruned weights stay exactly zero under any optimizer (momentum,
Adam, weight decay), whatever ``alpha`` is.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..compress import keep_smallest_pruned
from ..errors import FixNormError
from . import Method, method_settings, register_method
from .baselines import decayed_optimizer

if TYPE_CHECKING:
    from ..train.config import TrainConfig

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class _Power(torch.autograd.Function):
    """``w = v |v|^(alpha-1)`` with the exact derivative ``alpha |v|^(alpha-1)``.

    Autograd through ``v * v.abs().pow(alpha - 1)`` gives NaN at ``v = 0`` for 1 < alpha < 2
    (``0 * inf`` from the power's derivative); the closed form is 0 there, which also makes
    ``v = 0`` a fixed point of plain gradient descent for every alpha > 1.
    """

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, alpha: float) -> torch.Tensor:
        ctx.save_for_backward(v)
        ctx.alpha = alpha
        return v * v.abs().pow(alpha - 1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (v,) = ctx.saved_tensors
        return grad * (ctx.alpha * v.abs().pow(ctx.alpha - 1)), None


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 1:
        raise FixNormError(f"powerprop alpha must be a finite number >= 1 (1 is the plain network, the paper "
                           f"uses 2 to 5), got {alpha!r}")
    return float(alpha)


class PowerPropagation(nn.Module):
    """Parametrization ``forward(v) = v |v|^(alpha-1)``; ``right_inverse(w) = sign(w) |w|^(1/alpha)``.

    ``right_inverse`` is what ``register_parametrization`` stores as ``original``, so the forward
    weight right after registration is the module's initial weight (to float rounding; exactly
    for alpha = 1).
    """

    def __init__(self, alpha: float = 2.0) -> None:
        super().__init__()
        self.alpha = _check_alpha(alpha)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0:
            return v
        return _Power.apply(v, self.alpha)

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        if self.alpha == 1.0:
            return w
        # the root in float64, then one rounding: the nearest representable v to the exact root
        w64 = w.double()
        return (w64.sign() * w64.abs().pow(1.0 / self.alpha)).to(w.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


class PruneMask(nn.Module):
    """Parametrization ``forward(w) = where(mask, w, 0)``: pruned weights stay zero whatever the optimizer does.

    The mask is a boolean buffer, saved in the state dict (``...parametrizations.weight.<i>.mask``).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def _parametrizations(module: nn.Module) -> list[nn.Module]:
    if not parametrize.is_parametrized(module, "weight"):
        return []
    return list(module.parametrizations["weight"])


def _has_powerprop(module: nn.Module) -> bool:
    return any(isinstance(p, PowerPropagation) for p in _parametrizations(module))


def _check_include(include: str | Sequence[str] | None) -> list[str] | None:
    if include is None:
        return None
    if isinstance(include, str):
        include = [include]
    if not isinstance(include, (list, tuple)) or not all(isinstance(g, str) for g in include) or not include:
        raise FixNormError(f"include must be a non-empty list of glob patterns over module names "
                           f"(e.g. ['features.*', 'classifier']), got {include!r}")
    return list(include)


def powerprop_(model: nn.Module, alpha: float = 2.0, *, include: str | Sequence[str] | None = None) -> list[str]:
    """Reparametrise conv and linear weights in place as ``w = v |v|^(alpha-1)``; returns their names.

    ``include``: fnmatch globs over module names (``model.named_modules()``), default every
    ``Conv1d/2d/3d`` and ``Linear``. Biases and norm parameters are untouched. Call it before
    the optimizer is built: the optimizer must see (and keep state for) ``v``, not ``w``.
    """
    alpha = _check_alpha(alpha)
    globs = _check_include(include)
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, _LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if globs is not None:
        for glob in globs:
            if not any(fnmatch.fnmatchcase(name, glob) for name, _ in layers):
                raise FixNormError(f"powerprop include pattern {glob!r} matches no conv or linear module; "
                                   f"conv/linear modules: {[name for name, _ in layers][:20]}")
        layers = [(name, m) for name, m in layers if any(fnmatch.fnmatchcase(name, g) for g in globs)]
    if not layers:
        raise FixNormError(f"powerprop found no conv (nn.Conv1d/2d/3d) or nn.Linear weights in "
                           f"{type(model).__name__} to reparametrise")
    for name, module in layers:
        if parametrize.is_parametrized(module, "weight"):
            raise FixNormError(f"{name}.weight is already parametrized ({_parametrizations(module)}); "
                               "apply powerprop once, to a plain model (remove_powerprop_ undoes it)")
    names = []
    for name, module in layers:
        parametrize.register_parametrization(module, "weight", PowerPropagation(alpha))
        names.append(f"{name}.weight" if name else "weight")
    return names


def remove_powerprop_(model: nn.Module) -> list[str]:
    """Bake ``w`` (with any pruning mask) back into plain ``weight`` parameters; returns their names."""
    names = []
    for name, module in model.named_modules():
        if _has_powerprop(module):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            names.append(f"{name}.weight" if name else "weight")
    if not names:
        raise FixNormError(f"{type(model).__name__} has no powerprop weights to remove")
    return names


def _prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, _LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    powered = [(name, m) for name, m in layers if _has_powerprop(m)]
    return powered or layers


@torch.no_grad()
def magnitude_prune_(model: nn.Module, sparsity: float, *, scope: str = "global") -> dict[str, Any]:
    """Zero the ``sparsity`` fraction of smallest-|w| effective weights, for good; returns the sparsity reached.

    Prunes the powerprop weights, or every conv/linear weight of a plain model, ranked by the
    effective weight ``w`` (not ``v``): over all of them together (``scope="global"``) or per layer
    (``"layer"``). Pruning is a ``PruneMask`` parametrization on ``w`` (so it sticks when training
    goes on, under momentum, Adam or weight decay), and the pruned entries of the stored tensor
    (``v``, or the plain weight) are zeroed too. Pruning again tightens the existing mask.
    Returns ``{"target", "scope", "overall", "layers": {name: sparsity}, "zeros", "total"}``,
    counted from the weights after pruning.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise FixNormError(f"sparsity must be a number in [0, 1) (the fraction of weights to zero), got {sparsity!r}")
    if scope not in ("global", "layer"):
        raise FixNormError(f"scope must be 'global' or 'layer', got {scope!r}")
    layers = _prunable(model)
    if not layers:
        raise FixNormError(f"{type(model).__name__} has no conv or linear weights to prune")
    scores = [m.weight.detach().abs().reshape(-1) for _, m in layers]
    if scope == "global":
        flat = torch.cat([s.float().to(scores[0].device) for s in scores])
        keep = _keep_mask(flat, sparsity)
        keeps = list(torch.split(keep, [s.numel() for s in scores]))
    else:
        keeps = [_keep_mask(s, sparsity) for s in scores]
    for (_, module), keep in zip(layers, keeps):
        keep = keep.to(module.weight.device).reshape(module.weight.shape)
        chain = _parametrizations(module)
        if chain and isinstance(chain[-1], PruneMask):
            chain[-1].mask &= keep
        else:
            parametrize.register_parametrization(module, "weight", PruneMask(keep))
        stored = module.parametrizations["weight"].original
        stored.masked_fill_(~module.parametrizations["weight"][-1].mask, 0)
    return weight_sparsity(model, layers=layers) | {"target": float(sparsity), "scope": scope}


def _keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True for all but the ``round(sparsity * n)`` smallest scores (ties broken by position): the shared rule of
    :mod:`fixnorm.compress`."""
    return keep_smallest_pruned(scores, int(round(sparsity * scores.numel())))


@torch.no_grad()
def weight_sparsity(model: nn.Module, *, layers: list[tuple[str, nn.Module]] | None = None) -> dict[str, Any]:
    """The fraction of exactly-zero effective weights: overall and per layer (powerprop or conv/linear weights)."""
    layers = _prunable(model) if layers is None else layers
    per_layer, zeros, total = {}, 0, 0
    for name, module in layers:
        w = module.weight
        z = int((w == 0).sum())
        per_layer[f"{name}.weight" if name else "weight"] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return {"overall": zeros / max(total, 1), "layers": per_layer, "zeros": zeros, "total": total}


# -- the engine method ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerpropSettings:
    """``method_kwargs.powerprop``."""

    alpha: float = 2.0                      # w = v |v|^(alpha - 1); 1 is plain training
    include: str | list[str] | None = None  # module-name globs to reparametrise; None: every conv and linear


def _settings(cfg: TrainConfig) -> PowerpropSettings:
    return method_settings(cfg, "powerprop", PowerpropSettings)


def prepare_powerprop(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    settings = _settings(cfg)
    powerprop_(model, settings.alpha, include=settings.include)
    return model


def build_powerprop_optimizer(model: nn.Module, cfg: TrainConfig, example: torch.Tensor) -> torch.optim.Optimizer:
    """The base optimizer (``cfg.base``) on ``v``, with ``cfg.weight_decay`` on every ndim >= 2 tensor.

    Decay on ``v`` is an L2 penalty on ``v``, i.e. ``sum |w|^(2/alpha)`` on the weights (L1 at
    alpha = 2): it keeps ``alpha = 1`` identical to the ``sgd`` baseline and pushes small weights
    further toward zero. Set ``weight_decay=0`` for plain, unregularised training.
    """
    _settings(cfg)  # unknown keys fail here too, also when prepare_model was bypassed
    return decayed_optimizer(model, cfg)


register_method(Method("powerprop", "Powerpropagation: conv/linear weights trained as w = v|v|^(alpha-1) "
                       "(settings alpha=2, include=None); base optimizer from `base`, weight decay on v",
                       build_powerprop_optimizer, prepare_model=prepare_powerprop,
                       settings=PowerpropSettings))
