"""Does weight decay's norm follow the law FixNorm's drifting norms assume? Checked on SGD + WD's own gradients.

FixNorm's drifting norms (``norm_drift``, ``drift_follows_lr``) move each held norm as weight decay's equilibrium
would if a scale-invariant weight's norm growth per step were ``lr**2 * |g~|**2 / (1 - m)**2`` (successive
gradients uncorrelated; ``|g~| = |g| * |w|``, the gradient at unit norm): ``|w|**4`` follows a running mean of
``lr * |g~|**2``, anchored at the norm taken after the free phase. This script trains SGD + weight decay (the
recipe's own settings) for ``--steps`` steps, records every scale-invariant weight's norm and unit gradient at every
step, and prints per layer, at a few steps:

- ``actual / drift law``: SGD + WD's ``|w|**4`` over what ``drift_follows_lr``'s law predicts from the same gradients,
  anchored at SGD + WD's own norm at step ``--anchor`` (1.00 there; below 1 later where the law grows the norm more
  than weight decay does, above 1 where less);
- ``actual / K*lr*|g~|^2``: SGD + WD's ``|w|**4`` over the uncorrelated-gradient equilibrium ``K * lr/lr0 *
  mean|g~|**2`` (``K = lr0 / (2 wd (1 - m))``, the ceiling's constant), the same running mean;
- the mean of ``|g~|**2`` over windows of steps.

    python benchmarks/drift_model_check.py --recipe fmnist-speedrun-fast --steps 1400 --seed 0

Stops the run after ``--steps`` optimizer steps (the schedule is the full recipe's); nothing is kept but the table.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write_text  # noqa: E402  (importing _common puts src/ on the path from a checkout)
import torch  # noqa: E402

from fixnorm.errors import FixNormError  # noqa: E402
from fixnorm.hooks import Hook, RunState  # noqa: E402
from fixnorm.optim import weight_decay_relaxation_steps  # noqa: E402
from fixnorm.roles import analyze  # noqa: E402
from fixnorm.rules import equilibrium_constant_of  # noqa: E402
from fixnorm.train.config import load_recipe, make_config, parse_overrides  # noqa: E402
from fixnorm.train.engine import Trainer  # noqa: E402


class _Enough(Exception):
    """Raised by the recorder once it has the steps it needs."""


class NormRecorder(Hook):
    """Before every step: each scale-invariant weight's squared norm and squared unit gradient, and the lr."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.rows: list[tuple[int, float, list[float], list[float]]] = []

    @torch.no_grad()
    def before_step(self, run: RunState) -> None:
        if not self.params:
            invariant = analyze(run.model, run.example_input()).scale_invariant
            named = dict(run.model.named_parameters())
            self.names = [n for n in named if n in invariant]
            self.params = [named[n] for n in self.names]
        norms_sq = [float(p.float().norm() ** 2) for p in self.params]
        grads_sq = [float(p.grad.float().norm() ** 2) if p.grad is not None else 0.0 for p in self.params]
        self.rows.append((run.global_step, float(run.optimizer.param_groups[0]["lr"]), norms_sq,
                          [g * w for g, w in zip(grads_sq, norms_sq)]))

    def after_step(self, run: RunState) -> None:
        if run.global_step >= self.steps:
            raise _Enough


def compare(rows: list[tuple[int, float, list[float], list[float]]], lr0: float, wd: float, momentum: float,
            anchor: int, report: list[int]) -> list[tuple[int, list[float], list[float]]]:
    """Per reported step: per layer actual |w|^4 over the drift law's prediction, and over K * lr * mean|g~|^2
    (the relaxation time and K as FixNorm computes them)."""
    relax = weight_decay_relaxation_steps(wd, True, torch.optim.SGD, {"lr": lr0, "momentum": momentum})
    constant = equilibrium_constant_of(lr0, wd, momentum)
    layers = len(rows[0][2])
    mean, weight = [0.0] * layers, 0.0
    start = anchor // 2  # the rule's running mean starts in the middle of the free phase
    reference: list[float] | None = None
    anchored: list[float] | None = None
    out = []
    for step, lr, norms_sq, unit_grad_sq in rows:
        ratio = lr / lr0
        if step >= start:
            rate = min(ratio / relax, 1.0)
            weight = (1.0 - rate) * weight + rate
            mean = [(1.0 - rate) * m + rate * ratio * g for m, g in zip(mean, unit_grad_sq)]
        if step == anchor:
            reference = [m / weight for m in mean]
            anchored = [n * n for n in norms_sq]
        if step in report and reference is not None and anchored is not None:
            now = [m / weight for m in mean]
            law = [a * m / r for a, m, r in zip(anchored, now, reference)]
            out.append((step, [n * n / p for n, p in zip(norms_sq, law)],
                        [n * n / (constant * m) for n, m in zip(norms_sq, now)]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fmnist-speedrun-fast")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides (key=value)")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--anchor", type=int, default=100, help="the step the law is anchored at (free_steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", help="also write benchmarks/results/<name>.md")
    args = parser.parse_args(argv)
    if not 2 <= args.anchor < args.steps:
        raise SystemExit("need 2 <= --anchor < --steps")
    cfg = make_config(load_recipe(args.recipe), parse_overrides(args.set), {"method": "sgd"},
                      {"seed": args.seed, "threads": args.threads})
    if cfg.base != "sgd" or not cfg.weight_decay > 0:
        raise FixNormError("the drift law is SGD + weight decay's: use an SGD recipe with weight_decay > 0")
    recorder = NormRecorder(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            Trainer(cfg, tmp, hooks=[recorder]).fit()
        except _Enough:
            pass
    rows = recorder.rows
    marks = sorted({args.anchor, *(s for s in (150, 200, 300, 500, 700, 1000, 1400, 2000, 3000) if s < len(rows)),
                    len(rows) - 1})
    short = [n.rsplit(".weight", 1)[0] for n in recorder.names]
    lines = [f"Recipe `{args.recipe}` {' '.join(args.set)}, SGD + WD (lr {cfg.lr}, wd {cfg.weight_decay}, momentum "
             f"{cfg.momentum}), seed {args.seed}; layers: {', '.join(short)}.", "",
             "| step | actual / drift law (per layer) | actual / K*lr*mean unit grad^2 (per layer) |", "|---|---|---|"]
    for step, vs_law, vs_equilibrium in compare(rows, cfg.lr, cfg.weight_decay, cfg.momentum, args.anchor, marks):
        lines.append(f"| {step} | {' '.join(f'{x:.2f}' for x in vs_law)} | "
                     f"{' '.join(f'{x:.2f}' for x in vs_equilibrium)} |")
    bounds = sorted({0, args.anchor // 4, args.anchor // 2, args.anchor, 2 * args.anchor, *marks[-3:]})
    lines += ["", "| steps | mean unit grad^2 (per layer) |", "|---|---|"]
    for a, b in zip(bounds, bounds[1:]):
        window = [r[3] for r in rows if a <= r[0] < b]
        if window:
            means = [sum(w[i] for w in window) / len(window) for i in range(len(short))]
            lines.append(f"| {a}-{b} | {' '.join(f'{m:.3f}' for m in means)} |")
    table = "\n".join(lines)
    print(table)
    if args.name:
        command = "python benchmarks/drift_model_check.py " + " ".join(sys.argv[1:])
        atomic_write_text(Path(__file__).resolve().parent / "results" / f"{args.name}.md",
                          f"# Weight decay's norm against the drift law, on SGD + WD's own gradients\n\n{table}\n\n"
                          f"Command: `{command}`\n")


if __name__ == "__main__":
    main()
