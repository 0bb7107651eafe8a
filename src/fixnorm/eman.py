"""Teachers that are moving averages of a student: EMAN (Cai et al., CVPR 2021) and its plain-EMA relatives.

EMAN's rule, from the authors' code: after every optimizer step, every entry of the state dict moves towards the
student's, ``t = m·t + (1-m)·s`` for parameters and floating buffers (BatchNorm's running mean and variance), and
integer buffers (``num_batches_tracked``) are copied. The teacher then always runs in eval mode, so it normalises
with those averaged statistics, never with the statistics of the batch it labels.

A leaf module (torch and the errors only): usable in any training loop, see docs/eman.md.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import FixNormError

BUFFER_MODES = ("average", "copy", "keep")


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float, *, buffers: str = "average") -> None:
    """Move ``teacher`` towards ``student`` in place: parameters ``t = m·t + (1-m)·s``; buffers as ``buffers`` says.

    ``buffers``: "average" (floating buffers like parameters, integer ones copied: EMAN, timm's ``ModelEmaV3``,
    ``AveragedModel(use_buffers=True)``), "copy" (the student's buffers: USB) or "keep" (untouched: lightly's
    ``update_momentum``, solo-learn's ``MomentumUpdater``). Entries are those of ``state_dict()``, matched by name.
    """
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise FixNormError(f"the EMA momentum m must be a number in [0, 1] (t = m·t + (1-m)·s), got {momentum!r}")
    if buffers not in BUFFER_MODES:
        raise FixNormError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
    if teacher is student:
        raise FixNormError("the teacher is the student itself: make it a copy (fixnorm.eman.teacher_copy)")
    mine, theirs = teacher.state_dict(keep_vars=True), student.state_dict(keep_vars=True)
    if mine.keys() != theirs.keys():
        differ = sorted(set(mine) ^ set(theirs))[:4]
        raise FixNormError(f"the teacher and the student have different state-dict entries ({differ}); the teacher "
                           "must be a copy of the student's architecture")
    params = {name for name, _ in student.named_parameters()}
    averaged_t: list[torch.Tensor] = []
    averaged_s: list[torch.Tensor] = []
    for name, t in mine.items():
        s = theirs[name]
        if t.shape != s.shape:
            raise FixNormError(f"{name!r}: the teacher's shape {tuple(t.shape)} is not the student's {tuple(s.shape)}")
        is_param = name in params
        if not is_param and buffers == "keep":
            continue
        if t.is_floating_point() and (is_param or buffers == "average"):
            averaged_t.append(t.detach())
            averaged_s.append(s.detach().to(dtype=t.dtype, device=t.device))
        else:  # integer buffers (num_batches_tracked), or every buffer under "copy"
            t.detach().copy_(s.detach())
    if averaged_t:
        # lerp: t + (1-m)(s - t); exactly t at m = 1 and exactly s at m = 0
        torch._foreach_lerp_(averaged_t, averaged_s, 1.0 - float(momentum))


def eman_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """EMAN's teacher update: parameters and floating buffers ``t = m·t + (1-m)·s``, integer buffers copied.

    Call it after every optimizer step; run the teacher in eval mode (``teacher_copy`` sets it) so that it uses
    the averaged BatchNorm statistics.
    """
    ema_update_(teacher, student, momentum, buffers="average")


def teacher_copy(student: nn.Module, *, train_mode: bool = False) -> nn.Module:
    """A teacher to average into: a deep copy of ``student`` without gradients, in eval mode (EMAN) unless asked."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.train(train_mode)
