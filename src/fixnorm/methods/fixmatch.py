"""FixMatch (Sohn et al., NeurIPS 2020) on the one engine, with the teachers EMAN compares (Cai et al., CVPR 2021).

The engine's batches are the labelled subset (``labels_per_class`` in the config); this train step draws the
unlabelled stream itself from the whole training set (``RunState.unlabelled_images``, labels used only to
measure the pseudo-labels), ``mu`` images per labelled one. Per step:
``loss_x + lambda_u · mean_i CE(student(strong_i), argmax p_i) · [max p_i >= threshold]`` over all ``mu·B``
unlabelled images, ``p_i`` the prediction on the weak view of image i by the teacher:

- ``none``: the student itself, in the same train-mode forward as the labelled and strong batches (the official
  baseline; gradient stopped at p).
- ``ema``: a parameter EMA of the student, forward in train mode under no_grad (BatchNorm normalises with the
  weak batch's statistics; its running statistics follow its own forwards, never averaged).
- ``eman``: EMAN, ``fixnorm.eman_update_`` after every optimizer step (parameters and BN statistics averaged), the
  teacher in eval mode.
- ``eman_renorm`` (with FixNorm as the optimizer): EMAN, then the teacher's constrained weights are put back at
  FixNorm's norm targets; the average of rotating weights of fixed norm is shorter than they are.

The stream's draws of step k come from (seed, k, rank) alone, so a run resumes bit for bit from any checkpoint;
the teacher is the step's state (in checkpoints). Ours, not the papers': the engine's cosine schedule (FixMatch
uses cos(7πk/16K)), RandAugment on Fashion-MNIST, ``mu=3`` by default (FixMatch's 7 is too slow on 2 CPU cores).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..constraints import fix_filter_norms_, fix_tensor_norms_
from ..data.augment import random_crop_flip
from ..data.randaugment import strong_augment
from ..eman import ema_update_, teacher_copy
from ..errors import FixNormError
from ..hooks import Hook, RunState, TrainStep
from ..optim import FixNorm
from . import Method, get_method, method_settings, register_method

if TYPE_CHECKING:
    from ..train.config import TrainConfig

TEACHERS = ("none", "ema", "eman", "eman_renorm")


@dataclass(frozen=True)
class FixMatchSettings:
    """``method_kwargs.fixmatch``; the number of labels is the config's ``labels_per_class``."""

    mu: int = 3                      # unlabelled images per labelled one in a step (FixMatch: 7)
    lambda_u: float = 1.0            # weight of the unlabelled loss
    threshold: float = 0.95          # tau: a pseudo-label counts when the teacher's top probability reaches it
    teacher: str = "none"            # none | ema | eman | eman_renorm: who labels the weak view (module docstring)
    teacher_momentum: float = 0.999  # m of the teacher's average t = m·t + (1-m)·s
    num_ops: int = 2                 # RandAugment ops per strong view
    optimizer: str = "sgd"           # the method whose optimizer (and hooks) FixMatch trains with; fixnorm too

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise FixNormError(f"method_kwargs.fixmatch.teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise FixNormError(f"method_kwargs.fixmatch.threshold is a probability in [0, 1], got {self.threshold}")
        if not 0.0 <= self.teacher_momentum <= 1.0:
            raise FixNormError(f"method_kwargs.fixmatch.teacher_momentum must lie in [0, 1], got "
                               f"{self.teacher_momentum}")
        if self.mu < 1 or self.num_ops < 0 or self.lambda_u < 0:
            raise FixNormError(f"method_kwargs.fixmatch: mu >= 1, num_ops >= 0 and lambda_u >= 0, got mu={self.mu}, "
                               f"num_ops={self.num_ops}, lambda_u={self.lambda_u}")
        if self.optimizer == "fixmatch":
            raise FixNormError("method_kwargs.fixmatch.optimizer names the method FixMatch trains with; not fixmatch")
        if self.teacher == "eman_renorm" and self.optimizer != "fixnorm":
            raise FixNormError("teacher eman_renorm puts the teacher's weights at FixNorm's norm targets, so it needs "
                               f"FixNorm as the optimizer: set method_kwargs.fixmatch.optimizer=fixnorm (got "
                               f"{self.optimizer!r}), or use teacher=eman")


class FixMatchTerms(NamedTuple):
    loss: torch.Tensor          # loss_x + lambda_u · loss_u
    loss_x: torch.Tensor
    loss_u: torch.Tensor
    mask: torch.Tensor          # 1.0 where the pseudo-label counts
    pseudo_labels: torch.Tensor


def fixmatch_loss(logits_x: torch.Tensor, labels: torch.Tensor, logits_strong: torch.Tensor,
                  probs_weak: torch.Tensor, *, threshold: float, lambda_u: float,
                  label_smoothing: float = 0.0) -> FixMatchTerms:
    """FixMatch's loss: ``loss_u`` is the masked cross-entropy averaged over ALL unlabelled images, not the kept ones.

    ``probs_weak`` are the teacher's class probabilities on the weak views (no gradient flows through them).
    """
    probs_weak = probs_weak.detach().float()
    confidence, pseudo = probs_weak.max(1)
    mask = (confidence >= threshold).float()
    loss_x = F.cross_entropy(logits_x.float(), labels, label_smoothing=label_smoothing)
    loss_u = (F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * mask).mean()
    return FixMatchTerms(loss_x + lambda_u * loss_u, loss_x, loss_u, mask, pseudo)


@torch.no_grad()
def renorm_to_targets_(model: nn.Module, targets: dict[str, torch.Tensor]) -> None:
    """Rescale each named weight of ``model`` to its target: one number is the tensor's norm, a vector one norm per
    filter (slice along dim 0), as FixNorm's ``norm_targets()`` gives them."""
    params = dict(model.named_parameters())
    missing = sorted(set(targets) - set(params))
    if missing:
        raise FixNormError(f"the norm targets name weights the model does not have: {missing[:4]}")
    # one number: the whole tensor's norm (for a single filter the two are the same)
    whole = [(params[n], t) for n, t in targets.items() if t.numel() == 1]
    per_filter = [(params[n], t) for n, t in targets.items() if t.numel() > 1]
    if whole:
        ps = [p for p, _ in whole]
        fix_tensor_norms_(ps, torch.stack([t.reshape(()).to(ps[0].device) for _, t in whole]))
    if per_filter:
        fix_filter_norms_([p for p, _ in per_filter], [t.to(p.device) for p, t in per_filter])


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


class FixMatchStep(TrainStep):
    """FixMatch's loss of a step, its teacher (state) and the per-epoch pseudo-label records."""

    def __init__(self, model: nn.Module, settings: FixMatchSettings) -> None:
        self.s = settings
        self.teacher: nn.Module | None = None
        if settings.teacher != "none":  # a copy of the student as the optimizer left it (FixNorm projects at start)
            self.teacher = teacher_copy(model, train_mode=settings.teacher == "ema")
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, permutation of the unlabelled set)
        self._sums: torch.Tensor | None = None

    # -- the unlabelled stream -------------------------------------------------------------------
    def on_train_start(self, run: RunState) -> None:
        pool = run.unlabelled_images()
        if pool is None:
            raise FixNormError("FixMatch draws its unlabelled stream from in-memory training data; the dataset "
                               f"{run.cfg.dataset!r} is streamed")
        self.images, self.labels = pool
        if self.teacher is not None:
            self.teacher.train(self.s.teacher == "ema")
        if self.s.teacher == "eman_renorm" and not isinstance(run.optimizer, FixNorm):
            raise FixNormError("teacher eman_renorm needs FixNorm as the optimizer (its norm targets)")

    def unlabelled_batch(self, run: RunState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weak views, strong views, true labels) of this step's ``mu · batch_size`` unlabelled images.

        Without replacement within an epoch (one permutation per epoch), and every draw from (seed, step, rank).
        """
        cfg, step, rank = run.cfg, run.global_step, _rank()
        epoch, within = divmod(step, run.steps_per_epoch)
        count = self.s.mu * cfg.batch_size
        n = len(self.images)
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(cfg.seed * 2_000_003 + epoch * 4_099 + rank * 15_485_863 + 7)
            self._order = (epoch, torch.randperm(n, generator=gen).to(self.images.device))
        positions = (within * count + torch.arange(count, device=self.images.device)) % n
        idx = self._order[1][positions]
        gen = torch.Generator().manual_seed(cfg.seed * 3_000_017 + step * 7_919 + rank * 104_729 + 11)
        images = self.images[idx]
        padding = cfg.crop_padding if cfg.augment != "none" else 0
        flip = cfg.augment == "crop_flip"
        weak = random_crop_flip(images, padding=padding, flip=flip, generator=gen) if cfg.augment != "none" else images
        strong = strong_augment(images, padding=padding, flip=flip, num_ops=self.s.num_ops, generator=gen)
        return weak, strong, self.labels[idx]

    # -- the loss ---------------------------------------------------------------------------------
    def loss(self, run: RunState, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weak, strong, truth = self.unlabelled_batch(run)
        x_weak, x_strong = run.prepare_batch(weak), run.prepare_batch(strong)
        b, n = len(y), len(truth)
        if self.teacher is None:  # the student labels the weak view in the same forward (the official baseline)
            logits_x, logits_weak, logits_strong = run.forward_model(torch.cat([x, x_weak, x_strong])).split([b, n, n])
            probs = logits_weak.detach().float().softmax(1)
        else:
            logits_x, logits_strong = run.forward_model(torch.cat([x, x_strong])).split([b, n])
            with torch.no_grad():  # eval mode for EMAN (averaged statistics), train mode for EMA (batch statistics)
                probs = self.teacher(x_weak).float().softmax(1)
        terms = fixmatch_loss(logits_x, y, logits_strong, probs, threshold=self.s.threshold,
                              lambda_u=self.s.lambda_u, label_smoothing=run.cfg.label_smoothing)
        self._record(terms, truth)
        return terms.loss, logits_x

    @torch.no_grad()
    def _record(self, terms: FixMatchTerms, truth: torch.Tensor) -> None:
        correct = (terms.pseudo_labels == truth).float()
        values = torch.stack([terms.loss_x.detach(), terms.loss_u.detach(), terms.mask.sum(), correct.sum(),
                              (correct * terms.mask).sum(), torch.tensor(float(len(truth)), device=truth.device),
                              torch.ones((), device=truth.device)])
        self._sums = values if self._sums is None else self._sums + values

    # -- the teacher ------------------------------------------------------------------------------
    def after_step(self, run: RunState) -> None:
        if self.teacher is None:
            return
        if self.s.teacher == "ema":  # parameters only: its BN statistics are its own forwards'
            ema_update_(self.teacher, run.model, self.s.teacher_momentum, buffers="keep")
            return
        ema_update_(self.teacher, run.model, self.s.teacher_momentum, buffers="average")  # eman_update_
        if self.s.teacher == "eman_renorm":
            assert isinstance(run.optimizer, FixNorm)
            renorm_to_targets_(self.teacher, run.optimizer.norm_targets())  # none yet in FixNorm's free phase

    def on_epoch_end(self, run: RunState, record: dict[str, Any]) -> None:
        if self.teacher is not None:
            record["fixmatch/teacher_test_loss"], record["fixmatch/teacher_test_acc"] = run.evaluate(self.teacher)
        if self._sums is None:
            return
        loss_x, loss_u, kept, correct, kept_correct, seen, steps = (float(v) for v in self._sums)
        record.update({"fixmatch/loss_x": loss_x / steps, "fixmatch/loss_u": loss_u / steps,
                       "fixmatch/mask_rate": kept / seen, "fixmatch/pseudo_label_acc": correct / seen,
                       "fixmatch/kept_pseudo_label_acc": kept_correct / kept if kept else float("nan")})
        self._sums = None

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.teacher is None) != ("teacher" not in state):
            raise FixNormError("the checkpoint's FixMatch teacher does not match this run's teacher setting")
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])


def fixmatch_settings(cfg: TrainConfig) -> FixMatchSettings:
    return method_settings(cfg, "fixmatch", FixMatchSettings)


def setup_fixmatch(model: nn.Module, cfg: TrainConfig,
                   example: torch.Tensor) -> tuple[torch.optim.Optimizer, list[Hook]]:
    """The optimizer and hooks of ``settings.optimizer`` (SGD + weight decay by default), with FixMatch's step."""
    settings = fixmatch_settings(cfg)
    if not cfg.labels_per_class:
        raise FixNormError("fixmatch learns from a few labels and the rest of the training set unlabelled: set "
                           "labels_per_class (40 per class is 400 labels on Fashion-MNIST; recipe fmnist-fixmatch)")
    optimizer, hooks = get_method(settings.optimizer).build(model, cfg, example)
    if any(isinstance(h, TrainStep) for h in hooks):
        raise FixNormError(f"method {settings.optimizer!r} owns its training step; FixMatch cannot train with it")
    if settings.teacher == "eman_renorm" and not isinstance(optimizer, FixNorm):
        raise FixNormError(f"teacher eman_renorm needs FixNorm as the optimizer; {settings.optimizer!r} built a "
                           f"{type(optimizer).__name__}")
    return optimizer, [*hooks, FixMatchStep(model, settings)]


def prepare_fixmatch(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The model as the optimizer's method prepares it."""
    return get_method(fixmatch_settings(cfg).optimizer).prepare_model(model, cfg)


register_method(Method("fixmatch", "FixMatch on labels_per_class labels and the rest unlabelled; teacher none, ema, "
                       "eman or eman_renorm (settings method_kwargs.fixmatch.*, optimizer default sgd)",
                       setup=setup_fixmatch, settings=FixMatchSettings, prepare_model=prepare_fixmatch,
                       uses=lambda cfg: [fixmatch_settings(cfg).optimizer]))
