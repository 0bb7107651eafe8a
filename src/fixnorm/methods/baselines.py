"""The weight-decay baselines: SGD, AdamW and RMSprop with decay on weights only (not biases or norm parameters)."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import Method, register_method

if TYPE_CHECKING:
    from ..train.config import TrainConfig


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The usual recipe: decay weights with ndim >= 2; biases and norm scales/shifts go undecayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def base_optimizer(cfg: TrainConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The torch.optim class and its arguments for ``cfg.base``, without weight decay."""
    if cfg.base == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov and cfg.momentum > 0}
    if cfg.base == "adam":
        return torch.optim.Adam, {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.base == "adamw":
        return torch.optim.AdamW, {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    return torch.optim.RMSprop, {"lr": cfg.lr, "alpha": cfg.alpha, "eps": cfg.eps, "momentum": cfg.momentum}


def decayed_optimizer(model: nn.Module, cfg: TrainConfig, base: str | None = None) -> torch.optim.Optimizer:
    """``cfg.base`` (or ``base``) over ``model`` with ``cfg.weight_decay`` on its weights: every method's starting point."""
    cls, kwargs = base_optimizer(cfg if base is None else replace(cfg, base=base))
    return cls(decay_groups(model, cfg.weight_decay), **kwargs)


def _with_decay(base: str):
    def build(model: nn.Module, cfg: TrainConfig, example: torch.Tensor) -> torch.optim.Optimizer:
        return decayed_optimizer(model, cfg, base)

    return build


register_method(Method("sgd", "SGD with momentum and weight decay on weights (the usual baseline)", _with_decay("sgd")))
register_method(Method("adamw", "AdamW with decoupled weight decay on weights", _with_decay("adamw")))
register_method(Method("rmsprop", "RMSprop with weight decay on weights (EfficientNet / MobileNetV2 recipes)",
                       _with_decay("rmsprop")))
