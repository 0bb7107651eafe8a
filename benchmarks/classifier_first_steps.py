#!/usr/bin/env python
"""How far do an arm's first optimizer steps move the classifier, relative to its norm?

At a large step a small classifier is overwritten by its first updates, the logits blow up, and a short run does
not recover (docs/fixnorm.md, "The sixth fix": ResNet-20 at lr 0.8, step 1 = 1.9x the classifier's norm; FixNorm
caps it with ``fc_max_step``). This probe trains ``--steps`` steps of an arm of ``fixnorm_vs_wd.py`` on the recipe
through the engine (constant lr, so every step is at the recipe's peak lr; a cosine schedule differs from it by
under 0.1% in the first steps of the recipes here) and prints, for each step, the classifier's norm before it and
the step's length over that norm. A run shorter than a FixNorm free phase is refused by the engine, so the arms are
the baselines (or FixNorm with ``free_steps`` below ``--steps``).

    python benchmarks/classifier_first_steps.py --recipe fmnist-resnet20 --set model=mobilenetv2_cifar \\
        model_kwargs.width_mult=0.5 batch_size=64 --arm sgd --seeds 0 1 --steps 6
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (puts src/ on the path when run from a checkout)
import fixnorm_vs_wd  # noqa: E402
from lr_role_probe import chosen_parameters  # noqa: E402

from fixnorm.hooks import Hook, RunState  # noqa: E402
from fixnorm.train.config import load_recipe, parse_overrides  # noqa: E402
from fixnorm.train.engine import Trainer  # noqa: E402


class ClassifierSteps(Hook):
    """Records the classifier weight's norm before each step and the step's length over it."""

    def __init__(self, weight: torch.nn.Parameter) -> None:
        self.weight = weight
        self.before: torch.Tensor | None = None
        self.rows: list[tuple[float, float]] = []

    @torch.no_grad()
    def before_step(self, run: RunState) -> None:
        self.before = self.weight.detach().float().clone()

    @torch.no_grad()
    def after_step(self, run: RunState) -> None:
        norm = self.before.norm().item()
        self.rows.append((norm, (self.weight.detach().float() - self.before).norm().item() / norm))


def measure(arm: str, seed: int, recipe: dict, overrides: dict, steps: int, threads: int) -> list[tuple[float, float]]:
    """The (norm before, step / norm) of the classifier weight for ``steps`` steps of ``arm`` on ``seed``."""
    cfg = fixnorm_vs_wd.arm_config(arm, seed, recipe, overrides, threads)
    batch = cfg.batch_size
    short = {"train_subset": steps * batch, "epochs": 1, "schedule": "constant", "warmup_epochs": 0}
    cfg = fixnorm_vs_wd.arm_config(arm, seed, recipe, {**overrides, **short}, threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        weight = next(p for p in chosen_parameters(trainer.model, "classifier") if p.ndim == 2)
        hook = ClassifierSteps(weight)
        trainer.hooks.insert(0, hook)
        trainer.fit()
    if len(hook.rows) != steps:
        raise SystemExit(f"expected {steps} optimizer steps, the run took {len(hook.rows)}")
    return hook.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fmnist-resnet20")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides (key=value)")
    parser.add_argument("--arm", nargs="+", default=["sgd"], help="arms of fixnorm_vs_wd.py (name:key=val,...)")
    parser.add_argument("--seeds", nargs="+", default=["0"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None, help="also write benchmarks/results/<name>.md")
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    recipe, overrides = load_recipe(args.recipe), parse_overrides(args.set)
    seeds = fixnorm_vs_wd.parse_seeds(args.seeds)
    lines = ["| arm | seed | classifier norm before step 1 | step / norm, steps 1.." + str(args.steps)
             + f" | largest | norm before step {args.steps} |", "|---|---|---|---|---|---|"]
    for arm in args.arm:
        largest = []
        for seed in seeds:
            rows = measure(arm, seed, recipe, overrides, args.steps, args.threads)
            ratios = [r for _, r in rows]
            largest.append(max(ratios))
            lines.append(f"| {arm} | {seed} | {rows[0][0]:.3f} | {' '.join(f'{r:.2f}' for r in ratios)} | "
                         f"{max(ratios):.2f} | {rows[-1][0]:.2f} |")
            print(lines[-1], flush=True)
        if len(largest) > 1:
            lines.append(f"| {arm} | mean | | | {statistics.mean(largest):.2f} | |")
    text = "\n".join(lines) + f"\n\nCommand: `{_common.command_line()}`\n"
    print(text)
    if args.name:
        _common.atomic_write_text(str(Path(_common.RESULTS_DIR) / f"{args.name}.md"), f"# {args.name}\n\n{text}")


if __name__ == "__main__":
    main()
