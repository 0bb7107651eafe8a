"""Engine hooks: how methods and features (EMA, LAWN's warm-up, EMAN's teacher, ...) join the one training loop."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .engine import Trainer


class Hook:
    """Override what you need. Hooks run in order; their state goes into the checkpoint."""

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def before_step(self, trainer: Trainer) -> None:
        """After backward (and clipping), before ``optimizer.step()``: gradients are in ``.grad``."""

    def after_step(self, trainer: Trainer) -> None:
        """After ``optimizer.step()`` and the scheduler step."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """Add entries to ``record``: they become columns of metrics.csv."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EmaHook(Hook):
    """Exponential moving average of the weights *and* buffers (BN statistics), evaluated each epoch."""

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def after_step(self, trainer: Trainer) -> None:
        self.ema.update_parameters(trainer.model)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        record["ema_test_loss"], record["ema_test_acc"] = trainer.evaluate(self.ema.module)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])

