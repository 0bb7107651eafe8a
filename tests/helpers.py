"""Shared test steps (pytest puts this folder on sys.path): interrupting a real run at an epoch boundary."""
import pytest

from fixnorm.train import Trainer


class StopTraining(Exception):
    """Raised from the epoch callback: the run stops as if killed right after that epoch's checkpoint."""


def train_until(cfg, run_dir, epoch, **trainer_kwargs):
    """Train ``cfg`` in ``run_dir`` and stop after ``epoch`` (last.pt then holds exactly that epoch)."""
    def stop(record):
        if record["epoch"] == epoch:
            raise StopTraining

    with pytest.raises(StopTraining):
        Trainer(cfg, run_dir, on_epoch=stop, **trainer_kwargs).fit()
