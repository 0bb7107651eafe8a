"""MimicNorm (Wen et al., AAAI 2021): a ResNet without BatchNorm, except one BN on the logits.

Two parts stand in for the removed BN layers:

* **weight mean** -- every conv filter is kept at zero mean over its fan-in (re-centred after each
  optimizer step). A zero-mean filter removes the mean of its input, the centring BN did implicitly;
* **last BN** -- ``BatchNorm1d(num_classes, affine=False)`` on the logits fixes their scale, the
  part of BN's dynamics the paper finds matters most for the gradients.

The transform follows the authors' code (github.com/Kid-key/MimicNorm, ``Cifar100/models/resnet_nobn.py``
and ``main.py``): He init with fan-in, zero-initialised conv biases (BN's shift is gone), a learnable
scalar ``1.2**L / i`` on the branch of the i-th residual block (L convs in the branch), a learnable
scalar 1.2 on projection shortcuts, and centring of conv filters whose fan-in exceeds 50.
See ``docs/mimicnorm.md`` for which parts are reconstructed.

Library use, without the engine::

    model = mimicnorm_model_(resnet20())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    attach_weight_centering(opt, centered_weights(model))   # centres now and after every step
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from ..errors import FixNormError
from ..models.cifar_resnet import BasicBlock
from ..models.preact_resnet import PreActBlock
from ..models.resnet import Bottleneck
from ..rules import Attachment, CentreFilters, attach, centre_filters_
from . import Method, method_settings, register_method
from .baselines import decayed_optimizer

if TYPE_CHECKING:
    from ..train.config import TrainConfig

#: the reference code's per-conv factor of the residual-branch scalar (``1.2**L / i``) and its shortcut scalar
REFERENCE_FACTOR = 1.2
#: the reference code centres conv filters with fan-in (in_channels / groups * kernel area) above this
REFERENCE_MIN_FAN_IN = 50


class Scale(nn.Module):
    """``x * gain`` with one learnable scalar: the gain a residual branch (or shortcut) keeps in place of BN."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain

    def extra_repr(self) -> str:
        return f"gain={float(self.gain.detach()):.4g}"


# -- the model transform ---------------------------------------------------------------------------
def _gain(branch_gain_init: float | str, index: int, convs: int) -> float:
    if branch_gain_init == "reference":
        return REFERENCE_FACTOR ** convs / index
    return float(branch_gain_init)


def _check_gain(name: str, value: Any, allow_reference: bool) -> None:
    if allow_reference and value == "reference":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        hint = "'reference' or a finite number" if allow_reference else "a finite number"
        raise FixNormError(f"{name} must be {hint}, got {value!r}")


def _projection_bn(block: nn.Module) -> bool:
    """Whether the block's shortcut is the (conv, BN) projection of cifar_resnet.shortcut."""
    sc = getattr(block, "shortcut", None)
    return isinstance(sc, nn.Sequential) and len(sc) == 2 and isinstance(sc[1], _BatchNorm)


