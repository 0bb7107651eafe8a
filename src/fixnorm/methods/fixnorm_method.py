"""FixNorm as a training method: no weight decay, fixed norms, the classifier norm a setting of its own."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..optim import FixNorm
from . import Method, register_method
from .baselines import base_optimizer

if TYPE_CHECKING:
    from ..train.config import TrainConfig


def build_fixnorm(model: nn.Module, cfg: TrainConfig, example: torch.Tensor) -> torch.optim.Optimizer:
    cls, kwargs = base_optimizer(cfg)
    target = "initial" if cfg.target_norm is None else cfg.target_norm
    return FixNorm(model, example, base=cls, fc_norm=cfg.fc_norm, granularity=cfg.granularity, target=target,
                   fc_granularity=cfg.fc_granularity, others=cfg.others, others_weight_decay=cfg.others_weight_decay,
                   free_steps=cfg.free_steps, fc_scale=cfg.fc_scale, lr_power=cfg.lr_power,
                   angular_update=cfg.angular_update,
                   angle_power=cfg.angle_power, **kwargs)


register_method(Method("fixnorm", "FixNorm: scale-invariant weights and the classifier held at fixed norms "
                       "(base optimizer from `base`; `weight_decay` is not used)", build_fixnorm))
