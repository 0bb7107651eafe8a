"""One run's folder: the layout every writer and reader shares, and whether a run is finished, interrupted or new.

The engine writes it, ``compare``, the tuner and the benchmarks reuse or resume through it, ``report`` reads it. A leaf:
it imports nothing of the training code, so ``report`` can use it without loading the engine.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import FixNormError


@dataclass(frozen=True)
class RunFolder:
    """The files of one run: ``config.yaml``, ``metrics.csv``, ``summary.json``, ``last.pt``, ``best.pt``,
    ``step-<k>.pt`` (the states asked for with ``save_at_steps``), ``tensorboard/``. A run is *finished* once its summary is written, *interrupted* when it has a checkpoint but no
    summary, *new* otherwise."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.csv")
    summary = property(lambda self: self.path / "summary.json")
    last = property(lambda self: self.path / "last.pt")
    best = property(lambda self: self.path / "best.pt")
    tensorboard = property(lambda self: self.path / "tensorboard")

    def at_step(self, step: int) -> Path:
        """The checkpoint saved after optimizer step ``step`` (``save_at_steps``): a rewinding point."""
        return self.path / f"step-{step}.pt"

    @property
    def finished(self) -> bool:
        return self.summary.is_file()

    @property
    def interrupted(self) -> bool:
        return not self.finished and self.last.is_file()

    def read_config(self) -> dict[str, Any] | None:
        """The settings the run was started with (``config.yaml``), or None when it has none."""
        return yaml.safe_load(self.config.read_text()) if self.config.is_file() else None

    def read_summary(self) -> dict[str, Any]:
        if not self.finished:
            raise FixNormError(f"{self.path} has no summary.json: the run has not finished")
        return json.loads(self.summary.read_text())
