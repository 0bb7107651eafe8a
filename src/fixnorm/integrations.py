"""FixNorm in other libraries' factories: timm's optimizer registry.

timm's ``create_optimizer_v2(model, "fixnorm", ...)`` builds parameter groups from the model and calls the
registered class with those groups only; FixNorm needs the model itself (it measures each parameter's
role). timm passes every keyword it does not know on to the class, so the model travels as one:

    fixnorm.integrations.register_timm()
    opt = timm.optim.create_optimizer_v2(model, "fixnorm", lr=0.1, model=model, example_inputs=batch)

Lightning and the Hugging Face Trainer need no helper: see docs/integrations.md.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import FixNormError
from .optim import FixNorm

# keywords timm adds on its own (momentum=0.9 for optimizers with momentum) and FixNorm's timm defaults;
# dropped when the base optimizer does not take them, so base=torch.optim.AdamW works unchanged
_FACTORY_DEFAULTS = ("momentum", "nesterov")


def timm_optimizer(params: Iterable[Any], *, model: nn.Module | None = None,
                   example_inputs: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, Any] | None = None,
                   base: type[torch.optim.Optimizer] = torch.optim.SGD, weight_decay: float = 0.0,
                   **kwargs: Any) -> FixNorm:
    """FixNorm from the call timm's factory makes: ``opt_class(param_groups, **opt_args)``.

    ``model`` (and ``example_inputs``, or ``roles=``) come through timm's extra keywords. The groups timm
    made must hold exactly the model's trainable parameters: FixNorm groups them by role itself, so
    timm's layer decay or custom groups cannot be honoured and are refused rather than dropped.
    """
    if model is None:
        raise FixNormError("FixNorm needs the model, which timm's factory does not pass: call "
                           "create_optimizer_v2(model, 'fixnorm', lr=..., model=model, example_inputs=batch)")
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    given = [p for g in groups for p in (g["params"] if isinstance(g["params"], (list, tuple)) else list(g["params"]))]
    trainable = [p for p in model.parameters() if p.requires_grad]
    if {id(p) for p in given} != {id(p) for p in trainable}:
        raise FixNormError("timm passed parameter groups that are not exactly the model's trainable parameters "
                           "(param_group_fn or a frozen part?); FixNorm optimises the whole model it is given")
    scaled = [g for g in groups if g.get("lr_scale", 1.0) != 1.0]
    if scaled:
        raise FixNormError("timm's layer_decay gives groups their own lr_scale, which FixNorm's role groups "
                           "cannot keep; create the optimizer without layer_decay")
    if weight_decay or any(g.get("weight_decay", 0.0) for g in groups):
        raise FixNormError(f"weight_decay={weight_decay or 'per group'}: FixNorm replaces weight decay by fixed norms; "
                           "pass weight_decay=0 (the norms are held by FixNorm; others_weight_decay= decays the rest)")
    accepted = inspect.signature(base.__init__).parameters
    for key in _FACTORY_DEFAULTS:
        if key in kwargs and key not in accepted:
            kwargs.pop(key)
    return FixNorm(model, example_inputs, base=base, **kwargs)


def register_timm(name: str = "fixnorm", registry: Any = None) -> None:
    """Register FixNorm in timm's optimizer registry, so ``create_optimizer_v2(model, name, ...)`` builds it.

    Needs a timm that imports (its torchvision must be built for the installed torch). The default base is
    SGD with Nesterov momentum 0.9, as timm's "sgd"; ``base=torch.optim.AdamW`` (and betas, eps) go through.
    """
    try:
        from timm.optim._optim_factory import OptimInfo, default_registry
    except ImportError as exc:
        raise FixNormError(f"register_timm needs timm with its optimizer registry (timm >= 1.0.12): {exc}") from exc
    (registry or default_registry).register(OptimInfo(
        name=name, opt_class=timm_optimizer, description="FixNorm: scale-invariant weights and the classifier held "
        "at fixed norms instead of weight decay (pass model=model, example_inputs=batch)",
        has_eps=True, has_betas=True, has_momentum=True, defaults={"nesterov": True}))
