"""A-FAN: adversarial feature augmentation and normalization (Chen et al., TMLR 2022, arXiv 2103.12171).

The model is split at a point k into ``head`` and ``tail`` (``tail(head(x)) == model(x)``). Each step perturbs the
clean features ``h = head(x)`` by PGD against the tail alone, takes points between ``h`` and the adversarial features
at several strengths, gives some of them the clean features' content with the adversarial per-position statistics
(``mix``), and trains on ``(CE(tail(h)) + mean_i CE(tail(point_i))) / 2``. The adversarial terms reach only the tail.

From the classification code: the split, feature PGD with sign steps (S=5, gamma=0.5/255, no random start, no clip,
as the released model), several strengths, the loss. From the detection code: the positional normalization with
moment shortcut (``mix``) and which points it applies to. Ours: the step size in units of the features' RMS (the
default; see docs/afan.md), ``bn_mode`` and the choice of optimizer (any registered method's).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FixNormError
from ..hooks import Hook, RunState, TrainStep
from ..models.cifar_resnet import CifarResNet
from ..models.layers import KeepBatchNormStatistics
from ..models.mobilenetv2 import SETTINGS as MOBILENET_STAGES
from ..models.mobilenetv2 import MobileNetV2
from ..models.preact_resnet import PreActResNet
from ..models.small_cnn import SmallCNN
from . import Method, get_method, method_settings, register_method

if TYPE_CHECKING:
    from ..train.config import TrainConfig

MIX_EPS = 1e-5  # sigma = sqrt(var + 1e-5), as the reference's positional normalization


# -- the split -------------------------------------------------------------------------------------------
@dataclass
class Split:
    """``model``'s forward as a chain of pieces, cut after piece ``cut``: ``tail(head(x))`` is ``model(x)``."""

    pieces: list[nn.Module]
    cut: int

    @property
    def tail_modules(self) -> list[nn.Module]:
        """The tail's modules (its BatchNorm buffers are what the extra forwards touch)."""
        return self.pieces[self.cut:]

    def head(self, x: torch.Tensor) -> torch.Tensor:
        for piece in self.pieces[:self.cut]:
            x = piece(x)
        return x

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        for piece in self.pieces[self.cut:]:
            h = piece(h)
        return h


def _stage_ends(blocks: Sequence[nn.Module], stride_of: Callable[[nn.Module], int]) -> list[int]:
    """Index (in ``blocks``) of the last block of each stage: a stage starts with a strided block."""
    starts = [i for i, b in enumerate(blocks) if i > 0 and stride_of(b) > 1]
    return [s - 1 for s in starts] + [len(blocks) - 1]


def _conv_stride(conv: nn.Conv2d) -> int:
    return int(conv.stride[0])


def split_points(model: nn.Module) -> tuple[list[nn.Module], dict[str, int]]:
    """(the modules whose chain is the forward, {split point name: number of them in the head})."""
    if isinstance(model, CifarResNet):
        blocks = list(model.layers)
        modules = [model.stem, *blocks, model.pool, model.fc]
        ends = _stage_ends(blocks, lambda b: _conv_stride(b.conv1))
        points = {"stem": 1, **{f"stage{i + 1}": 2 + e for i, e in enumerate(ends)}}
        return modules, points
    if isinstance(model, PreActResNet):
        blocks = list(model.layers)
        modules = [model.stem, *blocks, model.final, model.pool, model.fc]
        ends = _stage_ends(blocks, lambda b: _conv_stride(b.conv1))
        points = {"stem": 1, **{f"stage{i + 1}": 2 + e for i, e in enumerate(ends)}}
        return modules, points
    if isinstance(model, SmallCNN):
        modules = [*model.features, model.classifier]
        kinds = [type(m) for m in model.features]
        # stage 1 ends with the max-pool, stage 2 with the last conv block (before the global pool)
        points = {"stage1": kinds.index(nn.MaxPool2d) + 1, "stage2": kinds.index(nn.AdaptiveAvgPool2d)}
        return modules, points
    if isinstance(model, MobileNetV2):
        blocks = list(model.features)
        modules = [*blocks, model.pool, model.dropout, model.fc]
        points, index = {"stem": 1}, 1
        for stage, (_, _, count, _) in enumerate(MOBILENET_STAGES):
            index += count
            points[f"stage{stage + 1}"] = index
        return modules, points
    raise FixNormError(f"A-FAN has no split points for {type(model).__name__}; supported: CifarResNet (resnet20/32/"
                       "56/110), PreActResNet (preact_resnet18, wrn16_4, wrn28_10), SmallCNN, MobileNetV2")


DEFAULT_SPLIT = "stage1"  # the end of the first stage (the official ResNet-56 setting)


