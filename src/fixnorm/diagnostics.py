"""Diagnostics that make weight decay's two mechanisms visible, for FixNorm and weight-decay runs alike.

Mechanism 1, the effective learning rate of scale-invariant weights: per layer, the weight norm,
``lr / ||w||^2`` (SGD: a step's gradient is orthogonal to w and scales as 1/||w||, so the angle a
step turns is lr * ||g~|| / ||w||^2, with g~ the gradient at unit norm) or ``lr / ||w||`` (Adam,
AdamW, RMSprop, Adagrad: the update has a size set by lr per coordinate, whatever the weight's
scale, so the angle goes as lr / ||w||), the angle a step actually turns (measured every
``every`` steps), and the gradient norm.

Mechanism 2, the cross-boundary risk set by the classifier's norm: on a fixed probe of training
images (no augmentation, eval mode) each epoch, the mean logit norm (the logit scale), the margin
``z_y - max_{j != y} z_j`` (quantiles, and the fraction of samples within one logit of a
boundary), and the *flip rate*: the fraction of probe samples whose predicted class changed since
the previous epoch. Samples near a boundary are the ones a weight update carries across it; the
flip rate counts the crossings that happened, the margin shows how many are at risk.

Everything is added to the epoch record (metrics.csv columns, TensorBoard scalars) as
``diag/invariant/<parameter>/<quantity>``, ``diag/classifier/<parameter>/<quantity>`` and
``diag/<quantity>``. The norms measured every ``every`` steps are also kept as a *norm trace*
(``norm_trace.pt`` in the run folder, rewritten at each epoch end): the trajectory FixNorm's replay
diagnostic (``norm_replay``) holds another run's weights to.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FixNormError
from .hooks import Hook, RunState
from .io import atomic_write, load_tagged_state
from .optim import stepping_lr
from .roles import analyze

TRACE_FORMAT = "fixnorm-norm-trace"
TRACE_FILE = "norm_trace.pt"

# optimizers whose step size per coordinate does not depend on the weight's scale
ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adamax,
            torch.optim.NAdam, torch.optim.RAdam)


def effective_lr_power(optimizer: torch.optim.Optimizer) -> int:
    """2 for SGD-like optimizers (effective LR = lr/||w||^2), 1 for adaptive ones (lr/||w||)."""
    base = getattr(optimizer, "base", optimizer)  # FixNorm wraps its base optimizer
    return 1 if isinstance(base, ADAPTIVE) else 2


def angles(before: list[torch.Tensor], after: list[torch.Tensor]) -> torch.Tensor:
    """The angle (radians) between each pair of tensors, in float64 so a tiny turn is not lost to rounding."""
    out = []
    for a, b in zip(before, after):
        a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
        cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-300)
        # atan2 of |a x b| and a.b is accurate for small angles, unlike acos
        sin = (b64 / b64.norm().clamp_min(1e-300) - cos * a64 / a64.norm().clamp_min(1e-300)).norm()
        out.append(torch.atan2(sin, cos))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j != y} z_j`` per sample: positive when correct, its size the distance to the boundary."""
    z = logits.float()
    true = z.gather(1, labels[:, None]).squeeze(1)
    other = z.scatter(1, labels[:, None], float("-inf")).amax(1)
    return true - other


