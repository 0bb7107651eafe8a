"""How far FixNorm's free phase moved each scale-invariant weight's norm, and the effective lr that leaves.

After the free phase FixNorm holds every scale-invariant weight at the norm it reached (times ``norm_scale``), so
its effective learning rate for the rest of the run is lr / (norm taken)². This reads finished runs (their
``last.pt``, loaded with ``weights_only=True``), rebuilds each run's initial weights exactly as the engine does
(same seed, same model), and prints per run: the norm taken over the initial norm for the stem (the first
scale-invariant weight) and the geometric mean over the others, and the effective lr lr / ratio² in units of
1 / (initial norm)². Where those differ between learning rates, the lr is not what sets the convolutions'
effective lr. The last column compares each norm taken with the norm SGD with weight decay ``--wd`` would settle
at for the gradient scale measured in the free phase, ``(lr |g~|² / (2 wd (1 - momentum)))^(1/4)``
(median over the scale-invariant weights, and range)::

    python benchmarks/free_phase_growth.py runs/r20/fixnorm-s0 runs/r20/fixnorm_lr0.8-s0
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (puts src/ on the path when run from a checkout)

from fixnorm.errors import FixNormError  # noqa: E402
from fixnorm.rules import equilibrium_constant_of, equilibrium_norms  # noqa: E402


def initial_model(config: dict) -> torch.nn.Module:
    """The run's weights at step 0: the engine's seed (``init_seed`` if set), then the recipe's model."""
    from fixnorm.train.config import make_config
    from fixnorm.train.study import recipe_model

    cfg = make_config(config)
    torch.manual_seed(cfg.seed if cfg.init_seed is None else cfg.init_seed)
    return recipe_model(cfg)[0]


def growth(run: Path, wd: float) -> dict[str, float]:
    path = run / "last.pt"
    if not path.is_file():
        raise FixNormError(f"{run}: no last.pt (is this a finished run folder?)")
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    groups = ckpt["optimizer"]["param_groups"]
    held = next((g for g in groups if g.get("role") == "scale_invariant"), None)
    if held is None:
        raise FixNormError(f"{run}: not a FixNorm run (no scale-invariant parameter group)")
    state = ckpt["optimizer"]["state"]
    taken = [float(state[i]["fixnorm_base_target"]) for i in held["params"]]
    shapes = [tuple(state[i]["momentum_buffer"].shape) for i in held["params"]]
    model = initial_model(ckpt["config"])
    # the scale-invariant weights in model order: the parameters whose shapes match, in order
    weights = iter(p for p in model.parameters() if p.ndim >= 2)
    initial = []
    for shape in shapes:
        for p in weights:
            if tuple(p.shape) == shape:
                initial.append(float(p.detach().float().norm()))
                break
        else:
            raise FixNormError(f"{run}: cannot match the held weights to the model's parameters")
    ratios = [t / r0 for t, r0 in zip(taken, initial)]
    lr = float(held["initial_lr"])
    momentum = float(held.get("momentum", 0.0))
    equilibrium = equilibrium_norms([state[i]["fixnorm_grad_sq_ref"] for i in held["params"]],
                                    equilibrium_constant_of(lr, wd, momentum), like=[torch.ones(())] * len(taken))
    to_equilibrium = sorted(t / float(e) for t, e in zip(taken, equilibrium))
    rest = ratios[1:]
    geo = math.exp(sum(math.log(r) for r in rest) / len(rest))
    return {"lr": lr, "stem": ratios[0], "others": geo, "others_min": min(rest), "others_max": max(rest),
            "stem_eff": lr / ratios[0] ** 2, "others_eff": lr / geo ** 2,
            "eq_median": to_equilibrium[(len(to_equilibrium) - 1) // 2], "eq_min": to_equilibrium[0],
            "eq_max": to_equilibrium[-1],
            "acc": float(ckpt["history"][-1]["test_acc"]) if ckpt.get("history") else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished FixNorm run folders (drifting norms)")
    parser.add_argument("--wd", type=float, default=5e-4, help="the weight decay whose equilibrium norms to compare")
    args = parser.parse_args(argv)
    print("| run | lr | stem: taken / initial | other weights: taken / initial (geo-mean, range) | "
          f"effective lr, stem | effective lr, others | taken / equilibrium at wd {args.wd:g} (median, range) | "
          "final acc (%) |")
    print("|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        g = growth(run, args.wd)
        print(f"| {run.name} | {g['lr']:.3g} | {g['stem']:.2f} | {g['others']:.2f} ({g['others_min']:.2f}-"
              f"{g['others_max']:.2f}) | {g['stem_eff']:.2g} | {g['others_eff']:.2g} | {g['eq_median']:.2f} "
              f"({g['eq_min']:.2f}-{g['eq_max']:.2f}) | {100 * g['acc']:.2f} |")
    print("\nEffective lr: lr / (taken / initial)², in units of 1 / (initial norm)²; taken includes norm_scale.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
