"""PathProx (Yang et al. 2022, arXiv 2210.03069): weight decay's objective, solved with proximal steps per neuron.

For a homogeneous unit j with incoming weights w_j and outgoing weights v_j, ``min_a (lam/2)(a^2 |w|^2 + |v|^2/a^2)
= lam |w| |v|``: the weight-decay objective and ``L + lam * sum_j |w_j| |v_j|`` have the same minimisers. The
product is invariant to rescaling a neuron, so one may hold ``|w_j| = 1``, and the penalty becomes a group lasso
``lam * sum_j |v_j|`` on the outgoing columns, whose proximal operator is a group soft-threshold. After every base
step, per pair of layers (W, V):

- ``w_j <- w_j / max(|w_j|, 1e-6)`` (W's bias with it): the projection onto the unit sphere;
- ``v_j <- v_j * max(0, 1 - lr * lam / |v_j|)``: the proximal step of ``lr * lam * |v_j|`` (zero when
  ``|v_j| <= lr * lam``), with ``lr`` the current learning rate of V's group.

Layers in no pair keep ordinary weight decay ``lam``; biases and norm parameters none. From the authors' code
(Leiay/PathProx): the order of the two steps, the threshold ``lam * lr``, the same ``lam`` as weight decay,
pairs of consecutive layers inside a block, the eps. Ours: the pairs for our models (the two convs of each residual
block; the two convs of each small-CNN stage), the base optimizer's momentum (the authors' configs use none; the
prox acts after the momentum step and leaves the buffers alone), and no layer-wise path-norm balancing (between our
pairs sit BatchNorm layers and residual sums, where that rescaling is not function-preserving). With BatchNorm
after W (all our models), the projection of W changes nothing the network computes, and the prox on V prunes
whole input channels of V: PathProx becomes channel-group sparsity. See docs/related-methods.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..constraints import filter_norms
from ..errors import FixNormError
from ..models.cifar_resnet import CifarResNet
from ..models.preact_resnet import PreActResNet
from ..models.small_cnn import SmallCNN
from ..rules import DeviceFlags, Rule, attach
from . import Method, method_settings, register_method
from .baselines import base_optimizer

if TYPE_CHECKING:
    from ..train.config import TrainConfig

NORM_EPS = 1e-6  # the reference's floor on |w_j|


@dataclass(frozen=True)
class NeuronPair:
    """Layer W produces the units (its rows, dim 0) that layer V consumes (its columns, dim 1)."""

    w: nn.Parameter
    v: nn.Parameter
    w_bias: nn.Parameter | None = None


def neuron_pairs(model: nn.Module) -> list[NeuronPair]:
    """The (W, V) pairs of a supported model: the two convs of every residual block, of every small-CNN stage."""
    pairs: list[NeuronPair] = []
    if isinstance(model, (CifarResNet, PreActResNet)):
        for block in model.layers:
            pairs.append(NeuronPair(block.conv1.weight, block.conv2.weight, block.conv1.bias))
    elif isinstance(model, SmallCNN):
        convs = [m[0] for m in model.features if isinstance(m, nn.Sequential)]
        for first, second in zip(convs[0::2], convs[1::2]):
            pairs.append(NeuronPair(first.weight, second.weight, first.bias))
    else:
        raise FixNormError(f"PathProx has no neuron pairs for {type(model).__name__}; supported: CifarResNet "
                           "(resnet20/32/56/110), PreActResNet (preact_resnet18, wrn16_4, wrn28_10), SmallCNN")
    for pair in pairs:
        if pair.w.shape[0] != pair.v.shape[1]:
            raise FixNormError(f"PathProx pair with {pair.w.shape[0]} units out of W but {pair.v.shape[1]} into V")
    return pairs


def path_penalty(pairs: list[NeuronPair]) -> torch.Tensor:
    """``sum_j |w_j| |v_j|`` over every pair: the neuron-wise objective's penalty (times lam)."""
    total = torch.zeros((), dtype=torch.float64)
    for pair in pairs:
        total = total + (unit_norms_out(pair.w).double() * unit_norms_in(pair.v).double()).sum().cpu()
    return total


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


def unit_norms_out(w: torch.Tensor) -> torch.Tensor:
    """|w_j| per unit j (row of W: dim 0, over all other dims), in fp32 or wider: the filter norms."""
    return filter_norms(w)


def unit_norms_in(v: torch.Tensor) -> torch.Tensor:
    """|v_j| per unit j (column of V: dim 1, over all other dims), in fp32 or wider."""
    return _at_least_fp32(v).transpose(0, 1).flatten(1).norm(dim=1)


