"""What the multi-phase studies share (``fixnorm prune``, ``fixnorm unify``): phases as runs in one folder, reused
when finished and resumed when interrupted; the recipe's model as its method trains it; mean ± std over seeds."""
from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..methods import get_method, with_method_settings
from ..models import create_model
from ..run_folder import RunFolder
from .checkpoint import load_checkpoint
from .config import TrainConfig
from .data_source import make_data
from .distributed import DistInfo
from .engine import train_or_reuse

Callbacks = Callable[[str], dict[str, Any]]  # run name -> Trainer keyword arguments (progress display)


def train_phase(out: Path, name: str, cfg: TrainConfig, make_callbacks: Callbacks | None = None) -> dict[str, Any]:
    """The summary of the run ``out/name``: read if finished, resumed if interrupted, trained if new."""
    run_dir = out / name
    callbacks = {} if RunFolder(run_dir).finished or make_callbacks is None else make_callbacks(name)
    return train_or_reuse(cfg, run_dir, **callbacks)


def recipe_model(cfg: TrainConfig) -> tuple[nn.Module, int]:
    """A fresh model of the recipe as its method trains it (``prepare_model`` applied), and the steps per epoch."""
    data = make_data(cfg, DistInfo(), torch.device("cpu"))
    cfg = with_method_settings(cfg)
    model = create_model(cfg.model, num_classes=data.info.num_classes, in_channels=data.info.in_channels,
                         **cfg.model_kwargs)
    return get_method(cfg.method).prepare_model(model, cfg), data.steps_per_epoch


def model_state(path: Path) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint file."""
    return load_checkpoint(path)["model"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