def mimicnorm_model_(model: nn.Module, *, branch_gain_init: float | str = "reference",
                     shortcut_gain_init: float = REFERENCE_FACTOR, conv_bias: bool = True) -> nn.Module:
    """Turn a BN ResNet into its MimicNorm form, in place; returns the same module.

    Every BatchNorm goes: the one that ends a residual branch becomes a learnable scalar
    (``branch_gain_init``: ``"reference"`` = ``1.2**L / i`` for the i-th block with L convs in its
    branch, or one number for all blocks, 0 = SkipInit), the one after a 1x1 projection shortcut a
    learnable scalar ``shortcut_gain_init``, the others Identity. Convs are re-initialised (He normal,
    fan-in, ReLU gain) and get zero biases (``conv_bias``); the classifier ``model.fc`` is re-initialised
    the same way and followed by ``BatchNorm1d(num_classes, affine=False)``.

    Supported: CIFAR ResNets (``resnet20``...``resnet110``), ``resnet50``, ``preact_resnet18`` and the
    wide ResNets. Anything else raises FixNormError before the model is touched. The filters are not
    centred here: ``attach_weight_centering`` centres them when it is attached.
    """
    if getattr(model, "_mimicnorm", False):
        raise FixNormError("this model is already in MimicNorm form (mimicnorm_model_ was applied before)")
    _check_gain("branch_gain_init", branch_gain_init, allow_reference=True)
    _check_gain("shortcut_gain_init", shortcut_gain_init, allow_reference=False)
    if not isinstance(conv_bias, bool):
        raise FixNormError(f"conv_bias must be true or false, got {conv_bias!r}")
    name = type(model).__name__
    bns = {n for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
    if not bns:
        raise FixNormError(f"{name} has no BatchNorm layer: MimicNorm replaces the BN layers of a BN ResNet "
                           "(resnet20/32/56/110, resnet50, preact_resnet18, wrn16_4, wrn28_10)")
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck, PreActBlock))]
    if not blocks:
        raise FixNormError(f"{name} has no residual block MimicNorm knows (cifar_resnet.BasicBlock, "
                           "resnet.Bottleneck, preact_resnet.PreActBlock); use resnet20/32/56/110, resnet50, "
                           "preact_resnet18 or a wide ResNet")
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise FixNormError(f"{name} has no linear classifier `fc`; MimicNorm puts its one BN after it")

    # plan first, so that an unsupported model is left untouched
    handled: set[str] = set()
    for prefix, block in blocks:
        known = ["bn1", "bn2"] + (["bn3"] if isinstance(block, Bottleneck) else [])
        known += ["shortcut.1"] if _projection_bn(block) else []
        handled |= {f"{prefix}.{n}" for n in known if isinstance(block.get_submodule(n), _BatchNorm)}
    root_children = {n for n, m in model.named_children() if isinstance(m, nn.Sequential)}
    stray = sorted(n for n in bns - handled if n.count(".") != 1 or n.split(".")[0] not in root_children)
    if stray:
        raise FixNormError(f"{name} has BatchNorm layers MimicNorm does not know how to replace: {stray}; "
                           "only BNs in the supported residual blocks and in top-level Sequentials "
                           "(stem, final BN-ReLU) are handled")

    device = fc.weight.device

    def scale(init: float) -> Scale:
        return Scale(init).to(device)

    for n in sorted(bns - handled):
        parent, idx = n.split(".")
        setattr(getattr(model, parent), idx, nn.Identity())
    for index, (_, block) in enumerate(blocks, start=1):
        if isinstance(block, BasicBlock):
            block.bn1 = nn.Identity()
            block.bn2 = scale(_gain(branch_gain_init, index, 2))
        elif isinstance(block, Bottleneck):
            block.bn1, block.bn2 = nn.Identity(), nn.Identity()
            block.bn3 = scale(_gain(branch_gain_init, index, 3))
        else:  # PreActBlock: BN-ReLU-conv twice; the gain goes after conv2 (out + skip follows)
            block.bn1, block.bn2 = nn.Identity(), nn.Identity()
            block.conv2 = nn.Sequential(OrderedDict(conv=block.conv2,
                                                    gain=scale(_gain(branch_gain_init, index, 2))))
        if _projection_bn(block):
            block.shortcut[1] = scale(shortcut_gain_init)

    for m in model.modules():
        if isinstance(m, (_ConvNd, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            elif conv_bias and isinstance(m, _ConvNd):
                m.bias = nn.Parameter(torch.zeros(m.out_channels, device=m.weight.device, dtype=m.weight.dtype))
    logit_bn = nn.BatchNorm1d(fc.out_features, affine=False).to(device)
    model.fc = nn.Sequential(OrderedDict(linear=fc, logit_bn=logit_bn))
    model._mimicnorm = True
    return model


# -- weight centring ---------------------------------------------------------------------------------
def centered_weights(model: nn.Module, min_fan_in: int = REFERENCE_MIN_FAN_IN, *, include_grouped: bool = False,
                     include_linear: bool = False) -> list[nn.Parameter]:
    """The weights MimicNorm keeps at zero filter mean: conv weights with fan-in > ``min_fan_in``.

    Grouped and depthwise convs (groups > 1) are left out unless ``include_grouped`` (a depthwise
    filter's few taps carry its spatial pattern, not a mean to remove); linear layers unless
    ``include_linear`` (the reference code leaves them out too).
    """
    if isinstance(min_fan_in, bool) or not isinstance(min_fan_in, int) or min_fan_in < 1:
        raise FixNormError(f"min_fan_in must be an integer >= 1 (a filter of fan-in 1 would be centred to zero), "
                           f"got {min_fan_in!r}")
    chosen: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, _ConvNd):
            if m.groups > 1 and not include_grouped:
                continue
        elif not (include_linear and isinstance(m, nn.Linear)):
            continue
        w = m.weight
        if w.requires_grad and w[0].numel() > min_fan_in:
            chosen.append(w)
    return chosen


center_filters_ = centre_filters_  # the name this module's users know: fixnorm.rules.centre_filters_


def attach_weight_centering(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> Attachment:
    """Centre ``params`` now and after every ``optimizer.step()``; works with any torch optimizer.

    With SGD (momentum, Nesterov, weight decay) on zero-mean weights this is exactly training the
    reparametrisation ``W - mean(W)``: the update is linear in the gradient, so centring after the
    step equals centring the gradient. With adaptive optimizers it is a projection after the step.
    It is the rule :class:`fixnorm.rules.CentreFilters` attached with :func:`fixnorm.rules.attach`;
    returns the attachment (``.remove()`` detaches it).
    """
    params = list(params)
    if not params:
        raise FixNormError("no weights to centre: centered_weights found no conv with fan-in above min_fan_in "
                           "(lower min_fan_in, or check that the model has convs)")
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [tuple(p.shape) for p in params if id(p) not in in_optimizer]
    if missing:
        raise FixNormError(f"{len(missing)} weight(s) to centre are not in the optimizer (shapes {missing[:3]}...); "
                           "build the optimizer on the same model the weights come from")
    for p in params:
        if p.ndim < 2:
            raise FixNormError(f"weight centring needs filters (ndim >= 2), got shape {tuple(p.shape)}")
    return attach(optimizer, [CentreFilters(params)], name="centring")


# -- the engine method ------------------------------------------------------------------------------
@dataclass(frozen=True)
class MimicNormSettings:
    """``method_kwargs.mimicnorm``."""

    min_fan_in: int = REFERENCE_MIN_FAN_IN          # centre conv filters with fan-in above this
    branch_gain_init: str | float = "reference"     # "reference" (1.2**L / i) or a number for every residual branch
    shortcut_gain_init: float = REFERENCE_FACTOR
    conv_bias: bool = True                          # zero-initialised conv biases in place of BN's shift
    center_grouped: bool = False                    # also centre grouped / depthwise convs
    center_linear: bool = False                     # also centre the classifier's rows

    def __post_init__(self) -> None:
        if isinstance(self.branch_gain_init, str) and self.branch_gain_init != "reference":
            raise FixNormError(f"method_kwargs.mimicnorm.branch_gain_init must be 'reference' or a number, "
                               f"got {self.branch_gain_init!r}")


def _settings(cfg: TrainConfig) -> MimicNormSettings:
    return method_settings(cfg, "mimicnorm", MimicNormSettings)


def prepare_mimicnorm(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    s = _settings(cfg)
    return mimicnorm_model_(model, branch_gain_init=s.branch_gain_init, shortcut_gain_init=s.shortcut_gain_init,
                            conv_bias=s.conv_bias)


def build_mimicnorm(model: nn.Module, cfg: TrainConfig, example: torch.Tensor) -> torch.optim.Optimizer:
    """``cfg.base`` with ``cfg.weight_decay`` on weights (ndim >= 2), filters centred after every step."""
    s = _settings(cfg)
    optimizer = decayed_optimizer(model, cfg)
    attach_weight_centering(optimizer, centered_weights(model, s.min_fan_in, include_grouped=s.center_grouped,
                                                        include_linear=s.center_linear))
    return optimizer


register_method(Method("mimicnorm", "MimicNorm: no BN but one on the logits, zero-mean conv filters, learnable "
                       "residual scalars (base optimizer from `base`, `weight_decay` on weights)",
                       build_mimicnorm, prepare_model=prepare_mimicnorm, settings=MimicNormSettings))
