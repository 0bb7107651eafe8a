#!/usr/bin/env python
"""How large "momentum transport" could be: the radial part of FixNorm's momentum buffers, measured in a real run.

After every projection a scale-invariant weight sits on its sphere, but its momentum buffer still holds gradients
taken at earlier points, tangential to *those* points, so part of the buffer is radial at the new one. Transporting
the momentum to the new tangent space (hypothesis 5 of the FixNorm issue: drop that radial part) changes only the
length of the vector the projection rescales, so the next step's angle changes by the factor ``r / (r - lr·b_r)``
(``b_r`` the buffer's radial component, ``r`` the weight's norm, the step being ``-lr·b``). This script trains a
recipe with FixNorm and records, every ``--every`` steps and for every scale-invariant weight with a momentum
buffer, the radial share ``|b_r| / |b|`` and that relative change of the angle, ``|lr·b_r| / r``: if both are small,
transport cannot matter and need not be trained to find out.

    python benchmarks/momentum_radial.py --recipe fmnist-resnet20 --set lr=0.8 --every 10 --out runs/radial_lr08

Prints per epoch the median and the 95th percentile over (step, layer) samples and writes them to
``OUT/momentum_radial.json``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (puts src/ on the path when run from a checkout)

from fixnorm.hooks import Hook, RunState  # noqa: E402
from fixnorm.io import write_json_atomic  # noqa: E402
from fixnorm.train.config import load_recipe, make_config, parse_overrides  # noqa: E402
from fixnorm.train.engine import Trainer  # noqa: E402


class RadialMomentum(Hook):
    """Samples, after the optimizer's step, the radial part of each scale-invariant weight's momentum buffer."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.samples: list[dict[str, float]] = []  # one per (sampled step, weight)

    @torch.no_grad()
    def after_step(self, run: RunState) -> None:
        if run.global_step % self.every:
            return
        optimizer = run.optimizer
        for group in optimizer.param_groups:
            if group.get("role") != "scale_invariant":
                continue
            for p in group["params"]:
                buffer = optimizer.state.get(p, {}).get("momentum_buffer")
                if buffer is None:
                    continue
                w, b = p.detach().float(), buffer.float()
                r, b_norm = w.norm(), b.norm()
                if r == 0 or b_norm == 0:
                    continue
                radial = (w * b).sum() / r
                self.samples.append({"step": run.global_step, "share": float(radial.abs() / b_norm),
                                     "angle_change": float(group["lr"] * radial.abs() / r)})

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = list(state["samples"])


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.floor(q * len(ordered))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="fmnist-resnet20")
    parser.add_argument("--set", nargs="*", default=[], help="recipe overrides (key=value)")
    parser.add_argument("--every", type=int, default=10, help="sample every this many steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True, help="the run's folder")
    args = parser.parse_args()

    cfg = make_config(load_recipe(args.recipe), {"method": "fixnorm", "threads": args.threads},
                      parse_overrides(args.set))
    hook = RadialMomentum(args.every)
    trainer = Trainer(cfg, args.out, hooks=[hook])
    summary = trainer.fit()
    if not hook.samples:
        raise SystemExit("no momentum buffers sampled: the base optimizer keeps none (momentum 0?)")
    per_epoch = trainer.steps_per_epoch
    rows = []
    for epoch in sorted({(s["step"] - 1) // per_epoch for s in hook.samples}):
        chosen = [s for s in hook.samples if (s["step"] - 1) // per_epoch == epoch]
        shares = [s["share"] for s in chosen]
        changes = [s["angle_change"] for s in chosen]
        rows.append({"epoch": epoch + 1, "samples": len(chosen),
                     "share_median": statistics.median(shares), "share_p95": quantile(shares, 0.95),
                     "angle_change_median": statistics.median(changes), "angle_change_p95": quantile(changes, 0.95)})
        print(f"epoch {epoch + 1}: radial share of the momentum median {rows[-1]['share_median']:.4f}, "
              f"p95 {rows[-1]['share_p95']:.4f}; relative change of the next step's angle if transported median "
              f"{rows[-1]['angle_change_median']:.2e}, p95 {rows[-1]['angle_change_p95']:.2e}", flush=True)
    print(f"final test accuracy {100 * summary['final_test_acc']:.2f}")
    write_json_atomic(Path(args.out) / "momentum_radial.json",
                      {"command": "python benchmarks/momentum_radial.py " + " ".join(sys.argv[1:]),
                       "recipe": args.recipe, "overrides": args.set, "rows": rows,
                       "final_test_acc": summary["final_test_acc"]})


if __name__ == "__main__":
    main()
