"""The one training loop. Methods plug in through `Method` (optimizer, model transform, hooks), never by forking it.

Read top to bottom: data as uint8 tensors on the device, batched augmentation, a step,
an epoch record, an atomic checkpoint. Every random draw of epoch ``e`` comes from
seeds derived from ``(seed, e, rank)``, so a run resumed at an epoch boundary
reaches the same weights, bit for bit, as one that never stopped.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import platform
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..bn_statistics import recompute_bn_statistics_
from ..data import normalize
from ..errors import FixNormError, NonFiniteError
from ..hooks import TrainStep
from ..methods import get_method, with_method_settings
from ..models import create_model
from ..run_folder import RunFolder
from ..schedule import lr_factor
from .checkpoint import (load_checkpoint, remove_stale_temp_files, save_checkpoint, write_json_atomic,
                         write_text_atomic)
from .config import TrainConfig, decided, native_precision, saved_config, settings_that_differ
from .data_source import make_data
from .distributed import DistInfo, all_reduce_sum, broadcast_buffers, init_distributed, shutdown
from .hooks import EmaHook, Hook, training_image_batches
from .masks import apply_masks_, attach_masks, checked_masks, load_masks
from .unified_blocks import attach_unified, checked_layers, load_unify_file, project_layers_

StepCallback = Callable[[int, int, int], None]          # (epoch, step in epoch, steps per epoch)
EpochCallback = Callable[[dict[str, Any]], None]


class Trainer:
    """Builds everything from a TrainConfig and runs it; ``fit()`` returns the summary."""

    def __init__(self, cfg: TrainConfig | None, run_dir: str | Path, *, resume: bool = False,
                 on_step: StepCallback | None = None, on_epoch: EpochCallback | None = None,
                 hooks: Sequence[Hook] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.folder = RunFolder(self.run_dir)
        checkpoint = None
        if resume:
            checkpoint = load_checkpoint(self.folder.last)
            saved = saved_config(checkpoint["config"])
            if cfg is not None:  # asked for a run: the interrupted one must be that run
                _refuse_other_settings(self.run_dir, "an interrupted run", saved, cfg)
            cfg = saved
        elif cfg is None:
            raise FixNormError("Trainer needs a TrainConfig, or resume=True to take the one saved in the run")
        elif self.folder.last.exists():
            raise FixNormError(f"{self.run_dir} already holds a run (last.pt); resume it with --resume "
                               "or choose another run directory")
        cfg = with_method_settings(cfg)  # the method's settings in full: config.yaml says how the run trained
        kind = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        # a TrainConfig built by hand may still say auto: make_config would have decided it already
        cfg = decided(cfg)
        self.cfg, self.on_step, self.on_epoch = cfg, on_step, on_epoch
        if kind == "cuda" and not torch.cuda.is_available():
            raise FixNormError("device 'cuda' was asked for but torch sees no GPU")
        if cfg.precision == "fp16" and kind != "cuda":
            raise FixNormError("precision fp16 needs a GPU (GradScaler); use bf16 on the CPU")
        if cfg.precision == "bf16" and native_precision(kind) != "bf16":
            found = torch.backends.cpu.get_cpu_capability() if kind == "cpu" else torch.cuda.get_device_name()
            warnings.warn(f"precision bf16 on a {kind} without native bfloat16 kernels ({found}): autocast "
                          f"emulates it, many times slower than fp32 (benchmarks/precision_speed.py); set "
                          f"precision=fp32, or precision=auto to get the fastest precision of each machine",
                          stacklevel=2)
        self.dist: DistInfo = init_distributed(kind)
        self.device = torch.device(f"cuda:{self.dist.local_rank}" if kind == "cuda" else "cpu")
        if kind == "cuda":
            torch.cuda.set_device(self.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

        torch.manual_seed(cfg.seed if cfg.init_seed is None else cfg.init_seed)  # the same init on every rank
        self.data = make_data(cfg, self.dist, self.device)
        self.info, self.steps_per_epoch = self.data.info, self.data.steps_per_epoch
        model = create_model(cfg.model, num_classes=self.info.num_classes, in_channels=self.info.in_channels,
                             **cfg.model_kwargs)
        self.method = get_method(cfg.method)
        model = self.method.prepare_model(model, cfg).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.init_from and checkpoint is None:  # before the method analyses the model and takes its norms
            load_model_state(model, cfg.init_from)
        masks = checked_masks(load_masks(cfg.mask_from), model, f"mask_from={cfg.mask_from}") if cfg.mask_from else {}
        apply_masks_(model, masks)  # θ ⊙ m before the method analyses the model: norms over the kept entries
        unified = (checked_layers(load_unify_file(cfg.unify_from)[0], model, f"unify_from={cfg.unify_from}")
                   if cfg.unify_from else {})
        project_layers_(model, unified)  # Π(θ) before the method analyses the model, as masks
        if cfg.start_step >= cfg.epochs * self.steps_per_epoch:
            raise FixNormError(f"start_step={cfg.start_step} leaves nothing to train: {cfg.epochs} epochs are "
                               f"{cfg.epochs * self.steps_per_epoch} steps")
        self.model = model
        example = self.prepare_batch(self.data.example())
        self.optimizer, method_hooks = self.method.build(model, cfg, example)
        count_warmup = getattr(self.optimizer, "count_warmup", None)  # FixNorm: free phases in full-lr steps
        warmup_left = cfg.warmup_epochs * self.steps_per_epoch - cfg.start_step
        # before a checkpoint is restored (it was saved under the same count); a run from start_step inside the
        # warm-up counts the rest of it as a warm-up of its own, from 0 (a longer free phase than its lr would need)
        if callable(count_warmup) and warmup_left > 0:
            count_warmup(warmup_left)
        check_horizon = getattr(self.optimizer, "check_horizon", None)  # FixNorm: a free phase longer than the run
        if callable(check_horizon):
            check_horizon(cfg.epochs * self.steps_per_epoch - cfg.start_step)
        if masks:
            attach_masks(model, self.optimizer, masks)
        if unified:
            attach_unified(model, self.optimizer, unified, trainable_magnitudes=cfg.unify_magnitudes)
        factor = lr_factor(cfg, self.steps_per_epoch)  # of the global step: a run from start_step k resumes it at k
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: factor(s + cfg.start_step))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.hooks: list[Hook] = ([EmaHook(model, cfg.ema_decay)] if cfg.ema_decay else []) + list(
            method_hooks) + list(hooks)
        if cfg.diagnostics:  # last: it sees the step every other hook has shaped
            from ..diagnostics import DiagnosticsHook
            self.hooks.append(DiagnosticsHook(every=cfg.diagnostics_every, probe_size=cfg.probe_size))
        if cfg.rank_every or cfg.curvature_every:
            from ..spectra import spectra_hooks
            self.hooks += spectra_hooks(cfg.rank_every, cfg.curvature_every, curvature_probe=cfg.curvature_probe)
        steps = [h for h in self.hooks if isinstance(h, TrainStep)]
        if len(steps) > 1:
            raise FixNormError(f"a run takes at most one TrainStep hook, got {[type(h).__name__ for h in steps]}")
        self.train_step: TrainStep | None = steps[0] if steps else None
        self.forward_model: nn.Module = model
        if self.dist.enabled:
            self.forward_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if kind == "cuda" else None)
        if cfg.compile:
            self.forward_model = torch.compile(self.forward_model)

        self.history: list[dict[str, Any]] = []
        self.start_epoch, self.best_acc, self.global_step = cfg.start_step // self.steps_per_epoch, -1.0, cfg.start_step
        if checkpoint is not None:
            self._restore(checkpoint)
            if self.dist.is_main:
                remove_stale_temp_files(self.run_dir)  # a kill during an atomic write leaves its temp file
        elif self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.folder.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.tensorboard = self._tensorboard_writer()

    # -- data ----------------------------------------------------------------------------------
    def prepare_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Augmented uint8 batch -> normalised float batch in the model's memory format."""
        x = normalize(x, self.info.mean, self.info.std)
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def example_input(self) -> torch.Tensor:
        """A prepared batch the model accepts (hooks analyse roles with it)."""
        return self.prepare_batch(self.data.example())

    def probe_images(self, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first ``count`` stored training images and labels, or None when the data is streamed."""
        if not hasattr(self.data, "train_x"):
            return None
        n = min(count, len(self.data.train_x))
        return self.data.train_x[:n], self.data.train_y[:n]

    def statistics_images(self, count: int) -> Iterator[torch.Tensor]:
        """``count`` un-augmented training images in batches of the run's batch size, stored or streamed
        (``statistics_images`` of train/data_source.py): what BatchNorm statistics are re-estimated on."""
        return self.data.statistics_images(count)

    def unlabelled_images(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every training image (stored form) with its label, which training must not read, or None when streamed.

        With ``labels_per_class`` the batches hold only the labelled subset; this is the whole set it came from.
        """
        if not hasattr(self.data, "unlabelled_x"):
            return None
        return self.data.unlabelled_x, self.data.unlabelled_y

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        for hook in self.hooks:
            hook.on_train_start(self)
        if self.global_step == self.cfg.start_step:  # a new run: its starting state, if asked (step-0.pt)
            self._save_if_asked()
        start = time.perf_counter()
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                record = self.train_epoch(epoch)
                if not math.isfinite(record["train_loss"]):  # before any checkpoint: last.pt keeps the state before
                    raise NonFiniteError(f"training diverged in epoch {epoch + 1}: the mean training loss is "
                                         f"{record['train_loss']}; the run folder keeps the state before this epoch. "
                                         "Lower the learning rate (or clip gradients, grad_clip=...)")
                self.recompute_bn_statistics()
                record["test_loss"], record["test_acc"] = self.evaluate(self.model)
                for hook in self.hooks:
                    hook.on_epoch_end(self, record)
                self._end_epoch(epoch, record)
            summary = self._summary(time.perf_counter() - start)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            shutdown(self.dist)
        return summary

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over this rank's share of the training data; returns the epoch's record (no eval, no I/O)."""
        cfg, dist = self.cfg, self.dist
        # all randomness of this epoch from (seed, epoch, rank): resuming at an epoch boundary is exact
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + dist.rank)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        skip, images = cfg.start_step - epoch * self.steps_per_epoch, 0  # batches taken before a run from start_step
        start = time.perf_counter()
        for step, (x_uint8, y) in enumerate(self.data.train_batches(epoch)):
            if step < skip:  # drawn, augmented and passed over: the rest of the epoch sees the same batches
                continue
            images += len(y)
            x = self.prepare_batch(x_uint8)
            with self.autocast():
                loss, logits = self.step_loss(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # one code path: the scaler is a no-op unless fp16
            if cfg.grad_clip or self.hooks:
                self.scaler.unscale_(self.optimizer)  # hooks see true gradients
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            for hook in self.hooks:
                hook.before_step(self)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.global_step += 1
            for hook in self.hooks:
                hook.after_step(self)
            self._save_if_asked()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            if self.on_step is not None and dist.is_main:
                self.on_step(epoch, step + 1, self.steps_per_epoch)
        seconds = time.perf_counter() - start
        broadcast_buffers(self.model, dist)  # one model for evaluation and checkpoints, whatever the rank
        totals = all_reduce_sum(torch.stack([loss_sum.float(), correct.float()]), dist)
        seen = self.data.train_size if skip <= 0 else images * dist.world_size
        return {"epoch": epoch + 1, "train_loss": float(totals[0]) / seen, "train_acc": float(totals[1]) / seen,
                "lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds, "images_per_second": seen / seconds}

    def step_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of one training batch: the method's TrainStep if it has one, else cross-entropy."""
        if self.train_step is not None:
            return self.train_step.loss(self, x, y)
        logits = self.forward_model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing), logits

    def recompute_bn_statistics(self) -> None:
        """Precise BN: the model's BatchNorm statistics re-estimated in place on the first ``precise_bn`` stored
        training images, prepared as a batch is (un-augmented), in batches of the run's size, under its autocast;
        nothing with ``precise_bn=0``.

        Between the epoch and its evaluation, so that the evaluation, best.pt and last.pt all hold statistics of the
        weights as they are; training is unaffected (train-mode BatchNorm normalises with the batch's statistics).
        Every rank computes the same estimate from the same images (``statistics_images``: the first ones stored, or
        ones spread over a streamed tree); rank 0's is broadcast all the same.
        """
        if not self.cfg.precise_bn:
            return
        recompute_bn_statistics_(self.model, training_image_batches(self, self.cfg.precise_bn), autocast=self.autocast)
        broadcast_buffers(self.model, self.dist)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(mean loss, accuracy) on the test set, sharded across ranks and summed; ``eval_flip`` averages the logits
        of each image and its mirror."""
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        for x, y in self.data.test_batches():
            x = self.prepare_batch(x)
            with self.autocast():
                logits = model(x).float()
                if self.cfg.eval_flip:  # the mean of the logits of the image and its left-right mirror
                    logits = (logits + model(x.flip(-1)).float()) / 2
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        model.train(was_training)
        totals = all_reduce_sum(torch.stack([loss_sum, correct]), self.dist)
        return float(totals[0]) / self.data.test_size, float(totals[1]) / self.data.test_size

    # -- records and checkpoints ---------------------------------------------------------------
    def _end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        self.history.append(record)
        improved = record["test_acc"] > self.best_acc
        self.best_acc = max(self.best_acc, record["test_acc"])
        if self.dist.is_main:
            # checkpoints first: an epoch that metrics.csv shows is already in last.pt, whenever a kill lands
            last = epoch + 1 == self.cfg.epochs
            if (epoch + 1) % self.cfg.checkpoint_every == 0 or last:
                save_checkpoint(self.folder.last, self._state(epoch + 1))
            if improved:
                save_checkpoint(self.folder.best, {"epoch": epoch + 1, "config": self.cfg.to_dict(),
                                                           "model": self.model.state_dict(),
                                                           "test_acc": record["test_acc"]})
            self._write_metrics()
            if self.tensorboard is not None:
                for key, value in record.items():
                    if key != "epoch":
                        self.tensorboard.add_scalar(key, value, epoch + 1)
                self.tensorboard.flush()
        if self.on_epoch is not None and self.dist.is_main:
            self.on_epoch(record)

    def _save_if_asked(self) -> None:
        """The state after this optimizer step as step-<k>.pt, when ``save_at_steps`` asks for it."""
        if self.global_step in self.cfg.save_at_steps and self.dist.is_main:
            epochs_done = self.global_step / self.steps_per_epoch
            save_checkpoint(self.folder.at_step(self.global_step), self._state(epochs_done))

    def _state(self, epochs_done: float) -> dict[str, Any]:
        return {"epoch": epochs_done, "global_step": self.global_step, "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "hooks": [h.state_dict() for h in self.hooks], "history": self.history, "best_acc": self.best_acc}

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        if len(state["hooks"]) != len(self.hooks):
            raise FixNormError("the checkpoint's hooks do not match this run's (EMA or method settings changed?)")
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)
        self.history = list(state["history"])
        self.start_epoch, self.global_step, self.best_acc = state["epoch"], state["global_step"], state["best_acc"]

    def _write_metrics(self) -> None:
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.history)
        write_text_atomic(self.folder.metrics, buffer.getvalue())

    def _tensorboard_writer(self) -> Any:
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(log_dir=str(self.folder.tensorboard), purge_step=self.start_epoch + 1)

    def _summary(self, seconds: float) -> dict[str, Any]:
        final = self.history[-1] if self.history else {}
        train_seconds = sum(r["seconds"] for r in self.history)
        summary = {
            "method": self.cfg.method, "model": self.cfg.model, "dataset": self.cfg.dataset, "seed": self.cfg.seed,
            "evaluated_on": f"holdout of {self.cfg.holdout} training images" if self.cfg.holdout else "test set",
            "epochs": len(self.history), "final_test_acc": final.get("test_acc"), "best_test_acc": self.best_acc,
            "final_train_loss": final.get("train_loss"), "final_ema_test_acc": final.get("ema_test_acc"),
            "train_seconds": train_seconds, "seconds_per_epoch": train_seconds / max(1, len(self.history)),
            "images_per_second": (sum(r["images_per_second"] for r in self.history) / len(self.history)
                                  if self.history else None),
            "wall_seconds_this_process": seconds,
            "environment": {"torch": torch.__version__, "python": platform.python_version(),
                            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                            else platform.processor() or platform.machine(),
                            "threads": torch.get_num_threads(), "world_size": self.dist.world_size,
                            "host": socket.gethostname(), "pid": os.getpid()},
        }
        if self.dist.is_main:
            write_json_atomic(self.folder.summary, summary)
        return summary


def train(cfg: TrainConfig, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Train one run and return its summary (see Trainer)."""
    return Trainer(cfg, run_dir, **kwargs).fit()


