"""BatchNorm running statistics re-estimated from training images: the weights as they are now, not as they were.

BatchNorm's running mean and variance are a moving average over the last few dozen training batches (momentum 0.1).
When the weights turn quickly, as held norms at a constant learning rate make them, those statistics describe weights
that no longer exist and the evaluated model can lose many points that its weights have not (docs/fixnorm.md,
"Schedules the README job had not seen"). Re-estimating them on a few thousand training images before evaluating
("precise BN", Wu & Johnson 2021) costs a few forward passes and removes that lag, for any optimizer.

A leaf module (torch and the errors only): usable in any training loop, and what the engine's ``precise_bn`` calls.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import FixNormError

__all__ = ["recompute_bn_statistics_"]


@torch.no_grad()
def recompute_bn_statistics_(model: nn.Module, batches: Iterable[torch.Tensor], *,
                             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                             ) -> int:
    """Re-estimate every BatchNorm's running statistics of ``model`` on ``batches``, in place; returns the batch count.

    Each BatchNorm with running statistics is reset and switched to cumulative averaging (``momentum=None``: the
    running mean is the mean of the batch means, the variance the mean of the unbiased batch variances, every batch
    weighted alike, as ``torch.optim.swa_utils.update_bn``), and only the BatchNorms run in train mode: dropout and
    the rest stay in eval mode, so the forwards draw no random numbers. Afterwards every module's train/eval mode and
    every momentum are as they were; ``num_batches_tracked`` counts the batches used. Parameters and gradients are
    not touched. A model without such BatchNorms is left alone (0 is returned without a forward).
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in norms]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    count = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x in batches:
            with autocast():
                model(x)
            count += 1
        if count == 0:
            raise FixNormError("re-estimating BatchNorm statistics got no batches: give it at least one batch of "
                               "training images")
        held = {id(m) for m in norms}
        bad = [name for name, m in model.named_modules() if id(m) in held
               and not (math.isfinite(float(m.running_mean.sum())) and math.isfinite(float(m.running_var.sum())))]
        if bad:
            raise FixNormError(f"re-estimated BatchNorm statistics are not finite in {bad[:4]}: the model's "
                               f"activations overflow on these images (non-finite weights, or inputs not prepared "
                               f"as in training?)")
    except BaseException:  # a failed estimate leaves the statistics the model had
        for m, (mean, var, tracked) in zip(norms, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(tracked)
        raise
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return count
