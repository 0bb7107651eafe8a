"""A short, real FixNorm run on Fashion-MNIST: the README's main job until the training engine lands.

Data lives as uint8 tensors; each batch is augmented (random crop with padding 2,
no flip: a flipped shoe is still a shoe, but the run is one epoch) and normalised on
the fly. The learning rate follows a cosine schedule, which under FixNorm *is* the
effective-LR schedule of every scale-invariant weight.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, normalize, random_crop_flip
from .models import create_model
from .optim import FixNorm


@dataclass
class DemoResult:
    test_accuracy: float
    test_loss: float
    train_loss: float
    seconds: float
    images_per_second: float
    plan_table: str


def run_demo(
    data_dir: str | Path | None = None,
    *,
    model: str = "small_cnn",
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 0.2,
    fc_norm: float | None = None,
    train_subset: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    **fixnorm_options: Any,
) -> DemoResult:
    """Train ``model`` with FixNorm(SGD, Nesterov momentum 0.9) and return its test accuracy.

    ``progress(step, total_steps, loss)`` is called every step (the CLI draws a bar);
    ``fixnorm_options`` (granularity, target, fc_granularity, ...) go to FixNorm.
    """
    torch.manual_seed(seed)
    train_x, train_y = load_fashion_mnist(data_dir, "train")
    test_x, test_y = load_fashion_mnist(data_dir, "test")
    if train_subset is not None:
        train_x, train_y = train_x[:train_subset], train_y[:train_subset]
    net = create_model(model, num_classes=10, in_channels=1)
    example = normalize(train_x[:batch_size], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    opt = FixNorm(net, example, lr=lr, momentum=0.9, nesterov=True, fc_norm=fc_norm, **fixnorm_options)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)

    start, step, running = time.perf_counter(), 0, 0.0
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x = normalize(random_crop_flip(train_x[idx], padding=2, flip=False, generator=gen),
                          FASHION_MNIST_MEAN, FASHION_MNIST_STD)
            loss = F.cross_entropy(net(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            value = float(loss.detach())
            running = 0.9 * running + 0.1 * value if step > 1 else value
            if progress is not None:
                progress(step, total, running)
    seconds = time.perf_counter() - start
    test_loss, test_acc = evaluate(net, test_x, test_y)
    return DemoResult(test_accuracy=test_acc, test_loss=test_loss, train_loss=running, seconds=seconds,
                      images_per_second=epochs * len(train_x) / seconds, plan_table=opt.plan.table())


@torch.no_grad()
def evaluate(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in eval mode."""
    was_training = net.training
    net.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(images), batch_size):
        x = normalize(images[i:i + batch_size], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
        logits = net(x)
        loss_sum += float(F.cross_entropy(logits, labels[i:i + batch_size], reduction="sum"))
        correct += int((logits.argmax(1) == labels[i:i + batch_size]).sum())
    net.train(was_training)
    return loss_sum / len(images), correct / len(images)