class DiagnosticsHook(Hook):
    """Per-layer effective LR, norms, angles and gradient norms; logit scale, margins and flip rate.

    ``every``: measure angles and gradient norms every this many steps (the cost is one copy of
    the watched weights per measured step). ``probe_size``: training images in the probe.
    """

    def __init__(self, every: int = 25, probe_size: int = 1024) -> None:
        if every < 1 or probe_size < 0:
            raise FixNormError(f"diagnostics: every must be >= 1 and probe_size >= 0, got {every}, {probe_size}")
        self.every, self.probe_size = every, probe_size
        self.previous_predictions: torch.Tensor | None = None
        self.trace_steps: list[int] = []           # the norm trace: steps, and the norms after them
        self.trace_norms: list[torch.Tensor] = []

    def on_train_start(self, trainer: RunState) -> None:
        model = trainer.model
        named = dict(model.named_parameters())
        optimizer = trainer.optimizer
        roles = getattr(optimizer, "roles", None) or analyze(model, trainer.example_input())
        self.invariant = [n for n in named if n in roles.scale_invariant]
        self.classifier = list(roles.classifier)
        self.names = self.invariant + self.classifier
        self.params = [named[n] for n in self.names]
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.groups = [group_of.get(id(p)) for p in self.params]
        self.power = effective_lr_power(optimizer)
        self._reset_epoch()
        self._before: list[torch.Tensor] | None = None
        self.probe = trainer.probe_images(self.probe_size) if self.probe_size else None

    def _reset_epoch(self) -> None:
        k = len(self.params)
        self.sums = {"angle": torch.zeros(k, dtype=torch.float64), "grad_norm": torch.zeros(k, dtype=torch.float64),
                     "eff_lr": torch.zeros(k, dtype=torch.float64)}
        self.measured = 0

    def before_step(self, trainer: RunState) -> None:
        if (trainer.global_step % self.every) or not self.params:
            return
        self._before = torch._foreach_mul([p.detach() for p in self.params], 1.0)  # one multi-tensor copy
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        # two multi-tensor norms and one transfer to the host
        both = torch.stack(torch._foreach_norm(grads) + torch._foreach_norm(self._before)).double().cpu()
        grad_norms, norms = both[:len(grads)], both[len(grads):]
        self._trace(trainer.global_step, norms)
        self.sums["grad_norm"] += grad_norms
        # the lr the weights step with: FixNorm's lr_power bends the scheduler's lr for scale-invariant weights
        lrs = torch.tensor([stepping_lr(g) if g is not None else math.nan for g in self.groups], dtype=torch.float64)
        self.sums["eff_lr"] += lrs / norms ** self.power

    def after_step(self, trainer: RunState) -> None:
        if self._before is None:
            return
        self.sums["angle"] += angles(self._before, list(self.params)).cpu()
        self.measured += 1
        self._before = None

    @torch.no_grad()
    def on_epoch_end(self, trainer: RunState, record: dict[str, Any]) -> None:
        if self.params:
            measured = torch.stack([p.detach().float().norm() for p in self.params]).cpu()
            self._trace(trainer.global_step, measured)
            self._write_trace(trainer)
            norms = measured.tolist()
            means = {k: (v / self.measured).tolist() if self.measured else [math.nan] * len(self.params)
                     for k, v in self.sums.items()}
            for i, name in enumerate(self.names):
                prefix = f"diag/{'invariant' if i < len(self.invariant) else 'classifier'}/{name}"
                record[f"{prefix}/norm"] = norms[i]
                record[f"{prefix}/eff_lr"] = means["eff_lr"][i]
                record[f"{prefix}/angle"] = means["angle"][i]
                record[f"{prefix}/grad_norm"] = means["grad_norm"][i]
            inv = range(len(self.invariant))
            if self.invariant:
                # geometric means: layers' effective LRs differ by orders of magnitude
                record["diag/eff_lr_geomean"] = _geomean([means["eff_lr"][i] for i in inv])
                record["diag/angle_mean"] = sum(means["angle"][i] for i in inv) / len(self.invariant)
            if self.classifier:
                record["diag/classifier_norm"] = math.sqrt(sum(norms[i] ** 2 for i in range(len(self.invariant),
                                                                                            len(self.names))))
        self._reset_epoch()
        if self.probe is not None:
            self._probe(trainer, record)

    def _probe(self, trainer: RunState, record: dict[str, Any]) -> None:
        model: nn.Module = trainer.model
        was_training = model.training
        model.eval()
        x_all, y_all = self.probe
        logits = []
        for i in range(0, len(x_all), trainer.cfg.eval_batch_size):
            with trainer.autocast():
                logits.append(model(trainer.prepare_batch(x_all[i:i + trainer.cfg.eval_batch_size])).float())
        model.train(was_training)
        z = torch.cat(logits)
        m = margins(z, y_all)
        q = torch.quantile(m, torch.tensor([0.1, 0.5, 0.9], device=m.device)).tolist()
        predictions = z.argmax(1)
        record["diag/logit_norm"] = float(z.norm(dim=1).mean())
        record["diag/margin_p10"], record["diag/margin_p50"], record["diag/margin_p90"] = q
        record["diag/near_boundary"] = float((m.abs() < 1.0).float().mean())
        record["diag/probe_error"] = float((m <= 0).float().mean())
        if self.previous_predictions is not None:
            record["diag/flip_rate"] = float((predictions.cpu() != self.previous_predictions).float().mean())
        self.previous_predictions = predictions.cpu()

    def _trace(self, step: int, norms: torch.Tensor) -> None:
        if not self.trace_steps or step > self.trace_steps[-1]:
            self.trace_steps.append(int(step))
            self.trace_norms.append(norms.double().cpu().clone())

    def _write_trace(self, trainer: RunState) -> None:
        main = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
            torch.distributed.get_rank() == 0)
        if main and self.trace_steps:
            save_norm_trace(Path(trainer.run_dir) / TRACE_FILE, self.names, self.trace_steps,
                            torch.stack(self.trace_norms))

    def state_dict(self) -> dict[str, Any]:
        return {"previous_predictions": self.previous_predictions,
                "trace_steps": torch.tensor(self.trace_steps, dtype=torch.int64),
                "trace_norms": (torch.stack(self.trace_norms) if self.trace_norms
                                else torch.zeros((0, len(getattr(self, "params", []))), dtype=torch.float64))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous_predictions = state.get("previous_predictions")
        steps, norms = state.get("trace_steps"), state.get("trace_norms")
        self.trace_steps = [int(s) for s in steps] if steps is not None else []
        self.trace_norms = list(norms.double().unbind(0)) if norms is not None and len(self.trace_steps) else []


def save_norm_trace(path: str | Path, names: list[str], steps: list[int], norms: torch.Tensor) -> None:
    """Write a norm trace atomically: ``names`` (one per column), ``steps`` and ``norms[step_index, column]``."""
    trace = {"names": list(names), "steps": torch.tensor(steps, dtype=torch.int64), "norms": norms.double().cpu()}
    atomic_write(Path(path), lambda handle: torch.save({"format": TRACE_FORMAT, "version": 1, "trace": trace}, handle))


def load_norm_trace(source: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``(names, steps, norms)`` of a norm trace: a ``norm_trace.pt`` or the run folder holding one. Read without
    unpickling code; a truncated or foreign file is a clear error."""
    path = Path(source)
    if path.is_dir():
        path = path / TRACE_FILE
    if not path.is_file():
        raise FixNormError(f"no norm trace at {path}: a run records one with diagnostics=true")
    trace = load_tagged_state(path, TRACE_FORMAT, "trace", kind="norm trace", setting="norm_replay",
                              writer="a run with diagnostics=true (norm_trace.pt in its folder)")["trace"]
    names, steps, norms = trace.get("names"), trace.get("steps"), trace.get("norms")
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and isinstance(steps, torch.Tensor)
            and isinstance(norms, torch.Tensor)):
        raise FixNormError(f"norm trace {path} is missing its names, steps or norms")
    return names, steps, norms


def _geomean(values: list[float]) -> float:
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in finite) / len(finite)) if finite else math.nan