def load_model_state(model: nn.Module, source: str | Path) -> None:
    """Load the model state of another run (its folder's last.pt, or a checkpoint file) into ``model``, strictly."""
    path = Path(source)
    if path.is_dir():
        path = RunFolder(path).last
    state = load_checkpoint(path)
    if not isinstance(state.get("model"), dict):
        raise FixNormError(f"init_from={source}: the checkpoint holds no model state")
    mine, theirs = model.state_dict(), state["model"]
    missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
    wrong = sorted(k for k in set(mine) & set(theirs) if tuple(mine[k].shape) != tuple(theirs[k].shape))
    if missing or extra or wrong:
        raise FixNormError(f"init_from={source} holds another model: missing {missing[:4]}, unexpected {extra[:4]}, "
                           f"other shapes {wrong[:4]}; the run must build the same model (model, model_kwargs, method)")
    model.load_state_dict(theirs)


def train_or_reuse(cfg: TrainConfig, run_dir: str | Path, **trainer_kwargs: Any) -> dict[str, Any]:
    """The summary of the run in ``run_dir``: read if it finished, resumed if it was interrupted, trained if new.

    How ``compare``, the tuner and the benchmarks survive being killed: start them again with the same folders.
    """
    folder = RunFolder(run_dir)
    if folder.finished:
        check_same_run(folder.path, cfg)
        return folder.read_summary()
    return Trainer(cfg, run_dir, resume=folder.interrupted, **trainer_kwargs).fit()


def check_same_run(run_dir: str | Path, cfg: TrainConfig) -> None:
    """Raise if the run saved in ``run_dir`` (finished or interrupted) trained with other settings than ``cfg``
    asks for, execution-only settings aside: a reused folder must never stand in for another run."""
    folder = RunFolder(run_dir)
    saved = folder.read_config()
    if saved is None and folder.last.is_file():
        saved = load_checkpoint(folder.last)["config"]
    if saved is None:
        raise FixNormError(f"{run_dir} holds no run (no config.yaml, no last.pt)")
    _refuse_other_settings(run_dir, "a finished run" if folder.finished else "a run", saved_config(saved), cfg)


def _refuse_other_settings(run_dir: str | Path, what: str, saved: TrainConfig, cfg: TrainConfig) -> None:
    differ = settings_that_differ(with_method_settings(saved), with_method_settings(cfg))
    if differ:
        raise FixNormError(f"{run_dir} holds {what} with other settings than asked for ({'; '.join(differ[:6])}"
                           f"{f'; and {len(differ) - 6} more' if len(differ) > 6 else ''}); it would be reused as "
                           "if it were the run asked for: choose another folder, or delete this one")