def group_soft_threshold_(v: torch.Tensor, threshold: float) -> torch.Tensor:
    """``v_j <- v_j * max(0, 1 - threshold / |v_j|)`` per column j in place: the prox of ``threshold * |v_j|``.
    Returns the per-column norms before."""
    norms = unit_norms_in(v)
    factor = (1 - threshold / norms.clamp_min(1e-30)).clamp_min(0)
    shape = [1, -1] + [1] * (v.ndim - 2)
    v.mul_(factor.to(v.dtype).reshape(shape))
    return norms


class PathProxRule(Rule):
    """After every step: W's units onto the unit sphere, V's columns through the group soft-threshold."""

    def __init__(self, pairs: list[NeuronPair], strength: float) -> None:
        if not pairs:
            raise FixNormError("PathProx needs at least one (W, V) pair")
        if not (math.isfinite(strength) and strength >= 0):
            raise FixNormError(f"PathProx strength (lambda) must be >= 0, got {strength!r}")
        self.pairs, self.strength = pairs, strength
        self.params = [p for pair in pairs for p in (pair.w, pair.v)]

    def on_attach(self, optimizer: torch.optim.Optimizer) -> None:
        index_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        missing = [p for p in self.params if id(p) not in index_of]
        if missing:
            raise FixNormError("PathProx's weights are not all in the optimizer")
        # group indices, not the group dicts: load_state_dict replaces the dicts (a resumed run reads the new lr)
        self.optimizer, self.group_index = optimizer, [index_of[id(pair.v)] for pair in self.pairs]
        if any(optimizer.param_groups[index_of[id(p)]].get("weight_decay") for p in self.params):
            raise FixNormError("PathProx's pairs must not also have weight decay: the prox is their regulariser")

    @torch.no_grad()
    def apply_(self, step: int, flags: DeviceFlags) -> None:
        for pair, index in zip(self.pairs, self.group_index):
            group = self.optimizer.param_groups[index]
            norms = unit_norms_out(pair.w).clamp_min(NORM_EPS)
            shape = [-1] + [1] * (pair.w.ndim - 1)
            pair.w.div_(norms.to(pair.w.dtype).reshape(shape))
            if pair.w_bias is not None:
                pair.w_bias.div_(norms.to(pair.w_bias.dtype))
            before = group_soft_threshold_(pair.v, float(group["lr"]) * self.strength)
            bad = torch.stack([~torch.isfinite(norms).all(), ~torch.isfinite(before).all()])
            flags.flag(bad, [pair.w, pair.v], "had a non-finite norm in PathProx")


# -- the engine method ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathProxSettings:
    """``method_kwargs.pathprox``."""

    strength: float | None = None  # lambda; None: the recipe's weight_decay (the same lambda, as the authors)

    def __post_init__(self) -> None:
        if self.strength is not None and not self.strength >= 0:
            raise FixNormError(f"method_kwargs.pathprox.strength must be >= 0, got {self.strength!r}")


def build_pathprox(model: nn.Module, cfg: TrainConfig, example: torch.Tensor) -> torch.optim.Optimizer:
    """``cfg.base`` without decay on the pairs (their prox regularises them), ``lam`` as weight decay on the other
    weights (ndim >= 2), none on biases and norm parameters; the prox rule attached."""
    settings = method_settings(cfg, "pathprox", PathProxSettings)
    strength = cfg.weight_decay if settings.strength is None else settings.strength
    pairs = neuron_pairs(model)
    paired = {id(p) for pair in pairs for p in (pair.w, pair.v)}
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {"params": [p for p in params if id(p) in paired], "weight_decay": 0.0},
        {"params": [p for p in params if id(p) not in paired and p.ndim >= 2], "weight_decay": strength},
        {"params": [p for p in params if id(p) not in paired and p.ndim < 2], "weight_decay": 0.0},
    ]
    cls, kwargs = base_optimizer(cfg)
    optimizer = cls([g for g in groups if g["params"]], **kwargs)
    attach(optimizer, [PathProxRule(pairs, strength)], name="pathprox")
    return optimizer


register_method(Method("pathprox", "PathProx: weight decay's objective as unit-norm incoming weights and a group "
                       "soft-threshold on outgoing ones, per neuron pair (base optimizer from `base`, lambda = "
                       "`weight_decay` or method_kwargs.pathprox.strength)", build_pathprox,
                       settings=PathProxSettings))