def split_model(model: nn.Module, point: str = DEFAULT_SPLIT) -> Split:
    """``model`` cut at a named point (``stem``, ``stage1``, ``stage2``, ...); a clear error lists the points."""
    pieces, points = split_points(model)
    if point not in points:
        raise FixNormError(f"{type(model).__name__} has no split point {point!r}; it offers {sorted(points)}")
    cut = points[point]
    return Split(pieces, cut)


# -- the algorithm, as functions tested against their definitions ---------------------------------------------
def feature_pgd(tail: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor, *, steps: int,
                step_size: float | torch.Tensor, epsilon: float | torch.Tensor | None = None,
                random_start: bool = False) -> torch.Tensor:
    """Adversarial features: ``steps`` sign-gradient ascent steps of CE(tail(h_a), y) from ``h`` (detached).

    ``epsilon`` clips to the L-infinity ball around ``h``; ``random_start`` starts uniformly inside it. Uses
    ``autograd.grad`` on ``h_a`` only: no parameter's ``.grad`` is touched. Sizes may be 0-d tensors (no host sync).
    """
    h = h.detach()
    h_adv = h.clone()
    if random_start:
        if epsilon is None:
            raise FixNormError("A-FAN random_start needs an epsilon (the ball to start in)")
        h_adv = h_adv + (torch.rand_like(h) * 2 - 1) * epsilon
    for _ in range(steps):
        h_adv = h_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(tail(h_adv).float(), y)
        (grad,) = torch.autograd.grad(loss, [h_adv])
        h_adv = h_adv.detach() + step_size * grad.sign()
        if epsilon is not None:
            h_adv = h + torch.minimum(torch.maximum(h_adv - h, -epsilon * torch.ones_like(h)),
                                      epsilon * torch.ones_like(h))
    return h_adv.detach()


