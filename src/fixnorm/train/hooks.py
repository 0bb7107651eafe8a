"""The engine's own hooks (EMA); the Hook interface itself lives in ``fixnorm.hooks``, below the engine."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..bn_statistics import recompute_bn_statistics_
from ..errors import FixNormError
from ..hooks import Hook, RunState
from .config import PRECISE_BN_IMAGES

if TYPE_CHECKING:
    from .engine import Trainer

__all__ = ["BN_CHECK_IMAGES", "EmaHook", "Hook", "recomputed_on_training_images", "training_image_batches",
           "with_recomputed_bn", "with_student_buffers"]

# training images whose BatchNorm statistics the EMA model is re-estimated on (the 2,000): precise BN's
BN_CHECK_IMAGES = PRECISE_BN_IMAGES


class EmaHook(Hook):
    """Exponential moving average of the weights *and* buffers (BN statistics), evaluated each epoch.

    ``ema_test_acc`` scores the EMA weights with the statistics the run's ``ema_bn`` names: "averaged", the EMA's own
    averaged buffers, or "recomputed", statistics re-estimated on the ``precise_bn`` training images, on a copy (the
    default with precise BN: an average of buffers recorded along the way lags the averaged weights as the running
    statistics lag the student's; docs/eman.md). With the run's ``ema_bn_check`` the EMA weights are also evaluated
    three fixed ways, so one supervised run says which statistics an EMA model should carry:
    ``ema/test_acc_ema_buffers`` (its own averaged buffers), ``ema/test_acc_student_buffers`` (the student's
    buffers copied in, as USB does) and ``ema/test_acc_recomputed_bn`` (statistics re-estimated on the first
    ``BN_CHECK_IMAGES`` training images). Each works on a temporary copy: the EMA model, the student and every
    random stream are left as they were.
    """

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    def after_step(self, trainer: Trainer) -> None:
        self.ema.update_parameters(trainer.model)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        scored = self.ema.module
        if trainer.cfg.ema_bn == "recomputed":
            scored = recomputed_on_training_images(trainer, self.ema.module, trainer.cfg.precise_bn)
        record["ema_test_loss"], record["ema_test_acc"] = trainer.evaluate(scored)
        if not trainer.cfg.ema_bn_check:
            return
        record["ema/test_acc_ema_buffers"] = (record["ema_test_acc"] if scored is self.ema.module
                                              else trainer.evaluate(self.ema.module)[1])
        record["ema/test_acc_student_buffers"] = trainer.evaluate(with_student_buffers(self.ema.module,
                                                                                       trainer.model))[1]
        same_images = scored is not self.ema.module and trainer.cfg.precise_bn == BN_CHECK_IMAGES
        record["ema/test_acc_recomputed_bn"] = (record["ema_test_acc"] if same_images else trainer.evaluate(
            recomputed_on_training_images(trainer, self.ema.module))[1])

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state["ema"])


@torch.no_grad()
def with_student_buffers(model: nn.Module, student: nn.Module) -> nn.Module:
    """A copy of ``model`` (an EMA) whose buffers, every one, are the student's: USB's teacher. ``model`` untouched."""
    copied = copy.deepcopy(model)
    mine, theirs = dict(copied.named_buffers()), dict(student.named_buffers())
    if mine.keys() != theirs.keys():
        raise FixNormError(f"the EMA model and the student have different buffers "
                           f"({sorted(set(mine) ^ set(theirs))[:4]}); the EMA must be a copy of the student")
    for name, buffer in mine.items():
        buffer.copy_(theirs[name])
    return copied


def recomputed_on_training_images(run: RunState, model: nn.Module, count: int = BN_CHECK_IMAGES) -> nn.Module:
    """A copy of ``model`` with BatchNorm statistics re-estimated on ``count`` un-augmented training images
    (:func:`training_image_batches`). What the EMA hook and ``benchmarks/bn_statistics_check.py`` evaluate."""
    return with_recomputed_bn(model, training_image_batches(run, count), autocast=run.autocast)


def training_image_batches(run: RunState, count: int) -> Iterator[torch.Tensor]:
    """``count`` training images, un-augmented, prepared as the run prepares a batch (normalisation, channels_last),
    in batches of the run's batch size: the first ones stored in memory, or ones spread over a streamed ImageFolder
    tree (``statistics_images`` of train/data_source.py). A last batch of one image joins the one before."""
    return (run.prepare_batch(x) for x in run.statistics_images(count))


def with_recomputed_bn(model: nn.Module, batches: Iterable[torch.Tensor], *,
                       autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                       ) -> nn.Module:
    """A copy of ``model`` in eval mode whose BatchNorm statistics are re-estimated on ``batches``
    (:func:`fixnorm.bn_statistics.recompute_bn_statistics_`); ``model`` untouched."""
    copied = copy.deepcopy(model).eval()
    recompute_bn_statistics_(copied, batches, autocast=autocast)
    return copied
