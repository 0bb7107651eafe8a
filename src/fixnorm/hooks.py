"""Engine hooks: how methods and features (EMA, LAWN's warm-up, diagnostics, a teacher, ...) join the one loop.

A leaf module: it imports nothing from ``fixnorm.train``, so methods and diagnostics can define hooks without
loading the engine. A hook sees the run through ``RunState``, the small documented part of the trainer it may read.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class RunState(Protocol):
    """What a hook may read of the running training (the engine's Trainer provides it)."""

    model: nn.Module                        # the model being trained (unwrapped: no DDP, no torch.compile)
    forward_model: nn.Module                # the same model as training calls it (DDP / torch.compile wrapped)
    optimizer: torch.optim.Optimizer
    global_step: int                        # optimizer steps taken so far
    steps_per_epoch: int
    cfg: Any                                # the run's TrainConfig (read-only)
    run_dir: Path                           # the run's folder (hooks may write their own files there)

    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(loss, accuracy) of ``model`` on the evaluation set."""

    def autocast(self) -> AbstractContextManager:
        """The run's mixed-precision context."""

    def prepare_batch(self, x: torch.Tensor) -> torch.Tensor:
        """A stored uint8 batch -> the model's normalised float input."""

    def example_input(self) -> torch.Tensor:
        """A prepared batch the model accepts (for an analysis of roles)."""

    def probe_images(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first ``count`` training images (stored form, un-augmented) and labels; None for streamed data."""

    def statistics_images(self, count: int) -> Iterator[torch.Tensor]:
        """``count`` un-augmented training images (stored uint8 form) in batches of the run's batch size, stored or
        streamed: what BatchNorm statistics are re-estimated on."""

    def unlabelled_images(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole training set (stored form) and its labels, for a semi-supervised step's unlabelled stream
        (the labels only to measure pseudo-labels); with ``labels_per_class`` the batches are a subset of it."""


class Hook:
    """Override what you need. Hooks run in order; their state goes into the checkpoint."""

    def on_train_start(self, run: RunState) -> None:
        """Before the first step of this process (also after a resume)."""

    def before_step(self, run: RunState) -> None:
        """After backward (and clipping), before ``optimizer.step()``: gradients are in ``.grad``."""

    def after_step(self, run: RunState) -> None:
        """After ``optimizer.step()`` and the scheduler step."""

    def on_epoch_end(self, run: RunState, record: dict[str, Any]) -> None:
        """Add entries to ``record``: they become columns of metrics.csv."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class TrainStep(Hook):
    """A hook that owns the loss of a training step: any number of forwards, extra terms, its own state.

    The engine calls ``loss`` inside the run's autocast for every batch and keeps everything else: backward,
    GradScaler, clipping, the other hooks, the optimizer and scheduler steps, records, checkpoints, DDP and
    resume. State the step keeps (a teacher, dual variables, masks) goes through ``state_dict`` like any
    hook's. At most one per run.
    """

    def loss(self, run: RunState, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar fp32 loss to minimise, logits of ``x`` for the train accuracy) for one prepared batch."""
        raise NotImplementedError