def positional_moments(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std over the channel dimension, per sample and position (``sqrt(var + 1e-5)``)."""
    mean = h.mean(dim=1, keepdim=True)
    std = (h.var(dim=1, keepdim=True, unbiased=False) + MIX_EPS).sqrt()
    return mean, std


def mix(h: torch.Tensor, adversarial: torch.Tensor) -> torch.Tensor:
    """The clean features' content with the adversarial features' per-position mean and std."""
    mean, std = positional_moments(h)
    adv_mean, adv_std = positional_moments(adversarial)
    return (h - mean) / std * adv_std + adv_mean


def feature_points(h: torch.Tensor, adversarial: torch.Tensor, strengths: Sequence[float],
                   mixed: Sequence[bool]) -> list[torch.Tensor]:
    """The training points ``lerp(h, h_a, t)`` (exactly ``h`` at 0 and ``h_a`` at 1), each through ``mix`` if asked."""
    points = []
    for t, mixing in zip(strengths, mixed):
        point = h if t == 0 else adversarial if t == 1 else torch.lerp(h, adversarial, t)
        points.append(mix(h, point) if mixing else point)
    return points


# -- the engine method ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AFANSettings:
    """``method_kwargs.afan``."""

    split: str = DEFAULT_SPLIT            # where the features are perturbed (split_model's names)
    steps: int = 5                        # PGD steps (the released model: 5)
    step_size: float = 0.5 / 255          # gamma (the released model: 0.5/255)
    step_unit: str = "rms"                # "rms": gamma x the clean features' RMS; "absolute": gamma itself
    epsilon: float | None = None          # L-infinity clip radius in the same unit; None: no clip (as released)
    random_start: bool = False            # start uniformly in the epsilon ball
    strengths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # points lerp(h, h_a, t)
    mixed: list[bool] = field(default_factory=lambda: [False, False, True, True])   # which points go through mix
    bn_mode: str = "train"                # "train": the extra forwards update BN statistics; "frozen": they do not
    adversarial_precision: str = "fp32"   # "fp32": PGD and the points in full precision; "run": the run's autocast
    optimizer: str = "sgd"                # the method whose optimizer (and hooks) A-FAN trains with

    def __post_init__(self) -> None:
        if self.steps < 1 or self.step_size <= 0:
            raise FixNormError(f"method_kwargs.afan: steps >= 1 and step_size > 0, got {self.steps}, {self.step_size}")
        if self.step_unit not in ("rms", "absolute"):
            raise FixNormError(f"method_kwargs.afan.step_unit must be 'rms' or 'absolute', got {self.step_unit!r}")
        if self.adversarial_precision not in ("fp32", "run"):
            raise FixNormError(f"method_kwargs.afan.adversarial_precision must be 'fp32' or 'run', got "
                               f"{self.adversarial_precision!r}")
        if self.bn_mode not in ("train", "frozen"):
            raise FixNormError(f"method_kwargs.afan.bn_mode must be 'train' or 'frozen', got {self.bn_mode!r}")
        if not self.strengths or len(self.strengths) != len(self.mixed):
            raise FixNormError(f"method_kwargs.afan: strengths and mixed need one entry per point, got "
                               f"{self.strengths} and {self.mixed}")
        if any(not 0 < t <= 1 for t in self.strengths):
            raise FixNormError(f"method_kwargs.afan.strengths must lie in (0, 1], got {self.strengths}")
        if self.epsilon is not None and self.epsilon <= 0:
            raise FixNormError(f"method_kwargs.afan.epsilon must be > 0, got {self.epsilon}")
        if self.random_start and self.epsilon is None:
            raise FixNormError("method_kwargs.afan.random_start needs an epsilon (the ball to start in)")
        if self.optimizer == "afan":
            raise FixNormError("method_kwargs.afan.optimizer names the method A-FAN trains with; not afan itself")


class AFANStep(TrainStep):
    """The A-FAN loss of a step; records the size of the feature perturbations per epoch."""

    def __init__(self, split: Split, settings: AFANSettings) -> None:
        self.split, self.s = split, settings
        self._sums: torch.Tensor | None = None  # linf, l2 per sample, feature rms, batches: summed on the device

    def on_train_start(self, run: RunState) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_world_size() > 1:
            raise FixNormError("A-FAN calls the model's pieces directly, which DistributedDataParallel does not "
                               "synchronise; run it in one process")

    def loss(self, run: RunState, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, split = self.s, self.split
        h = split.head(x)
        logits = split.tail(h)
        clean = F.cross_entropy(logits.float(), y, label_smoothing=run.cfg.label_smoothing)
        h0 = h.detach()
        rms = h0.float().pow(2).mean().sqrt()
        unit = rms if s.step_unit == "rms" else torch.ones_like(rms)
        full = s.adversarial_precision == "fp32"
        if full:  # the steps (~0.2% of the RMS) are below bf16's resolution (0.4-0.8%): they would round away
            h0 = h0.float()
        with torch.autocast(h0.device.type, enabled=False) if full else contextlib.nullcontext(), \
                KeepBatchNormStatistics(split.tail_modules, s.bn_mode == "frozen"):
            h_adv = feature_pgd(split.tail, h0, y, steps=s.steps, step_size=unit * s.step_size,
                                epsilon=None if s.epsilon is None else unit * s.epsilon, random_start=s.random_start)
            terms = [F.cross_entropy(split.tail(point).float(), y, label_smoothing=run.cfg.label_smoothing)
                     for point in feature_points(h0, h_adv, s.strengths, s.mixed)]
        self._record(h0, h_adv, rms)
        return (clean + torch.stack(terms).mean()) / 2, logits

    @torch.no_grad()
    def _record(self, h: torch.Tensor, h_adv: torch.Tensor, scale: torch.Tensor) -> None:
        delta = (h_adv - h).float().flatten(1)
        values = torch.stack([delta.abs().amax(1).mean(), delta.norm(dim=1).mean(), scale.float(),
                              torch.ones((), device=h.device)])
        self._sums = values if self._sums is None else self._sums + values

    def on_epoch_end(self, run: RunState, record: dict[str, Any]) -> None:
        if self._sums is None:
            return
        linf, l2, rms, batches = (float(v) for v in self._sums)
        record.update({"afan/linf": linf / batches, "afan/l2": l2 / batches, "afan/feature_rms": rms / batches})
        self._sums = None


def afan_settings(cfg: TrainConfig) -> AFANSettings:
    return method_settings(cfg, "afan", AFANSettings)


def setup_afan(model: nn.Module, cfg: TrainConfig, example: torch.Tensor) -> tuple[torch.optim.Optimizer, list[Hook]]:
    """The optimizer and hooks of ``settings.optimizer`` (SGD + weight decay by default), with A-FAN's step."""
    settings = afan_settings(cfg)
    split = split_model(model, settings.split)
    with torch.no_grad():  # the split must be the model: check it once, on the example, in eval mode
        was_training = model.training
        model.eval()
        same = torch.equal(split.tail(split.head(example)), model(example))
        model.train(was_training)
    if not same:
        raise FixNormError(f"A-FAN's split of {type(model).__name__} does not reproduce its forward")
    optimizer, hooks = get_method(settings.optimizer).build(model, cfg, example)
    if any(isinstance(h, TrainStep) for h in hooks):
        raise FixNormError(f"method {settings.optimizer!r} owns its training step; A-FAN cannot train with it")
    return optimizer, [*hooks, AFANStep(split, settings)]


def prepare_afan(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The model as the optimizer's method prepares it (Powerpropagation's reparametrisation, MimicNorm's blocks)."""
    return get_method(afan_settings(cfg).optimizer).prepare_model(model, cfg)


register_method(Method("afan", "A-FAN: adversarial feature augmentation and normalization at a split point "
                       "(settings method_kwargs.afan.*; optimizer from method_kwargs.afan.optimizer, default sgd)",
                       setup=setup_afan, settings=AFANSettings, prepare_model=prepare_afan,
                       uses=lambda cfg: [afan_settings(cfg).optimizer]))
