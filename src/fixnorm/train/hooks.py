"""The engine's own hooks (EMA); the Hook interface itself lives in ``fixnorm.hooks``, below the engine."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from ..hooks import Hook

if TYPE_CHECKING:
    from .engine import Trainer

__all__ = ["EmaHook", "Hook"]


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

